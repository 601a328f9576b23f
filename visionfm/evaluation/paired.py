"""Paired bootstrap of the difference between two models scored on the same test items.

Two encoders evaluated on one test set make errors on the same hard items, so their scores are correlated;
resampling the items once per bootstrap round and scoring *both* models on that resample (a paired bootstrap)
gives an interval for the difference that accounts for it, and is much narrower than comparing two separate
intervals when the models agree on most items.

The statistic is any function of the resampled item indices (and, for experiments repeated over several draws
of training data, of resampled draw indices), so the same routine serves whole-split classification metrics
(AUROC, balanced accuracy), a segmentation Dice pooled over images, and few-shot means over draws.

Example:
    >>> import numpy as np
    >>> a, b = np.arange(10.0), np.arange(10.0) - 1.0   # model a is better by 1 on every item
    >>> result = paired_bootstrap(lambda items, draws: (a[items] - b[items]).mean(), n_items=10)
    >>> [float(result.estimate[0]), float(result.low[0]), float(result.high[0])]   # pairing: no spread at all
    [1.0, 1.0, 1.0]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from ..metrics import classification_metrics

__all__ = ["BootstrapResult", "paired_bootstrap", "metric_difference"]

#: ``statistic(items, draws)``: the value(s) of interest, usually differences between two models, computed on
#: the items and draws given by index arrays (with repetitions).
Statistic = Callable[[np.ndarray, np.ndarray], "float | Sequence[float] | np.ndarray"]


@dataclass
class BootstrapResult:
    """Point estimates and percentile intervals, one entry per component of the statistic.

    Attributes:
        estimate: The statistic on all items and draws.
        low, high: Percentile interval bounds (``nan`` where fewer than half of the resamples gave a finite
            value, e.g. an AUROC on resamples without positives).
        confidence: Interval level.
        resamples: Bootstrap rounds.
        valid: Rounds with a finite value, per component.
    """

    estimate: np.ndarray
    low: np.ndarray
    high: np.ndarray
    confidence: float
    resamples: int
    valid: np.ndarray


def _resample(strata: Sequence[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    return np.concatenate([rng.choice(s, size=s.size, replace=True) for s in strata])


def paired_bootstrap(statistic: Statistic, n_items: int, strata: Optional[np.ndarray] = None, n_draws: int = 1,
                     n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> BootstrapResult:
    """Percentile bootstrap interval of ``statistic`` over resamples of the test items (and of the draws).

    Args:
        statistic: ``statistic(items, draws)`` returning a number or a vector of numbers; compute both models'
            values from the same ``items`` so that the resampling is paired.
        n_items: Number of test items; ``items`` indexes ``0..n_items-1``.
        strata: Optional ``(n_items,)`` labels; items are resampled within each stratum (e.g. class), so every
            resample keeps the split's class balance and AUROC stays defined.
        n_draws: Repeats of the experiment (e.g. few-shot draws of training images), resampled with
            replacement too when more than one; ``draws`` indexes ``0..n_draws-1``.
        n_resamples: Bootstrap rounds.
        confidence: Interval level.
        seed: Seed of the resampling.

    Raises:
        ValueError: no items, no draws, fewer than one round, a level outside (0, 1), or strata of the wrong
            length.
    """
    if n_items < 1 or n_draws < 1:
        raise ValueError(f"paired_bootstrap needs at least one item and one draw, got {n_items} and {n_draws}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if strata is None:
        groups = [np.arange(n_items)]
    else:
        strata = np.asarray(strata)
        if strata.shape != (n_items,):
            raise ValueError(f"strata must have one label per item ({n_items}), got shape {strata.shape}")
        groups = [np.flatnonzero(strata == s) for s in np.unique(strata)]
    all_draws = np.arange(n_draws)
    estimate = np.atleast_1d(np.asarray(statistic(np.arange(n_items), all_draws), dtype=float))
    rng = np.random.default_rng(seed)
    values = np.empty((n_resamples, estimate.size))
    for r in range(n_resamples):
        items = _resample(groups, rng)
        draws = rng.choice(all_draws, size=n_draws, replace=True) if n_draws > 1 else all_draws
        values[r] = np.atleast_1d(np.asarray(statistic(items, draws), dtype=float))
    alpha = (1.0 - confidence) / 2.0
    finite = np.isfinite(values)
    low = np.full(estimate.size, np.nan)
    high = np.full(estimate.size, np.nan)
    for j in range(estimate.size):
        column = values[finite[:, j], j]
        if column.size >= n_resamples / 2:
            low[j], high[j] = np.quantile(column, [alpha, 1.0 - alpha])
    return BootstrapResult(estimate, low, high, confidence, n_resamples, finite.sum(axis=0))


def metric_difference(targets: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray, metrics: Sequence[str],
                      kind: str = "multiclass") -> Statistic:
    """The statistic ``mean over draws of metric(a) - metric(b)`` for classification scores.

    Args:
        targets: ``(N,)`` class indices (``(N, L)`` for multi-label).
        scores_a, scores_b: ``(D, N, C)`` class probabilities of the two models, one slice per draw (``D = 1``
            for a single run), on the same ``N`` items in the same order.
        metrics: Names of :func:`visionfm.metrics.classification_metrics` entries (``auroc``,
            ``balanced_accuracy``...).
        kind: Label kind.

    Returns:
        A :data:`Statistic` returning one difference per metric.
    """
    targets = np.asarray(targets)
    scores_a, scores_b = np.asarray(scores_a, dtype=float), np.asarray(scores_b, dtype=float)
    if scores_a.shape != scores_b.shape or scores_a.ndim != 3 or scores_a.shape[1] != targets.shape[0]:
        raise ValueError(f"scores must both be (draws, {targets.shape[0]}, classes); got {scores_a.shape} and "
                         f"{scores_b.shape}")

    def values(scores: np.ndarray, items: np.ndarray, draws: np.ndarray) -> np.ndarray:
        per_draw = []
        for d in draws:
            m = classification_metrics(targets[items], scores[d, items], kind, per_class=False)
            per_draw.append([m[name] for name in metrics])
        return np.mean(per_draw, axis=0)

    def statistic(items: np.ndarray, draws: np.ndarray) -> np.ndarray:
        return values(scores_a, items, draws) - values(scores_b, items, draws)

    return statistic

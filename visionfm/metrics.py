"""Classification metrics computed once over a whole split, with bootstrap confidence intervals.

Every metric here takes the predictions of *all* images of a split at once (never an average of per-batch
values, which is biased for AUROC, F1 and kappa). They are written in NumPy/SciPy so that the bootstrap can
call them a thousand times quickly; the tests check each one against scikit-learn on fixed inputs.

Conventions:
    * ``kind`` is ``"multiclass"`` (one label per image, softmax scores ``(N, C)``; binary tasks are the
      ``C = 2`` case), ``"ordinal"`` (a grade ``0..C-1`` with class scores ``(N, C)``; adds the quadratic
      weighted kappa) or ``"multilabel"`` (a ``(N, L)`` 0/1 matrix with one sigmoid score per label).
    * For a binary task AUROC and AUPR are those of the positive class (index 1); with more classes they are
      the macro average of one-vs-rest values over the classes that occur in the split.
    * A metric that is undefined on the data (AUROC with one class present...) is ``nan`` (``null`` in JSON).

Example:
    >>> import numpy as np
    >>> y = np.array([0, 0, 1, 1])
    >>> p = np.array([[0.9, 0.1], [0.6, 0.4], [0.35, 0.65], [0.2, 0.8]])
    >>> round(classification_metrics(y, p, "multiclass")["auroc"], 3)
    1.0
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy.stats import rankdata

__all__ = ["KINDS", "confusion_matrix", "accuracy", "balanced_accuracy", "macro_f1", "quadratic_kappa",
           "binary_auroc", "average_precision", "roc_curve", "sensitivity_specificity", "predict_labels",
           "classification_metrics", "bootstrap_ci", "evaluate_split", "plot_confusion_matrix",
           "plot_roc_curves", "to_jsonable"]

KINDS = ("multiclass", "ordinal", "multilabel")


# ----------------------------------------------------------------------------------------------------------
# Single-label building blocks
# ----------------------------------------------------------------------------------------------------------

def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """``(C, C)`` counts; rows are true classes, columns predicted classes."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    return np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes)


def accuracy(cm: np.ndarray) -> float:
    total = cm.sum()
    return float(np.trace(cm) / total) if total else math.nan


def balanced_accuracy(cm: np.ndarray) -> float:
    """Mean recall over the classes that occur in ``y_true`` (as scikit-learn)."""
    support = cm.sum(axis=1)
    present = support > 0
    if not present.any():
        return math.nan
    return float(np.mean(np.diag(cm)[present] / support[present]))


def macro_f1(cm: np.ndarray) -> float:
    """Mean F1 over the classes that occur in ``y_true`` or ``y_pred`` (a class never predicted and never
    true is left out, as scikit-learn does by default; 0/0 counts as 0)."""
    tp = np.diag(cm).astype(float)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    present = (cm.sum(axis=0) + cm.sum(axis=1)) > 0
    if not present.any():
        return math.nan
    denom = 2 * tp + fp + fn
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return float(f1[present].mean())


def quadratic_kappa(cm: np.ndarray) -> float:
    """Cohen's kappa with quadratic weights ``(i - j)^2`` over the grade indices ``0..C-1``."""
    n = cm.sum()
    if n == 0:
        return math.nan
    c = cm.shape[0]
    idx = np.arange(c)
    weights = (idx[:, None] - idx[None, :]) ** 2
    expected = np.outer(cm.sum(axis=1), cm.sum(axis=0)) / n
    denom = (weights * expected).sum()
    if denom == 0:
        return math.nan
    return float(1.0 - (weights * cm).sum() / denom)


def sensitivity_specificity(cm: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Per-class one-vs-rest sensitivity (recall) and specificity; ``nan`` where undefined."""
    n = cm.sum()
    tp = np.diag(cm).astype(float)
    fn = cm.sum(axis=1) - tp
    fp = cm.sum(axis=0) - tp
    tn = n - tp - fn - fp
    with np.errstate(invalid="ignore", divide="ignore"):
        sens = np.where(tp + fn > 0, tp / np.maximum(tp + fn, 1), np.nan)
        spec = np.where(tn + fp > 0, tn / np.maximum(tn + fp, 1), np.nan)
    return sens, spec


# ----------------------------------------------------------------------------------------------------------
# Ranking metrics
# ----------------------------------------------------------------------------------------------------------

def binary_auroc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve by the Mann-Whitney rank statistic (ties count one half)."""
    y = np.asarray(y).astype(bool)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(np.asarray(score, dtype=float))
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _ranked_counts(y: np.ndarray, score: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True/false positive counts at each distinct score threshold, highest threshold first."""
    y = np.asarray(y).astype(float)
    score = np.asarray(score, dtype=float)
    order = np.argsort(-score, kind="mergesort")
    score, y = score[order], y[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(score)), y.size - 1]
    tps = np.cumsum(y)[last_of_tie]
    fps = (last_of_tie + 1) - tps
    return tps, fps, score[last_of_tie]


def average_precision(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the precision-recall curve as the step sum ``sum_k (R_k - R_{k-1}) P_k`` (no interpolation;
    scikit-learn's ``average_precision_score``)."""
    y = np.asarray(y).astype(bool)
    if not y.any():
        return math.nan
    tps, fps, _ = _ranked_counts(y, score)
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def roc_curve(y: np.ndarray, score: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """False and true positive rates at every distinct threshold, starting at ``(0, 0)``."""
    tps, fps, _ = _ranked_counts(y, score)
    tpr = np.r_[0.0, tps / max(tps[-1], 1)]
    fpr = np.r_[0.0, fps / max(fps[-1], 1)]
    return fpr, tpr


def _per_column(fn, onehot: np.ndarray, scores: np.ndarray) -> np.ndarray:
    return np.array([fn(onehot[:, c], scores[:, c]) for c in range(scores.shape[1])])


# ----------------------------------------------------------------------------------------------------------
# Whole-split summary
# ----------------------------------------------------------------------------------------------------------

def predict_labels(scores: np.ndarray, kind: str, threshold: float = 0.5) -> np.ndarray:
    """Hard predictions from scores: arg-max for single-label kinds, ``score >= threshold`` per label for
    multi-label. (Ordinal heads make their own prediction and pass it to :func:`classification_metrics`.)"""
    if kind == "multilabel":
        return (scores >= threshold).astype(np.int64)
    return scores.argmax(axis=1)


def _check(y_true: np.ndarray, scores: np.ndarray, kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if scores.ndim != 2 or scores.shape[0] != y_true.shape[0]:
        raise ValueError(f"scores must be (N, C) with N = {y_true.shape[0]}, got {scores.shape}")
    if kind == "multilabel" and y_true.shape != scores.shape:
        raise ValueError(f"multi-label targets {y_true.shape} and scores {scores.shape} differ in shape")
    if kind != "multilabel" and y_true.ndim != 1:
        raise ValueError(f"{kind} targets must be a vector of class indices, got shape {y_true.shape}")
    if kind != "multilabel" and y_true.size and (y_true.min() < 0 or y_true.max() >= scores.shape[1]):
        raise ValueError(f"class indices must lie in [0, {scores.shape[1] - 1}]")


def classification_metrics(y_true: np.ndarray, scores: np.ndarray, kind: str,
                           y_pred: Optional[np.ndarray] = None, per_class: bool = True) -> Dict[str, Any]:
    """All metrics of one split.

    Args:
        y_true: ``(N,)`` class indices, or ``(N, L)`` 0/1 for multi-label.
        scores: ``(N, C)`` class probabilities (softmax) or per-label probabilities (sigmoid).
        kind: ``multiclass``, ``ordinal`` or ``multilabel``.
        y_pred: Hard predictions; default :func:`predict_labels`.
        per_class: Also return per-class sensitivity, specificity, AUROC and support (``per_class`` entry, a
            list in class order) and the confusion matrix(es).

    Returns:
        ``accuracy``, ``balanced_accuracy``, ``auroc``, ``aupr``, ``f1_macro`` (+ ``kappa`` for ordinal,
        ``label_accuracy`` for multi-label) and, when asked, ``per_class`` and ``confusion_matrix``.
    """
    y_true = np.asarray(y_true)
    scores = np.asarray(scores, dtype=float)
    _check(y_true, scores, kind)
    n_classes = scores.shape[1]
    y_pred = predict_labels(scores, kind) if y_pred is None else np.asarray(y_pred)
    out: Dict[str, Any] = {"n": int(y_true.shape[0])}
    if kind == "multilabel":
        y_true = y_true.astype(np.int64)
        cms = np.stack([confusion_matrix(y_true[:, j], y_pred[:, j], 2) for j in range(n_classes)])
        sens = np.array([sensitivity_specificity(cm)[0][1] for cm in cms])
        spec = np.array([sensitivity_specificity(cm)[1][1] for cm in cms])
        f1 = []
        for cm in cms:
            tp, fp, fn = cm[1, 1], cm[0, 1], cm[1, 0]
            f1.append(2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 0.0)
        auroc = _per_column(binary_auroc, y_true, scores)
        aupr = _per_column(average_precision, y_true, scores)
        out["accuracy"] = float(np.mean(np.all(y_true == y_pred, axis=1))) if y_true.size else math.nan
        out["label_accuracy"] = float(np.mean(y_true == y_pred)) if y_true.size else math.nan
        out["balanced_accuracy"] = _nanmean((sens + spec) / 2.0)
        out["auroc"] = _nanmean(auroc)
        out["aupr"] = _nanmean(aupr)
        out["f1_macro"] = float(np.mean(f1))
        support = y_true.sum(axis=0)
        cm_out: Any = cms
    else:
        y_true = y_true.astype(np.int64)
        cm = confusion_matrix(y_true, y_pred, n_classes)
        onehot = np.eye(n_classes, dtype=np.int64)[y_true]
        sens, spec = sensitivity_specificity(cm)
        auroc = _per_column(binary_auroc, onehot, scores)
        aupr = _per_column(average_precision, onehot, scores)
        out["accuracy"] = accuracy(cm)
        out["balanced_accuracy"] = balanced_accuracy(cm)
        if n_classes == 2:
            out["auroc"], out["aupr"] = float(auroc[1]), float(aupr[1])
        else:
            out["auroc"], out["aupr"] = _nanmean(auroc), _nanmean(aupr)
        out["f1_macro"] = macro_f1(cm)
        if kind == "ordinal":
            out["kappa"] = quadratic_kappa(cm)
        support = cm.sum(axis=1)
        cm_out = cm
    if per_class:
        out["per_class"] = [{"sensitivity": float(sens[c]), "specificity": float(spec[c]),
                             "auroc": float(auroc[c]), "support": int(support[c])} for c in range(n_classes)]
        out["confusion_matrix"] = cm_out.tolist()
    return out


def _nanmean(values: np.ndarray) -> float:
    values = np.asarray(values, dtype=float)
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else math.nan


def _scalars(metrics: Dict[str, Any]) -> Dict[str, float]:
    """The scalar metrics (and per-class sensitivity/specificity) as one flat dict, for the bootstrap."""
    flat = {k: float(v) for k, v in metrics.items() if isinstance(v, float)}
    for c, entry in enumerate(metrics.get("per_class", [])):
        flat[f"sensitivity/{c}"] = entry["sensitivity"]
        flat[f"specificity/{c}"] = entry["specificity"]
    return flat


def bootstrap_ci(y_true: np.ndarray, scores: np.ndarray, kind: str, y_pred: Optional[np.ndarray] = None,
                 n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0
                 ) -> Dict[str, Optional[Tuple[float, float]]]:
    """Percentile bootstrap confidence intervals of every scalar metric (and of per-class sensitivity and
    specificity, keyed ``sensitivity/<class>``).

    Single-label splits are resampled within each true class (a stratified bootstrap), so every resample has
    the split's class balance and AUROC stays defined; multi-label splits are resampled as a whole and
    resamples where a metric is undefined are left out of that metric's interval. A metric defined in fewer
    than half of the resamples gets ``None``.
    """
    y_true = np.asarray(y_true)
    scores = np.asarray(scores, dtype=float)
    y_pred = predict_labels(scores, kind) if y_pred is None else np.asarray(y_pred)
    n = y_true.shape[0]
    if n_resamples <= 0 or n == 0:
        return {}
    rng = np.random.default_rng(seed)
    if kind == "multilabel":
        strata = [np.arange(n)]
    else:
        strata = [np.flatnonzero(y_true == c) for c in np.unique(y_true)]
    samples: Dict[str, List[float]] = {}
    for _ in range(n_resamples):
        idx = np.concatenate([rng.choice(s, size=s.size, replace=True) for s in strata])
        values = _scalars(classification_metrics(y_true[idx], scores[idx], kind, y_pred[idx], per_class=True))
        for key, value in values.items():
            samples.setdefault(key, []).append(value)
    alpha = (1.0 - confidence) / 2.0
    out: Dict[str, Optional[Tuple[float, float]]] = {}
    for key, values in samples.items():
        if key == "n":
            continue
        arr = np.asarray(values, dtype=float)
        arr = arr[~np.isnan(arr)]
        if arr.size < n_resamples / 2:
            out[key] = None
        else:
            lo, hi = np.quantile(arr, [alpha, 1.0 - alpha])
            out[key] = (float(lo), float(hi))
    return out


def evaluate_split(y_true: np.ndarray, scores: np.ndarray, kind: str, class_names: Sequence[str],
                   y_pred: Optional[np.ndarray] = None, n_resamples: int = 1000, confidence: float = 0.95,
                   seed: int = 0) -> Dict[str, Any]:
    """:func:`classification_metrics` with class names on the per-class entries and a ``ci`` entry holding the
    bootstrap intervals (``ci[metric] = [low, high]``, per-class ones under ``per_class[i]["ci"]``)."""
    metrics = classification_metrics(y_true, scores, kind, y_pred)
    if len(class_names) != len(metrics["per_class"]):
        raise ValueError(f"{len(class_names)} class names for {len(metrics['per_class'])} classes")
    ci = bootstrap_ci(y_true, scores, kind, y_pred, n_resamples, confidence, seed)
    for c, entry in enumerate(metrics["per_class"]):
        entry["name"] = str(class_names[c])
        entry["ci"] = {m: ci.pop(f"{m}/{c}", None) for m in ("sensitivity", "specificity")}
    if ci:
        metrics["ci"] = {k: (list(v) if v is not None else None) for k, v in ci.items()}
        metrics["ci_level"] = confidence
        metrics["ci_resamples"] = n_resamples
    return metrics


def to_jsonable(value: Any) -> Any:
    """Plain JSON types with ``nan``/``inf`` as ``null`` (JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


# ----------------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def plot_confusion_matrix(cm: np.ndarray, class_names: Sequence[str], path: "str | Path",
                          title: str = "Confusion matrix") -> Path:
    """Counts annotated in each cell, colour = fraction of the true class (row-normalised)."""
    plt = _pyplot()
    cm = np.asarray(cm)
    if cm.ndim == 3:  # multi-label: one 2x2 matrix per label side by side
        fig, axes = plt.subplots(1, cm.shape[0], figsize=(2.6 * cm.shape[0] + 0.5, 3.0), squeeze=False)
        for j, ax in enumerate(axes[0]):
            _draw_cm(ax, cm[j], ["no", "yes"], str(class_names[j]))
        fig.suptitle(title)
    else:
        side = max(3.5, 0.7 * len(class_names) + 2)
        fig, ax = plt.subplots(figsize=(side, side))
        _draw_cm(ax, cm, class_names, title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _draw_cm(ax, cm: np.ndarray, names: Sequence[str], title: str) -> None:
    rows = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
    ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(int(cm[i, j])), ha="center", va="center",
                    color="white" if frac[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(names)), [str(n) for n in names], rotation=45, ha="right")
    ax.set_yticks(range(len(names)), [str(n) for n in names])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)


def plot_roc_curves(y_true: np.ndarray, scores: np.ndarray, kind: str, class_names: Sequence[str],
                    path: "str | Path", title: str = "ROC") -> Path:
    """One ROC curve per class (one-vs-rest) or per label; only the positive class for a binary task."""
    plt = _pyplot()
    y_true = np.asarray(y_true)
    scores = np.asarray(scores, dtype=float)
    onehot = y_true if kind == "multilabel" else np.eye(scores.shape[1], dtype=np.int64)[y_true]
    classes = [1] if (kind != "multilabel" and scores.shape[1] == 2) else range(scores.shape[1])
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for c in classes:
        if onehot[:, c].min() == onehot[:, c].max():
            continue  # one class only: no curve
        fpr, tpr = roc_curve(onehot[:, c], scores[:, c])
        ax.plot(fpr, tpr, label=f"{class_names[c]} (AUC {binary_auroc(onehot[:, c], scores[:, c]):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(title)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

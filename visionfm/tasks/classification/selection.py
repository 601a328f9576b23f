"""Model selection on the validation split only: which metric decides, and a tracker of the best candidate.

The test split never enters here; it is evaluated once, at the end, with the selected model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import numpy as np
from torch import Tensor

from ...metrics import classification_metrics
from .task import ClassificationTask

__all__ = ["SELECT_METRICS", "resolve_select_metric", "split_metrics", "Selector"]

SELECT_METRICS = ("auto", "auroc", "aupr", "accuracy", "balanced_accuracy", "f1_macro", "kappa", "loss")


def resolve_select_metric(task: ClassificationTask, name: str = "auto") -> str:
    """``auto``: quadratic kappa for ordinal grading, macro AUROC otherwise."""
    if name not in SELECT_METRICS:
        raise ValueError(f"select metric must be one of {', '.join(SELECT_METRICS)}, got {name!r}")
    if name == "auto":
        return "kappa" if task.kind == "ordinal" else "auroc"
    if name == "kappa" and task.kind != "ordinal":
        raise ValueError("kappa is reported for ordinal tasks only; pick another select metric")
    return name


def split_metrics(task: ClassificationTask, probs: Tensor, targets: Tensor) -> Dict[str, Any]:
    """Whole-split point metrics (no confidence intervals) of class probabilities."""
    preds = task.predict(probs)
    return classification_metrics(targets.numpy(), probs.numpy(), task.kind, preds.numpy(), per_class=False)


@dataclass
class Selector:
    """Keeps the best candidate by a validation metric (higher is better; ``loss``: lower is better); ties and
    an undefined metric fall back to the lower validation loss; the earlier candidate wins full ties."""

    metric: str
    best_key: Optional[tuple] = None
    best: Dict[str, Any] = field(default_factory=dict)
    state: Any = None

    def _key(self, value: float, loss: float) -> tuple:
        loss = loss if loss is not None and math.isfinite(loss) else math.inf
        if self.metric == "loss":
            return (-loss,)
        value = value if value is not None and np.isfinite(value) else -math.inf
        return (value, -loss)

    def offer(self, metrics: Dict[str, Any], loss: Optional[float], info: Dict[str, Any], state_fn=None) -> bool:
        """Consider a candidate; ``state_fn()`` is called (to copy weights) only when it is the new best."""
        key = self._key(metrics.get(self.metric, math.nan) if self.metric != "loss" else math.nan,
                        loss if loss is not None else math.nan)
        if self.best_key is not None and key <= self.best_key:
            return False
        self.best_key = key
        self.best = {**info, "val_" + self.metric: (metrics.get(self.metric) if self.metric != "loss" else loss),
                     "val_loss": loss}
        self.state = state_fn() if state_fn is not None else None
        return True

"""What a classification task is: its label kind and classes, its loss, and how logits become probabilities
and predictions.

Ordinal grading (DR grade 0 < 1 < 2 ...) uses a cumulative-link head (CORAL, Cao et al. 2020): ``C - 1``
logits for ``P(grade > k)`` that share one weight vector and differ only in their bias, trained with one
binary cross-entropy per threshold. The prediction is the number of thresholds passed (the median grade), and
class probabilities are differences of the cumulative ones, so the same metrics apply as for multi-class.

Example:
    >>> import torch
    >>> task = ClassificationTask("ordinal", ("no DR", "NPDR", "PDR"))
    >>> task.out_dim
    2
    >>> task.cumulative_targets(torch.tensor([0, 2])).tolist()
    [[0.0, 0.0], [1.0, 1.0]]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ...data.datasets.labeled import LABEL_KINDS

__all__ = ["ClassificationTask"]


@dataclass(frozen=True)
class ClassificationTask:
    """A label kind (``multiclass``, ``multilabel`` or ``ordinal``) and its class (or label) names.

    Args:
        kind: The label kind.
        class_names: Class names in index order (grades in increasing order for ordinal tasks).
        label_smoothing: Label smoothing of the multi-class cross-entropy.
    """

    kind: str
    class_names: Tuple[str, ...]
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in LABEL_KINDS:
            raise ValueError(f"label kind must be one of {', '.join(LABEL_KINDS)}, got {self.kind!r}")
        object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))
        if self.kind != "multilabel" and len(self.class_names) < 2:
            raise ValueError(f"a {self.kind} task needs at least 2 classes, got {list(self.class_names)}")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def out_dim(self) -> int:
        """Number of head outputs: one per class (label), or ``C - 1`` thresholds for ordinal tasks."""
        return self.num_classes - 1 if self.kind == "ordinal" else self.num_classes

    def cumulative_targets(self, targets: Tensor) -> Tensor:
        """``(N, C - 1)`` targets ``[grade > k]`` from class indices, or from soft ``(N, C)`` class targets
        (mixup), where they are ``P(grade > k)``."""
        if targets.ndim == 1:
            thresholds = torch.arange(self.num_classes - 1, device=targets.device)
            return (targets[:, None] > thresholds[None, :]).float()
        return (1.0 - targets.float().cumsum(dim=1))[:, :-1].clamp(0.0, 1.0)

    def balanced_class_weights(self, targets: Tensor) -> Tensor:
        """``(C,)`` weights ``n / (C * n_c)`` of the training targets' classes (scikit-learn's ``balanced``), so
        every class carries the same total weight in the loss: the loss then matches balanced accuracy on
        imbalanced data (EyeDisease4 has 2.7x more diabetic retinopathy than glaucoma images).

        Raises:
            ValueError: The task is not multi-class, or a class has no training target.
        """
        if self.kind != "multiclass":
            raise ValueError(f"balanced class weights apply to multi-class tasks only (task kind {self.kind})")
        counts = torch.bincount(targets.long().flatten().cpu(), minlength=self.num_classes).double()
        missing = [name for name, c in zip(self.class_names, counts.tolist()) if c == 0]
        if missing:
            raise ValueError(f"balanced class weights: no training image of class {', '.join(missing)}")
        return (counts.sum() / (self.num_classes * counts)).float()

    def loss(self, logits: Tensor, targets: Tensor, class_weights: Optional[Tensor] = None) -> Tensor:
        """Mean loss of a batch.

        Args:
            logits: ``(N, out_dim)`` head outputs.
            targets: ``(N,)`` class indices, ``(N, C)`` soft class targets (mixup/cutmix), or ``(N, L)`` 0/1
                (soft after mixup) for multi-label.
            class_weights: Optional ``(C,)`` per-class weights of the cross-entropy (multi-class only; see
                :meth:`balanced_class_weights`): the weighted mean, as ``F.cross_entropy`` takes it.
        """
        logits = logits.float()
        if class_weights is not None:
            if self.kind != "multiclass" or targets.ndim != 1:
                raise ValueError(f"class weights apply to multi-class hard targets only (task kind {self.kind})")
            return F.cross_entropy(logits, targets, weight=class_weights.to(logits.device, torch.float32),
                                   label_smoothing=self.label_smoothing)
        if self.kind == "multilabel":
            return F.binary_cross_entropy_with_logits(logits, targets.float())
        if self.kind == "ordinal":
            return F.binary_cross_entropy_with_logits(logits, self.cumulative_targets(targets))
        if targets.ndim == 2:  # soft targets (label smoothing already applied by the mixer)
            return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
        return F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)

    def probabilities(self, logits: Tensor) -> Tensor:
        """``(N, C)`` class probabilities (softmax; sigmoid per label for multi-label; for ordinal, differences
        of the cumulative probabilities, made monotone first)."""
        logits = logits.float()
        if self.kind == "multiclass":
            return logits.softmax(dim=-1)
        if self.kind == "multilabel":
            return logits.sigmoid()
        exceed = logits.sigmoid().cummin(dim=1).values  # P(grade > k), non-increasing in k
        ones = torch.ones_like(exceed[:, :1])
        zeros = torch.zeros_like(exceed[:, :1])
        upper = torch.cat([ones, exceed], dim=1)
        lower = torch.cat([exceed, zeros], dim=1)
        return (upper - lower).clamp(min=0.0)

    def predict(self, probs: Tensor) -> Tensor:
        """Hard predictions from :meth:`probabilities` (or any ``(N, C)`` class scores): arg-max; per-label
        ``>= 0.5``; for ordinal, the median grade (number of thresholds with ``P(grade > k) > 0.5``)."""
        if self.kind == "multilabel":
            return (probs >= 0.5).long()
        if self.kind == "ordinal":
            normalised = probs / probs.sum(dim=1, keepdim=True).clamp(min=1e-12)
            exceed = 1.0 - normalised.cumsum(dim=1)[:, :-1]
            return (exceed > 0.5).sum(dim=1)
        return probs.argmax(dim=1)

    def one_hot(self, targets: Sequence[int]) -> Tensor:
        return F.one_hot(torch.as_tensor(targets), self.num_classes).float()

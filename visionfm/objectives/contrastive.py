"""Contrastive objectives for CLIP alignment.

All functions take L2-normalised embeddings and a logit scale (the inverse temperature, already exponentiated and
clamped, as :attr:`visionfm.models.clip.CLIPModel.logit_scale_value` gives it):

- :func:`info_nce_loss`: CLIP's symmetric InfoNCE; row ``i`` of ``a`` and row ``i`` of ``b`` are the only positives.
- :func:`label_aware_loss`: FLAIR's image-label-text loss; every pair in the batch whose labels agree is a positive,
  with the target spread evenly over a row's positives (soft targets).
- :func:`cross_modal_loss`: image-image alignment of two modalities (OCT and fundus of the same patient's eye); with
  ``groups`` it is label-aware over the groups, so two images of the same eye in a batch are not pushed apart.

Example:
    >>> import torch, torch.nn.functional as F
    >>> a, b = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    >>> float(label_aware_loss(a, b, torch.arange(4), 10.0)) == float(info_nce_loss(a, b, 10.0))
    True
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["info_nce_loss", "soft_cross_entropy", "label_aware_targets", "label_aware_loss", "cross_modal_loss",
           "CLIPLoss"]


def _check(a: Tensor, b: Tensor) -> None:
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"embeddings must be (N, D) matrices, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape != b.shape:
        raise ValueError(f"paired embeddings must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[0] < 2:
        raise ValueError("a contrastive loss needs a batch of at least 2 pairs")


def _scale(logit_scale: "Tensor | float", like: Tensor) -> Tensor:
    return torch.as_tensor(logit_scale, dtype=like.dtype, device=like.device)


def info_nce_loss(a: Tensor, b: Tensor, logit_scale: "Tensor | float") -> Tensor:
    """Symmetric InfoNCE: ``(CE(s * a @ b.T, I) + CE(s * b @ a.T, I)) / 2`` with ``I`` the diagonal targets.

    Args:
        a, b: Normalised embeddings ``(N, D)``; row ``i`` of each is a matching pair.
        logit_scale: ``s = 1 / temperature``.
    """
    _check(a, b)
    logits = _scale(logit_scale, a) * a @ b.t()
    targets = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets))


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy with a target distribution per row: ``mean_i -sum_j t_ij log softmax(logits)_ij``."""
    return -(targets * F.log_softmax(logits, dim=-1)).sum(-1).mean()


def label_aware_targets(labels: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Soft targets ``T_ij = [y_i == y_j] / #{k : y_k == y_i}`` (each row sums to 1; symmetric)."""
    if labels.ndim != 1:
        raise ValueError(f"labels must be a 1-D tensor of class ids, got shape {tuple(labels.shape)}")
    same = (labels[:, None] == labels[None, :]).to(dtype)
    return same / same.sum(-1, keepdim=True)


def label_aware_loss(image: Tensor, text: Tensor, labels: Tensor, logit_scale: "Tensor | float") -> Tensor:
    """FLAIR's image-label-text loss: InfoNCE in both directions where all pairs sharing a label are positives.

    Args:
        image, text: Normalised embeddings ``(N, D)``; row ``i`` of ``text`` is the caption of image ``i``.
        labels: ``(N,)`` class ids (the category the caption was built from; for free captions, an id per distinct
            caption). With all-distinct labels this is exactly :func:`info_nce_loss`.
        logit_scale: ``1 / temperature``.
    """
    _check(image, text)
    if labels.shape[0] != image.shape[0]:
        raise ValueError(f"{labels.shape[0]} labels for {image.shape[0]} pairs")
    logits = _scale(logit_scale, image) * image @ text.t()
    targets = label_aware_targets(labels.to(image.device), logits.dtype)
    return 0.5 * (soft_cross_entropy(logits, targets) + soft_cross_entropy(logits.t(), targets))


def cross_modal_loss(a: Tensor, b: Tensor, logit_scale: "Tensor | float", groups: Optional[Tensor] = None) -> Tensor:
    """Contrastive alignment of two image modalities: row ``i`` of ``a`` (say OCT) and of ``b`` (fundus) show the same
    eye. With ``groups`` (one id per pair, e.g. the patient-eye), pairs of the same group are positives as well."""
    if groups is None:
        return info_nce_loss(a, b, logit_scale)
    return label_aware_loss(a, b, groups, logit_scale)


class CLIPLoss(nn.Module):
    """The image-text loss as a module: ``"infonce"`` (standard CLIP) or ``"label_aware"`` (FLAIR).

    ``forward(image, text, logit_scale, labels=None)``: ``labels`` are required for ``label_aware``.
    """

    def __init__(self, kind: str = "label_aware") -> None:
        super().__init__()
        if kind not in ("infonce", "label_aware"):
            raise ValueError(f"loss must be 'infonce' or 'label_aware', got {kind!r}")
        self.kind = kind

    def forward(self, image: Tensor, text: Tensor, logit_scale: "Tensor | float",
                labels: Optional[Tensor] = None) -> Tensor:
        if self.kind == "infonce":
            return info_nce_loss(image, text, logit_scale)
        if labels is None:
            raise ValueError("the label-aware loss needs the labels of the batch")
        return label_aware_loss(image, text, labels, logit_scale)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"

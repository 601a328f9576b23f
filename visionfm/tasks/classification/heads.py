"""Classification heads: a linear layer or a small MLP, with a cumulative (ordinal) output where needed.

Example:
    >>> import torch
    >>> from visionfm.tasks.classification.task import ClassificationTask
    >>> head = build_head("mlp", 64, ClassificationTask("multiclass", ("a", "b", "c")), hidden_dim=32)
    >>> head(torch.randn(5, 64)).shape
    torch.Size([5, 3])
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .task import ClassificationTask

__all__ = ["HEADS", "Standardize", "OrdinalOutput", "build_head", "load_probe_into_head"]

HEADS = ("linear", "mlp")


class Standardize(nn.Module):
    """Fixed per-dimension standardisation of frozen features, fitted on the training features.

    The per-dimension variance is shrunk towards the mean variance over dimensions, with the weight of
    ``prior`` samples: with thousands of training images this is plain standardisation; with a few shots it
    becomes a single global scale, so that dimensions whose spread is estimated from two images are not
    blown up.
    """

    def __init__(self, mean: Tensor, std: Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.detach().clone().float())
        self.register_buffer("std", std.detach().clone().float())

    @classmethod
    def fit(cls, features: Tensor, prior: float = 10.0, eps: float = 1e-6) -> "Standardize":
        features = features.float()
        n = features.shape[0]
        mean = features.mean(dim=0)
        var = features.var(dim=0, unbiased=False) if n > 1 else torch.zeros_like(mean)
        pooled = var.mean() if n > 1 else features.pow(2).mean()
        shrunk = (n * var + prior * pooled) / (n + prior)
        return cls(mean, (shrunk + eps).sqrt())

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class OrdinalOutput(nn.Module):
    """Cumulative-link output for ``num_classes`` ordered grades: one shared weight vector and ``C - 1``
    ordered biases, so the ``P(grade > k)`` logits never cross (rank consistency, CORAL)."""

    def __init__(self, in_dim: int, num_classes: int) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError("an ordinal output needs at least 2 grades")
        self.linear = nn.Linear(in_dim, 1, bias=False)
        self.bias = nn.Parameter(torch.zeros(num_classes - 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x) + self.bias


def _output_layer(in_dim: int, task: ClassificationTask) -> nn.Module:
    if task.kind == "ordinal":
        return OrdinalOutput(in_dim, task.num_classes)
    return nn.Linear(in_dim, task.num_classes)


def build_head(head: str, in_dim: int, task: ClassificationTask, hidden_dim: int = 512, dropout: float = 0.0,
               standardize: Optional[Standardize] = None, init_std: Optional[float] = None) -> nn.Sequential:
    """A head mapping ``(N, in_dim)`` features to ``(N, task.out_dim)`` logits.

    Args:
        head: ``linear`` or ``mlp`` (one hidden layer with GELU and dropout).
        in_dim: Feature size.
        task: The task (decides the output layer).
        hidden_dim: MLP width.
        dropout: Dropout before the output layer.
        standardize: Optional fixed feature standardisation put first (frozen-feature probes).
        init_std: Initialise the output weights from a truncated normal with this std and zero biases
            (a near-zero start, as MAE/RETFound fine-tuning does); ``None`` keeps PyTorch's default.
    """
    if head not in HEADS:
        raise ValueError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
    layers = [standardize] if standardize is not None else []
    width = in_dim
    if head == "mlp":
        layers += [nn.Linear(in_dim, hidden_dim), nn.GELU()]
        width = hidden_dim
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    out = _output_layer(width, task)
    if init_std is not None:
        weight = out.linear.weight if isinstance(out, OrdinalOutput) else out.weight
        nn.init.trunc_normal_(weight, std=init_std)
        nn.init.zeros_(out.bias)
    layers.append(out)
    return nn.Sequential(*layers)


def _fold(layer: nn.Module, norm: Standardize) -> None:
    """Rewrite ``layer`` (applied to standardised features) in place so that it takes raw features:
    ``W (x - m) / s + b = (W / s) x + (b - (W / s) m)``."""
    linear = layer.linear if isinstance(layer, OrdinalOutput) else layer
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"cannot fold a feature standardisation into {type(layer).__name__}")
    with torch.no_grad():
        linear.weight.div_(norm.std)
        shift = linear.weight @ norm.mean
        if isinstance(layer, OrdinalOutput):  # the shared projection has no bias; the grade biases take the shift
            layer.bias.sub_(shift)
        else:
            linear.bias.sub_(shift)


def load_probe_into_head(probe: nn.Sequential, head: nn.Sequential) -> nn.Sequential:
    """Initialise a fine-tuning ``head`` from a probe trained on frozen features of the same pooling (LP-FT).

    The probe starts with a :class:`Standardize`; it is folded into the probe's first layer, so ``head`` keeps
    its own structure (no standardisation) and gives the probe's logits on the features it was fitted on. Both
    heads must be of the same kind (``linear`` or ``mlp``); dropout layers of ``head`` carry no parameters and
    are skipped. Returns ``head``, modified in place.
    """
    if not isinstance(probe[0], Standardize):
        raise ValueError("the probe must start with its feature standardisation (a Standardize layer)")
    source = [m for m in probe[1:] if not isinstance(m, nn.Dropout)]
    target = [m for m in head if not isinstance(m, (nn.Dropout, Standardize))]
    if [type(m) for m in source] != [type(m) for m in target]:
        raise ValueError(f"probe layers {[type(m).__name__ for m in source]} do not match the head's "
                         f"{[type(m).__name__ for m in target]}")
    for src, dst in zip(source, target):
        dst.load_state_dict(src.state_dict())  # strict: same shapes and keys, or an error naming them
    _fold(target[0], probe[0])
    return head

"""Weighted k-NN classification on frozen features, as in DINO's evaluation (Caron et al. 2021).

Features are L2-normalised; each query takes its ``k`` most cosine-similar training images, each voting for
its class with weight ``exp(similarity / T)``. The normalised votes are the class scores (for multi-label data,
the weighted mean of the neighbours' label vectors).

Example:
    >>> import torch
    >>> from visionfm.tasks.classification.task import ClassificationTask
    >>> task = ClassificationTask("multiclass", ("a", "b"))
    >>> train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    >>> knn_scores(train, torch.tensor([0, 0, 1]), torch.tensor([[1.0, 0.05]]), task, k=2).argmax(1).tolist()
    [0]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .task import ClassificationTask

__all__ = ["knn_scores"]


@torch.no_grad()
def knn_scores(train_features: Tensor, train_targets: Tensor, query_features: Tensor, task: ClassificationTask,
               k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> Tensor:
    """``(Q, C)`` class scores (summing to 1 for single-label tasks) for each query.

    Args:
        train_features: ``(N, D)`` training features.
        train_targets: ``(N,)`` class indices or ``(N, L)`` multi-label 0/1.
        query_features: ``(Q, D)`` features to classify.
        task: The task (number of classes, label kind).
        k: Neighbours (capped at ``N``).
        temperature: Vote temperature ``T``.
        chunk: Queries per similarity block (bounds memory).
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    k = min(k, train_features.shape[0])
    bank = F.normalize(train_features.float(), dim=1)
    if task.kind == "multilabel":
        votes_of = train_targets.float()
    else:
        votes_of = F.one_hot(train_targets.long(), task.num_classes).float()
    out = []
    for start in range(0, query_features.shape[0], chunk):
        query = F.normalize(query_features[start:start + chunk].float(), dim=1)
        sim, idx = (query @ bank.T).topk(k, dim=1)
        weights = (sim / temperature).exp()
        votes = (weights[:, :, None] * votes_of[idx]).sum(dim=1)
        out.append(votes / weights.sum(dim=1, keepdim=True))
    return torch.cat(out)

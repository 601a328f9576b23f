"""The contrastive losses against direct, loop-by-loop implementations of their formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from visionfm.objectives.contrastive import (CLIPLoss, cross_modal_loss, info_nce_loss, label_aware_loss,
                                             label_aware_targets)


def _embeddings(n: int, d: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    b = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    return a, b


def _direct_info_nce(a, b, scale):
    """(1/2N) sum_i [-log e^{s a_i.b_i} / sum_j e^{s a_i.b_j}  -  log e^{s b_i.a_i} / sum_j e^{s b_i.a_j}]."""
    n = a.shape[0]
    total = 0.0
    for i in range(n):
        row = [math.exp(scale * float(a[i] @ b[j])) for j in range(n)]
        col = [math.exp(scale * float(b[i] @ a[j])) for j in range(n)]
        total += -math.log(row[i] / sum(row)) - math.log(col[i] / sum(col))
    return total / (2 * n)


def _direct_label_aware(a, b, labels, scale):
    """FLAIR: each row's target spreads 1/|P_i| over the positives P_i = {j : y_j = y_i}, in both directions."""
    n = a.shape[0]
    total = 0.0
    for i in range(n):
        positives = [j for j in range(n) if labels[j] == labels[i]]
        row = [math.exp(scale * float(a[i] @ b[j])) for j in range(n)]
        col = [math.exp(scale * float(b[i] @ a[j])) for j in range(n)]
        total += -sum(math.log(row[j] / sum(row)) for j in positives) / len(positives)
        total += -sum(math.log(col[j] / sum(col)) for j in positives) / len(positives)
    return total / (2 * n)


@pytest.mark.parametrize("scale", [1.0, 14.3, 100.0])
def test_info_nce_matches_the_formula(scale):
    a, b = _embeddings(6)
    assert float(info_nce_loss(a, b, scale)) == pytest.approx(_direct_info_nce(a, b, scale), rel=1e-9)


@pytest.mark.parametrize("labels", [[0, 1, 0, 2, 1, 0], [3, 3, 3, 3, 3, 3], [0, 1, 1, 0, 2, 2]])
def test_label_aware_loss_matches_the_formula_with_shared_labels(labels):
    a, b = _embeddings(6, seed=1)
    y = torch.tensor(labels)
    got = float(label_aware_loss(a, b, y, 10.0))
    assert got == pytest.approx(_direct_label_aware(a, b, labels, 10.0), rel=1e-9)
    if len(set(labels)) < len(labels):  # shared labels really change the loss (the positives are not just i=j)
        assert abs(got - _direct_info_nce(a, b, 10.0)) > 1e-3


def test_label_aware_with_distinct_labels_is_info_nce():
    a, b = _embeddings(5, seed=2)
    assert float(label_aware_loss(a, b, torch.arange(5), 7.0)) == pytest.approx(float(info_nce_loss(a, b, 7.0)))


def test_label_aware_targets_are_row_normalised_and_symmetric():
    t = label_aware_targets(torch.tensor([0, 1, 0, 0]))
    assert torch.allclose(t.sum(1), torch.ones(4))
    assert torch.equal(t, t.t())
    assert t[0].tolist() == pytest.approx([1 / 3, 0, 1 / 3, 1 / 3])
    assert t[1].tolist() == [0, 1, 0, 0]


def test_label_aware_does_not_push_apart_same_label_pairs():
    # Images 0 and 1 share a label. InfoNCE prefers them (and their captions) apart; the label-aware loss prefers
    # them together, because each is a positive for the other's caption.
    labels = torch.tensor([0, 0, 1])
    apart = torch.eye(3)
    together = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]), dim=-1)
    assert float(info_nce_loss(apart, apart, 10.0)) < float(info_nce_loss(together, together, 10.0)) - 0.3
    assert float(label_aware_loss(together, together, labels, 10.0)) < \
        float(label_aware_loss(apart, apart, labels, 10.0)) - 0.3


def test_cross_modal_loss_is_info_nce_or_label_aware_over_groups():
    a, b = _embeddings(6, seed=3)
    assert float(cross_modal_loss(a, b, 5.0)) == pytest.approx(_direct_info_nce(a, b, 5.0), rel=1e-9)
    groups = [0, 0, 1, 2, 2, 3]
    got = float(cross_modal_loss(a, b, 5.0, torch.tensor(groups)))
    assert got == pytest.approx(_direct_label_aware(a, b, groups, 5.0), rel=1e-9)


def test_clip_loss_module_and_gradients():
    a, b = _embeddings(4, seed=4)
    a.requires_grad_(True)
    loss = CLIPLoss("label_aware")(a, b, torch.tensor(10.0, dtype=torch.float64), torch.tensor([0, 0, 1, 1]))
    loss.backward()
    assert a.grad is not None and torch.isfinite(a.grad).all()
    assert CLIPLoss("infonce")(a, b, 10.0).item() == pytest.approx(_direct_info_nce(a.detach(), b, 10.0), rel=1e-9)
    with pytest.raises(ValueError, match="needs the labels"):
        CLIPLoss("label_aware")(a, b, 10.0)
    with pytest.raises(ValueError, match="label_aware"):
        CLIPLoss("triplet")


def test_bad_inputs_are_rejected():
    a, b = _embeddings(4)
    with pytest.raises(ValueError, match="same shape"):
        info_nce_loss(a, b[:3], 1.0)
    with pytest.raises(ValueError, match="at least 2"):
        info_nce_loss(a[:1], b[:1], 1.0)
    with pytest.raises(ValueError, match="3 labels for 4 pairs"):
        label_aware_loss(a, b, torch.tensor([0, 1, 2]), 1.0)
    with pytest.raises(ValueError, match="1-D"):
        label_aware_loss(a, b, torch.zeros(4, 2), 1.0)

"""The shared optimiser step and the precision setting."""

from __future__ import annotations

import pytest
import torch

from visionfm.engine.precision import backward_and_step, resolve_precision


def _one_weight_problem(value: float):
    weight = torch.nn.Parameter(torch.zeros(3))
    target = torch.tensor([value, 0.0, 0.0])
    loss = 0.5 * ((weight - target) ** 2).sum()  # gradient = weight - target = (-value, 0, 0)
    return weight, loss


def test_backward_and_step_returns_the_norm_before_clipping_and_clips():
    weight, loss = _one_weight_problem(4.0)
    optimizer = torch.optim.SGD([weight], lr=1.0)
    norm = backward_and_step(loss, optimizer, None, [weight], clip_grad=1.0)
    assert norm == pytest.approx(4.0)
    # SGD with lr 1 moves the weight by minus the clipped gradient: (4, 0, 0) scaled to norm 1.
    assert torch.allclose(weight.detach(), torch.tensor([1.0, 0.0, 0.0]), atol=1e-6)


def test_backward_and_step_without_clipping_returns_none_and_zeroes_old_gradients():
    weight, loss = _one_weight_problem(2.0)
    weight.grad = torch.full((3,), 100.0)  # a stale gradient must not be added to the new one
    optimizer = torch.optim.SGD([weight], lr=0.5)
    assert backward_and_step(loss, optimizer, None, [weight]) is None
    assert torch.allclose(weight.detach(), torch.tensor([1.0, 0.0, 0.0]))


def test_resolve_precision_settings():
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == (None, False)
    assert resolve_precision("BF16", cpu) == (torch.bfloat16, False)
    with pytest.raises(ValueError, match="fp16 autocast is for GPUs"):
        resolve_precision("fp16", cpu)
    with pytest.raises(ValueError, match="auto, bf16, fp16 or fp32"):
        resolve_precision("half", cpu)

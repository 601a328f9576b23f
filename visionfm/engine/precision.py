"""Mixed precision: bf16 autocast where the hardware supports it, fp16 + grad scaler on older GPUs."""

from __future__ import annotations

import contextlib
from typing import ContextManager, Optional, Tuple

import torch

__all__ = ["resolve_precision", "autocast", "backward_and_step"]


def _cpu_bf16_supported() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(setting: str, device: torch.device) -> Tuple[Optional[torch.dtype], bool]:
    """Map ``auto|bf16|fp16|fp32`` to ``(autocast dtype or None, needs a grad scaler)``.

    ``auto``: bf16 on GPUs that support it and on CPUs with native bf16 (AVX512-BF16/AMX), fp16 with a scaler on
    other GPUs, fp32 elsewhere.
    """
    setting = str(setting).lower()
    if setting not in ("auto", "bf16", "fp16", "fp32"):
        raise ValueError(f"precision must be auto, bf16, fp16 or fp32, got {setting!r}")
    if setting == "fp32":
        return None, False
    if device.type == "cuda":
        if setting == "fp16" or (setting == "auto" and not torch.cuda.is_bf16_supported()):
            return torch.float16, True
        return torch.bfloat16, False
    if setting == "fp16":
        raise ValueError("fp16 autocast is for GPUs; use bf16 or fp32 on the CPU")
    if setting == "auto" and not _cpu_bf16_supported():
        return None, False
    return torch.bfloat16, False


def autocast(device: torch.device, dtype: Optional[torch.dtype]) -> ContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def backward_and_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                      scaler: Optional["torch.amp.GradScaler"] = None, parameters=None,
                      clip_grad: Optional[float] = None) -> Optional[float]:
    """One optimiser step: zero the gradients, backward (through the fp16 grad scaler when there is one),
    clip the global gradient norm of ``parameters`` (after unscaling), step.

    Returns the gradient norm before clipping when ``clip_grad`` is set (for logging), else ``None``."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    grad_norm = None
    if clip_grad:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(list(parameters), float(clip_grad)))
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return grad_norm

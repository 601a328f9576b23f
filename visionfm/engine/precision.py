"""Mixed precision: bf16 autocast where the hardware supports it, fp16 + grad scaler on older GPUs, and the
dtype limits of compiled ops that autocast cannot see."""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Dict, FrozenSet, Iterable, Optional, Tuple

import torch

__all__ = ["CUDA_OP_DTYPES", "resolve_precision", "precision_for_ops", "cuda_capability", "native_cuda_bf16",
           "autocast", "backward_and_step", "enable_tf32"]

#: Compiled CUDA kernels (mmcv's) that take only some floating dtypes; autocast leaves their inputs in whatever
#: dtype the preceding layer produced. ``sigmoid_focal_loss`` (RetinaNet, FCOS) dispatches on fp32/fp16 only, so a
#: bf16 head output fails with "not implemented for 'BFloat16'". On the CPU mmdet computes the focal loss in plain
#: PyTorch, where any dtype works. (mmcv's ``nms`` needs fp32 on every device; the detection runner trains two-stage
#: detectors in fp32 for it.)
CUDA_OP_DTYPES: Dict[str, FrozenSet[Optional[torch.dtype]]] = {
    "sigmoid_focal_loss": frozenset({None, torch.float16}),  # None: no autocast (fp32)
}


def _cpu_bf16_supported() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cuda_capability(device: torch.device) -> Tuple[int, int]:
    """The compute capability of ``device`` (a separate function so that tests can stand in for a GPU)."""
    return torch.cuda.get_device_capability(device)


def native_cuda_bf16(device: torch.device) -> bool:
    """bf16 with hardware matmuls: compute capability 8.0 (Ampere) or newer.

    Why not ``torch.cuda.is_bf16_supported()``: it also answers True on Volta/Turing, where bf16 is emulated and
    slower than fp32; there the fp16 + grad scaler path is the fast one.
    """
    return cuda_capability(device) >= (8, 0)


def resolve_precision(setting: str, device: torch.device) -> Tuple[Optional[torch.dtype], bool]:
    """Map ``auto|bf16|fp16|fp32`` to ``(autocast dtype or None, needs a grad scaler)``.

    ``auto``: bf16 on GPUs with native bf16 (Ampere or newer) and on CPUs with native bf16 (AVX512-BF16/AMX), fp16
    with a scaler on older GPUs, fp32 elsewhere. An explicit ``bf16`` is honoured on any GPU.
    """
    setting = str(setting).lower()
    if setting not in ("auto", "bf16", "fp16", "fp32"):
        raise ValueError(f"precision must be auto, bf16, fp16 or fp32, got {setting!r}")
    if setting == "fp32":
        return None, False
    if device.type == "cuda":
        if setting == "fp16" or (setting == "auto" and not native_cuda_bf16(device)):
            return torch.float16, True
        return torch.bfloat16, False
    if setting == "fp16":
        raise ValueError("fp16 autocast is for GPUs; use bf16 or fp32 on the CPU")
    if setting == "auto" and not _cpu_bf16_supported():
        return None, False
    return torch.bfloat16, False


def precision_for_ops(setting: str, device: torch.device,
                      ops: Iterable[str]) -> Tuple[Optional[torch.dtype], bool, Optional[str]]:
    """:func:`resolve_precision`, then narrowed to what the compiled ``ops`` a model calls accept on ``device``
    (see :data:`CUDA_OP_DTYPES`).

    With ``auto`` the dtype falls back to the fastest one every op takes (fp16 with a scaler, else fp32); an
    explicit setting that an op cannot take is an error, since silently training in another precision would
    make the run differ from what was asked.

    Returns:
        ``(autocast dtype or None, needs a grad scaler, why it was changed or None)``.

    Raises:
        ValueError: an explicit precision one of the ops does not take on this device.
    """
    dtype, scaler = resolve_precision(setting, device)
    if device.type != "cuda":
        return dtype, scaler, None
    limits = [(op, CUDA_OP_DTYPES[op]) for op in ops if op in CUDA_OP_DTYPES]
    blocking = [op for op, allowed in limits if dtype not in allowed]
    if not blocking:
        return dtype, scaler, None
    name = str(dtype).replace("torch.", "")
    if str(setting).lower() != "auto":
        raise ValueError(f"precision {setting}: mmcv's CUDA {', '.join(blocking)} does not take {name}; use "
                         f"precision auto (picks what the ops take) or fp32")
    for candidate, candidate_scaler in ((torch.float16, True), (None, False)):
        if all(candidate in allowed for _, allowed in limits):
            new = "fp16 with a grad scaler" if candidate is torch.float16 else "fp32"
            return candidate, candidate_scaler, f"mmcv's CUDA {', '.join(blocking)} does not take {name}: {new}"
    raise AssertionError("fp32 is accepted by every op")  # pragma: no cover


def enable_tf32(device: torch.device) -> bool:
    """Let fp32 matmuls and convolutions on an Ampere-or-newer GPU use TF32 tensor cores (10-bit mantissa
    products, fp32 accumulation), as cuDNN convolutions already do by default. It speeds up what runs in fp32 on
    purpose (two-stage detectors, evaluation, feature caching) several-fold at a precision well above bf16's.
    Returns whether it was switched on (no-op off CUDA or on older GPUs)."""
    if device.type != "cuda" or not native_cuda_bf16(device):
        return False
    # cuDNN convolutions use TF32 by default already; matmuls need this (the stable spelling across torch versions).
    torch.set_float32_matmul_precision("high")
    return True


def autocast(device: torch.device, dtype: Optional[torch.dtype]) -> ContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def backward_and_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                      scaler: Optional["torch.amp.GradScaler"] = None, parameters=None,
                      clip_grad: Optional[float] = None,
                      as_tensor: bool = False,
                      after_backward: Optional[Callable[[], None]] = None) -> "Optional[float | torch.Tensor]":
    """One optimiser step: zero the gradients, backward (through the fp16 grad scaler when there is one),
    ``after_backward()`` (e.g. averaging gradients across ranks by hand, on the unscaled gradients), clip the
    global gradient norm of ``parameters`` (after unscaling), step.

    Returns the gradient norm before clipping when ``clip_grad`` is set (for logging), else ``None``: a float, or
    with ``as_tensor`` the 0-d tensor on the gradients' device (reading it as a float makes the host wait for the
    GPU, which a training loop should do only on the steps it logs)."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if after_backward is not None:
        after_backward()
    grad_norm = None
    if clip_grad:
        grad_norm = torch.nn.utils.clip_grad_norm_(list(parameters), float(clip_grad))
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    if grad_norm is None or as_tensor:
        return grad_norm
    return float(grad_norm)

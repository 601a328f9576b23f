"""Atomic checkpoint writing, safe loading and a single ``restart_from_checkpoint``."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import torch

from ..errors import UnsafeCheckpointError

__all__ = ["UnsafeCheckpointError", "atomic_save", "safe_load", "restart_from_checkpoint", "stop_requests"]

log = logging.getLogger(__name__)


def atomic_save(obj: Any, path: "str | os.PathLike") -> None:
    """``torch.save`` to a temporary file in the same folder, flushed to disk, then renamed over ``path``:
    a crash at any moment leaves either the old file or the new one, never a truncated one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".partial-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def safe_load(path: "str | os.PathLike", map_location: "str | torch.device" = "cpu") -> Dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (tensors and plain Python containers only).

    Raises:
        UnsafeCheckpointError: the file needs arbitrary unpickling; the message says why that is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises UnpicklingError (or RuntimeError) for disallowed globals
        raise UnsafeCheckpointError(
            f"{path}: refused to load: it holds objects other than tensors and plain containers, and "
            f"unpickling them could run arbitrary code ({err.__class__.__name__}: {str(err).splitlines()[0]})"
        ) from None


def restart_from_checkpoint(path: "str | os.PathLike | Dict[str, Any]", run_variables: Optional[Dict[str, Any]] = None,
                            map_location: "str | torch.device" = "cpu", **stateful: Any) -> Dict[str, Any]:
    """Restore every stateful object from one checkpoint (a path, or a dict already read with
    :func:`safe_load`).

    Each keyword argument names an entry of the checkpoint and an object with ``load_state_dict`` (model,
    optimiser, scaler, loss). Models are loaded strictly: a key mismatch is an error. Entries named in
    ``run_variables`` (epoch, step...) are copied into that dict.

    Returns:
        The whole checkpoint dict.
    """
    ckpt = path if isinstance(path, dict) else safe_load(path, map_location=map_location)
    path = "checkpoint" if isinstance(path, dict) else path
    for name, obj in stateful.items():
        if obj is None:
            continue
        if name not in ckpt:
            raise KeyError(f"{path}: checkpoint has no entry {name!r} (has: {', '.join(sorted(ckpt))})")
        if isinstance(obj, torch.nn.Module):
            obj.load_state_dict(ckpt[name], strict=True)  # raises, listing missing and unexpected keys
        else:
            obj.load_state_dict(ckpt[name])
    if run_variables is not None:
        for key in run_variables:
            if key in ckpt:
                run_variables[key] = ckpt[key]
    log.info("restarted from %s", path)
    return ckpt


@contextlib.contextmanager
def stop_requests(what: str = "a checkpoint") -> Iterator[List[int]]:
    """Turn SIGTERM/SIGINT into a request the training loop honours at the end of its current step.

    Yields a list that receives the signal numbers; the loop saves its state and exits when it is non-empty.
    The previous handlers are restored on exit, whatever happens inside.
    """
    received: List[int] = []

    def on_signal(signum, _frame) -> None:
        received.append(signum)
        log.warning("received %s: saving %s after this step", signal.Signals(signum).name, what)

    handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield received
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)

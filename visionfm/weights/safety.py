"""Safe reading of pickled PyTorch checkpoints (``.pth`` / ``.pt``).

A ``.pth`` file is a pickle, and unpickling can import and call any function named in the file: a
checkpoint downloaded from the internet can run ``os.system`` the moment it is loaded. So every checkpoint is
read with ``torch.load(weights_only=True)``, which only rebuilds tensors and plain containers, plus an
allow-list of the exact extra classes that published checkpoints need (VisionFM's, DINO's and RETFound's
training checkpoints hold a pickled ``argparse.Namespace`` under ``args``). Anything else is refused with a
:class:`UnsafeCheckpointError` that names what the file wanted to import; full unpickling happens only when
the caller opts in (``allow_pickle=True``, ``--trust-pickle`` on the command line).

Example:
    >>> from visionfm.weights.safety import ALLOWED_GLOBALS
    >>> [f"{c.__module__}.{c.__qualname__}" for c in ALLOWED_GLOBALS]
    ['argparse.Namespace']
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import re
from pathlib import Path
from typing import Any, List

import torch

from ..errors import UnsafeCheckpointError
from .export import WeightsFileError

__all__ = ["ALLOWED_GLOBALS", "UnsafeCheckpointError", "load_checkpoint", "unsafe_globals"]

log = logging.getLogger(__name__)

#: Classes that may be rebuilt besides tensors and plain containers. ``argparse.Namespace`` only sets
#: attributes from a dict whose values are themselves checked, so it cannot smuggle a call in.
ALLOWED_GLOBALS = (argparse.Namespace,)

_ALLOWED_NAMES = {f"{c.__module__}.{c.__qualname__}" for c in ALLOWED_GLOBALS}
_GLOBAL_IN_MESSAGE = re.compile(r"GLOBAL ([\w.]+)")


def unsafe_globals(path: "str | os.PathLike") -> List[str]:
    """The importable names a checkpoint refers to beyond what ``weights_only`` and :data:`ALLOWED_GLOBALS`
    accept, found by scanning the pickle without running it (empty when it cannot be scanned)."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # legacy (non-zip) files cannot be scanned; the load itself still refuses them
        return []
    return sorted(name for name in found if name not in _ALLOWED_NAMES)


def load_checkpoint(path: "str | os.PathLike", allow_pickle: bool = False,
                    map_location: "str | torch.device" = "cpu") -> Any:
    """Load a ``.pth``/``.pt`` checkpoint with ``weights_only=True`` and the :data:`ALLOWED_GLOBALS`.

    Args:
        path: The checkpoint file.
        allow_pickle: Fully unpickle the file (``weights_only=False``). Only for files from a source you
            trust: a pickle can run arbitrary code while it is loaded.
        map_location: Where tensors are placed.

    Raises:
        FileNotFoundError: no such file.
        UnsafeCheckpointError: the file needs classes or functions outside the allow-list; the message names
            them, explains the risk and the opt-in.
        ValueError: the file is not a readable PyTorch checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if allow_pickle:
        log.warning("%s: unpickling without restrictions (allow_pickle / --trust-pickle): this can run any code "
                    "the file contains; only do it for files from a trusted source", path)
        return torch.load(path, map_location=map_location, weights_only=False)
    try:
        with torch.serialization.safe_globals(list(ALLOWED_GLOBALS)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        message = str(err)
        names = unsafe_globals(path) or sorted(set(_GLOBAL_IN_MESSAGE.findall(message)) - _ALLOWED_NAMES)
        if not names and "global" not in message.lower():
            raise WeightsFileError(f"{path}: not a readable PyTorch checkpoint ({message.strip().splitlines()[-1]})") \
                from None
        raise UnsafeCheckpointError(
            f"{path}: refused to load: the checkpoint asks to import and call {', '.join(names) or 'objects'} "
            f"while it is unpickled. Unpickling runs whatever a file names, so a checkpoint from an unknown "
            f"source could execute arbitrary code on this machine. Only tensors, plain containers and "
            f"{', '.join(sorted(_ALLOWED_NAMES))} are accepted. If you trust where the file comes from, opt in "
            f"with --trust-pickle (python -m visionfm.weights convert ...) or allow_pickle=True "
            f"(load_encoder / load_foreign_checkpoint), ideally once, to convert it to safetensors.") from None
    except Exception as err:  # truncated or foreign bytes fail in many ways inside the unpickler
        first = (str(err).strip().splitlines() or [""])[0]
        raise WeightsFileError(f"{path}: not a readable PyTorch checkpoint ({err.__class__.__name__}: {first})") from None

"""Our weights format: a safetensors file of a timm ViT ``state_dict`` whose header carries the metadata
(modality, arch, patch size, image size, normalisation, training summary), plus ``index.json`` in a
weights folder with each file's metadata and sha256."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..errors import VisionFMError

__all__ = ["METADATA_KEY", "INDEX_NAME", "WeightsFileError", "sha256_file", "save_encoder", "read_metadata",
           "load_safetensors", "update_index", "read_index"]

METADATA_KEY = "visionfm"
INDEX_NAME = "index.json"


def sha256_file(path: "str | os.PathLike") -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_encoder(state_dict: Mapping[str, torch.Tensor], path: "str | os.PathLike", metadata: Mapping[str, Any],
                 dtype: Optional[torch.dtype] = None) -> str:
    """Write an encoder ``state_dict`` as safetensors (atomically) with JSON metadata in the header.

    Args:
        dtype: Cast floating-point tensors to this type (``torch.float16`` for shipped weights).

    Returns:
        The file's sha256.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for key, value in state_dict.items():
        value = value.detach().cpu()
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        tensors[key] = value.contiguous()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".partial-", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={METADATA_KEY: json.dumps(dict(metadata), sort_keys=True)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return sha256_file(path)


class WeightsFileError(VisionFMError, ValueError):
    """A weights file that cannot be read (truncated, random bytes, another format); the message names it."""


def _unreadable(path: "str | os.PathLike", err: Exception) -> WeightsFileError:
    return WeightsFileError(f"{path}: not a readable safetensors file ({err}); is it truncated or in another format?")


def read_metadata(path: "str | os.PathLike") -> Dict[str, Any]:
    """The metadata stored in a safetensors file's header (empty when it has none of ours).

    Raises:
        WeightsFileError: the file is not a readable safetensors file.
    """
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = (fh.metadata() or {}).get(METADATA_KEY)
    except (SafetensorError, OSError, ValueError) as err:
        raise _unreadable(path, err) from None
    try:
        return json.loads(raw) if raw else {}
    except json.JSONDecodeError as err:
        raise WeightsFileError(f"{path}: its {METADATA_KEY!r} metadata is not valid JSON ({err})") from None


def load_safetensors(path: "str | os.PathLike") -> Dict[str, torch.Tensor]:
    """All tensors of a safetensors file (on the CPU).

    Raises:
        WeightsFileError: the file is not a readable safetensors file.
    """
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise _unreadable(path, err) from None


def read_index(weights_dir: "str | os.PathLike") -> Dict[str, Dict[str, Any]]:
    index = Path(weights_dir) / INDEX_NAME
    if not index.is_file():
        return {}
    return json.loads(index.read_text())


def update_index(weights_dir: "str | os.PathLike", filename: str, metadata: Mapping[str, Any], sha256: str) -> Path:
    """Add or replace one entry of ``<weights_dir>/index.json``."""
    weights_dir = Path(weights_dir)
    index = read_index(weights_dir)
    index[filename] = {**dict(metadata), "sha256": sha256}
    target = weights_dir / INDEX_NAME
    tmp = target.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(dict(sorted(index.items())), indent=2) + "\n")
    os.replace(tmp, target)
    return target

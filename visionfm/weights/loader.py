"""``load_encoder``: the one way every downstream script gets a modality's encoder."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer

from ..modalities import get_modality
from ..models.vit import create_encoder, interpolate_pos_embed
from .export import read_index, read_metadata

__all__ = ["DEFAULT_WEIGHTS_DIR", "EncoderInfo", "WeightsNotFoundError", "resolve_weights", "load_encoder"]

log = logging.getLogger(__name__)

#: ``weights/`` at the top of the checkout.
DEFAULT_WEIGHTS_DIR = Path(__file__).resolve().parents[2] / "weights"


class WeightsNotFoundError(FileNotFoundError):
    """No weights file for the request; the message lists what is available and how to get more."""


@dataclass
class EncoderInfo:
    """What a loaded encoder is: where it came from and how its inputs must be normalised."""

    modality: str
    arch: str
    patch_size: int
    img_size: int
    embed_dim: int
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    source: Optional[str] = None  # file path, or None for a random initialisation
    metadata: Dict[str, Any] = field(default_factory=dict)

    @property
    def pretrained(self) -> bool:
        return self.source is not None


def _weights_dir(weights_dir: "str | os.PathLike | None") -> Path:
    return Path(weights_dir or os.environ.get("VISIONFM_WEIGHTS") or DEFAULT_WEIGHTS_DIR)


def resolve_weights(modality: str, arch: Optional[str] = None,
                    weights_dir: "str | os.PathLike | None" = None) -> Path:
    """Find ``<weights_dir>/<modality>_<arch>.safetensors`` through ``index.json`` (or the file name).

    Raises:
        WeightsNotFoundError: listing the available files and how to train or convert weights.
    """
    m = get_modality(modality)
    wdir = _weights_dir(weights_dir)
    index = read_index(wdir)
    candidates = [name for name, meta in sorted(index.items())
                  if meta.get("modality") == m.name and (arch is None or meta.get("arch") == arch)]
    if not candidates and wdir.is_dir():
        pattern = f"{m.name}_{arch}.safetensors" if arch else f"{m.name}_*.safetensors"
        candidates = sorted(p.name for p in wdir.glob(pattern))
    for name in candidates:
        if (wdir / name).is_file():
            return wdir / name
    available = sorted(p.name for p in wdir.glob("*.safetensors")) if wdir.is_dir() else []
    raise WeightsNotFoundError(
        f"no {m.name} encoder weights{' for ' + arch if arch else ''} in {wdir} "
        f"(available: {', '.join(available) or 'none'}). Pass --weights PATH to a checkpoint, train one with "
        f"'python pretrain/dino.py --modality {m.name} --data DIR --export-to {wdir}', or convert a published "
        f"checkpoint with 'python -m visionfm.weights convert SRC --modality {m.name}'.")


def load_encoder(modality: str, weights: "str | os.PathLike | None" = None, arch: Optional[str] = None,
                 img_size: Optional[int] = None, weights_dir: "str | os.PathLike | None" = None,
                 random_init: bool = False, drop_path_rate: float = 0.0) -> Tuple[VisionTransformer, EncoderInfo]:
    """Build a modality's ViT encoder with its weights.

    Resolution order: an explicit ``weights`` path; ``<weights_dir>/<modality>_<arch>.safetensors`` from the
    folder's ``index.json``; otherwise a :class:`WeightsNotFoundError`. With ``random_init`` the encoder is
    randomly initialised (for baselines) with the same architecture the shipped weights would have.

    Args:
        modality: Modality name or alias.
        weights: Path to a weights file.
        arch: Requested architecture (must match the file's).
        img_size: Image size the encoder will mostly see; the stored position embedding is resized to it.
        weights_dir: The weights folder (default: ``$VISIONFM_WEIGHTS`` or the checkout's ``weights/``).
        random_init: Skip loading weights.
        drop_path_rate: Stochastic depth for fine-tuning.

    Returns:
        ``(encoder, info)``; ``info.mean``/``info.std`` are the normalisation the weights were trained with.
    """
    m = get_modality(modality)
    if random_init:
        arch = arch or "vit_tiny"
        size = img_size or 224
        encoder = create_encoder(arch, 16, size, drop_path_rate=drop_path_rate)
        return encoder, EncoderInfo(m.name, arch.split("_patch")[0], encoder.patch_embed.patch_size[0], size,
                                    encoder.embed_dim, tuple(m.mean), tuple(m.std), None, {})
    path = Path(weights) if weights else resolve_weights(m.name, arch, weights_dir)
    if not path.is_file():
        raise WeightsNotFoundError(f"weights file not found: {path}")
    if path.suffix != ".safetensors":
        from .formats import load_foreign_checkpoint  # noqa: PLC0415 - optional heavier path

        state, meta = load_foreign_checkpoint(path, modality=m.name)
    else:
        state = load_file(str(path))
        meta = read_metadata(path)
    return _build_from_state(state, meta, m.name, path, arch, img_size, drop_path_rate)


def _build_from_state(state: Dict[str, torch.Tensor], meta: Dict[str, Any], modality: str, path: Path,
                      arch: Optional[str], img_size: Optional[int], drop_path_rate: float):
    if "pos_embed" not in state or "patch_embed.proj.weight" not in state:
        raise ValueError(f"{path}: not a ViT encoder state (no pos_embed / patch_embed.proj.weight keys)")
    embed_dim = state["pos_embed"].shape[-1]
    patch = state["patch_embed.proj.weight"].shape[-1]
    file_arch = meta.get("arch") or {192: "vit_tiny", 384: "vit_small", 768: "vit_base", 1024: "vit_large"}.get(embed_dim)
    if arch and file_arch and arch.split("_patch")[0] != file_arch:
        raise ValueError(f"{path}: holds a {file_arch} encoder, but {arch} was requested")
    stored_tokens = state["pos_embed"].shape[1] - 1
    stored_grid = int(round(stored_tokens ** 0.5))
    stored_size = stored_grid * patch
    size = img_size or int(meta.get("img_size") or stored_size)
    size = size // patch * patch
    encoder = create_encoder(file_arch, patch, size, drop_path_rate=drop_path_rate)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    new_grid = size // patch
    if new_grid != stored_grid:
        state["pos_embed"] = interpolate_pos_embed(state["pos_embed"], (new_grid, new_grid), 1)
    result = encoder.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{path}: key mismatch loading a {file_arch} encoder: missing {result.missing_keys}, "
                         f"unexpected {result.unexpected_keys}")
    m = get_modality(meta.get("modality") or modality)
    mean = tuple(meta.get("mean") or m.mean)
    std = tuple(meta.get("std") or m.std)
    info = EncoderInfo(m.name, file_arch, patch, size, embed_dim, mean, std, str(path), dict(meta))
    log.info("loaded %s %s encoder from %s (%s)", m.name, file_arch, path, meta.get("data", "no metadata"))
    return encoder, info

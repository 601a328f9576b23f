"""``load_encoder``: the one way every downstream script gets a modality's encoder."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from timm.models.vision_transformer import VisionTransformer

from ..errors import VisionFMError
from ..modalities import get_modality
from ..models.vit import create_encoder, interpolate_pos_embed
from .export import load_safetensors, read_index, read_metadata
from .formats import KeyReport, WeightsFormatError, build_encoder, infer_spec, read_foreign_checkpoint

__all__ = ["DEFAULT_WEIGHTS_DIR", "EncoderInfo", "WeightsNotFoundError", "resolve_weights", "load_encoder"]

log = logging.getLogger(__name__)

#: ``weights/`` at the top of the checkout.
DEFAULT_WEIGHTS_DIR = Path(__file__).resolve().parents[2] / "weights"


class WeightsNotFoundError(VisionFMError, FileNotFoundError):
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
    key_report: Optional[KeyReport] = None  # what happened to every checkpoint key (None: random init)

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
        # Other artefacts share the <modality>_ prefix (CLIP heads: <modality>_clip.safetensors).
        candidates = sorted(p.name for p in wdir.glob(pattern) if not p.name.endswith("_clip.safetensors"))
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
                 random_init: bool = False, drop_path_rate: float = 0.0, *, allow_pickle: bool = False,
                 checkpoint_key: Optional[str] = None,
                 num_heads: Optional[int] = None) -> Tuple[VisionTransformer, EncoderInfo]:
    """Build a modality's ViT encoder with its weights.

    Resolution order: an explicit ``weights`` path; ``<weights_dir>/<modality>_<arch>.safetensors`` from the
    folder's ``index.json``; otherwise a :class:`WeightsNotFoundError`. With ``random_init`` the encoder is
    randomly initialised (for baselines) with the same architecture the shipped weights would have.

    Besides our safetensors export, ``weights`` may be a foreign checkpoint (VisionFM's ``VFM_*_weights.pth``,
    DINO / iBOT / DINOv2 / RETFound-MAE checkpoints, timm state dicts; see :mod:`visionfm.weights.formats`).
    Every load compares the mapped keys with the encoder's one by one: keys a layout knows to drop (projection
    heads, decoder, mask tokens) are reported, and any other missing or unexpected key is an error. Pickled
    files are read with ``weights_only=True`` and a small allow-list (:mod:`visionfm.weights.safety`).

    Args:
        modality: Modality name or alias.
        weights: Path to a weights file.
        arch: Requested architecture (must match the file's).
        img_size: Image size the encoder will mostly see; the stored position embedding is resized to it.
        weights_dir: The weights folder (default: ``$VISIONFM_WEIGHTS`` or the checkout's ``weights/``).
        random_init: Skip loading weights.
        drop_path_rate: Stochastic depth for fine-tuning.
        allow_pickle: Fully unpickle a ``.pth`` that the allow-list refuses (only for trusted files).
        checkpoint_key: The entry of a training checkpoint holding the encoder (default ``teacher``).
        num_heads: Attention heads, for non-standard widths whose metadata does not name them.

    Returns:
        ``(encoder, info)``; ``info.mean``/``info.std`` are the normalisation the weights were trained with and
        ``info.key_report`` says what happened to every key.
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
    meta = read_metadata(path) if path.suffix == ".safetensors" else {}
    if meta:
        state = load_safetensors(path)
        report = KeyReport("visionfm")
    else:
        foreign = read_foreign_checkpoint(path, m.name, allow_pickle=allow_pickle, checkpoint_key=checkpoint_key,
                                          num_heads=num_heads)
        state, meta, report = foreign.state, foreign.metadata, foreign.report
    return _build_from_state(state, meta, m.name, path, arch, img_size, drop_path_rate, report, num_heads)


def _build_from_state(state: Dict[str, torch.Tensor], meta: Dict[str, Any], modality: str, path: Path,
                      arch: Optional[str], img_size: Optional[int], drop_path_rate: float,
                      report: Optional[KeyReport] = None, num_heads: Optional[int] = None):
    report = report or KeyReport(meta.get("source_format", "visionfm"))
    spec = infer_spec(state, meta, num_heads=num_heads, where=str(path))
    file_arch = spec.arch
    stated = meta.get("arch")
    if stated and stated.split("_patch")[0] != file_arch:
        raise WeightsFormatError(f"{path}: metadata says {stated}, but the weights are a {file_arch} "
                         f"({spec.embed_dim} wide, {spec.depth} blocks, {spec.num_heads} heads)")
    if arch and arch.split("_patch")[0] != file_arch:
        raise WeightsFormatError(f"{path}: holds a {file_arch} encoder, but {arch} was requested")
    patch = spec.patch_size
    size = img_size or spec.img_size
    if size % patch:
        log.warning("%s: image size %d is not a multiple of the patch size %d; using %d", path, size, patch,
                    size // patch * patch)
    size = size // patch * patch
    encoder = build_encoder(spec, size, drop_path_rate=drop_path_rate)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    new_grid = size // patch
    if new_grid != spec.grid:
        state["pos_embed"] = interpolate_pos_embed(state["pos_embed"], (new_grid, new_grid), spec.num_pos_prefix)
    _load_exactly(encoder, state, path, file_arch, report)
    m = get_modality(meta.get("modality") or modality)
    mean = tuple(meta.get("mean") or m.mean)
    std = tuple(meta.get("std") or m.std)
    info = EncoderInfo(m.name, file_arch, patch, size, spec.embed_dim, mean, std, str(path), dict(meta), report)
    log.info("loaded %s %s encoder from %s (%s); keys: %s", m.name, file_arch, path,
             meta.get("data", "no metadata"), report.summary())
    return encoder, info


def _load_exactly(encoder: VisionTransformer, state: Dict[str, torch.Tensor], path: Path, arch: str,
                  report: KeyReport) -> None:
    """Compare key sets and shapes, record them in ``report``, fail on any difference, then load strictly."""
    expected = encoder.state_dict()
    report.missing = sorted(set(expected) - set(state))
    report.unexpected = sorted(set(state) - set(expected))
    report.mapped = len(set(state) & set(expected))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs encoder {tuple(expected[k].shape)}"
              for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]
    if report.missing or report.unexpected or shapes:
        dropped = "; ".join(f"{why}: {len(keys)}" for why, keys in sorted(report.dropped.items())) or "none"
        raise WeightsFormatError(f"{path}: does not map exactly onto a {arch} encoder ({report.source_format} layout): "
                         f"missing {report.missing or 'none'}; unexpected {report.unexpected or 'none'}; "
                         f"shape mismatches {shapes or 'none'}; known keys dropped: {dropped}")
    encoder.load_state_dict(state, strict=True)

"""Foreign checkpoint formats mapped onto our timm ViT.

The field's ViT encoders share timm's block names (``blocks.N.attn.qkv``, ``norm1``, ``mlp.fc1``,
``patch_embed.proj``, ``cls_token``, ``pos_embed``, final ``norm``), but wrap them differently:

============================  ====================================================================
layout                        what it holds
============================  ====================================================================
``visionfm-official``         VisionFM's ``VFM_<Modality>_weights.pth``: iBOT training checkpoint,
                              ``teacher``/``student`` with ``backbone.*`` and ``head.*`` keys,
                              ``args`` (argparse Namespace with ``modality``), ``optimizer``...
``ibot`` / ``dino``           the same wrapping (``module.`` from DDP, ``backbone.`` from the multi-crop
                              wrapper); iBOT adds ``masked_embed``
``mae``                       RETFound / MAE: ``model`` with the encoder, ``decoder_*`` and ``mask_token``;
                              fine-tuned ones have ``fc_norm`` (global pooling) and a ``head``
``dinov2``                    layer scale ``ls1.gamma``/``ls2.gamma``, ``mask_token``, optionally
                              ``register_tokens``; training checkpoints add ``dino_head``/``ibot_head``
``timm``                      a plain timm (or DINO backbone-only) state dict, maybe with a classifier
``visionfm``                  our own safetensors export (nothing to map)
============================  ====================================================================

Each layout has a short list of keys it knows to drop (projection heads, decoder, mask tokens) with the
reason; every other key must land on a parameter of the timm encoder, which :func:`visionfm.weights.loader`
checks key by key before a strict load. The encoder's shape (width, depth, heads, patch, grid, layer scale,
registers, pooling) is read from the state dict and the checkpoint's own arguments, and the normalisation the
weights were trained with travels in the metadata.

Example:
    >>> import torch
    >>> state = {"module.backbone.blocks.0.norm1.weight": torch.ones(4),
    ...          "module.head.last_layer.weight": torch.ones(2, 4)}
    >>> mapped, report = map_to_timm(state, "dino")
    >>> sorted(mapped), report.dropped
    (['blocks.0.norm1.weight'], {'DINO/iBOT projection head': ['head.last_layer.weight']})
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from timm.models.vision_transformer import VisionTransformer

from ..modalities import MODALITIES, get_modality
from ..models.vit import ARCHS, create_encoder
from .export import WeightsFileError, load_safetensors, read_metadata
from .safety import load_checkpoint

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "VISIONFM_NORMALISATION", "FOREIGN_FORMATS", "KeyReport", "ViTSpec",
           "ForeignCheckpoint", "read_foreign_checkpoint", "load_foreign_checkpoint", "map_to_timm", "infer_spec",
           "build_encoder", "arch_name", "WeightsFormatError"]

log = logging.getLogger(__name__)


class WeightsFormatError(WeightsFileError):
    """A checkpoint whose layout, shapes or metadata do not map onto our encoder; the message names the file."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: VisionFM's published per-modality normalisation (its pretraining code's statistics table, rounded to 4
#: decimals), keyed by our modality names.
VISIONFM_NORMALISATION: Dict[str, Tuple[Tuple[float, float, float], Tuple[float, float, float]]] = {
    "cfp": ((0.4237, 0.2609, 0.1284), (0.2948, 0.2017, 0.1367)),
    "oct": ((0.2109, 0.2109, 0.2109), (0.1760, 0.1760, 0.1760)),
    "ffa": ((0.2020, 0.2021, 0.2020), (0.1741, 0.1740, 0.1740)),
    "ubm": ((0.0961, 0.0961, 0.0961), (0.2098, 0.2098, 0.2098)),
    "bscan": ((0.0599, 0.0598, 0.0567), (0.1543, 0.1550, 0.1446)),
    "external": ((0.4936, 0.3632, 0.2596), (0.3200, 0.2711, 0.2199)),
    "slitlamp": ((0.5557, 0.4029, 0.3886), (0.2652, 0.2331, 0.2390)),
    "mri": ((0.1737, 0.1737, 0.1737), (0.1620, 0.1620, 0.1620)),
}

#: VisionFM's modality spellings (``--modality`` of its pretraining, ``VFM_<Modality>_weights.pth``).
_VISIONFM_NAMES = {"fundus": "cfp", "oct": "oct", "ffa": "ffa", "ubm": "ubm", "ultrasound": "bscan",
                   "external": "external", "externaleye": "external", "slitlamp": "slitlamp",
                   "silt-lamp": "slitlamp", "siltlamp": "slitlamp", "slit-lamp": "slitlamp", "mri": "mri"}

#: Width, depth and heads of named ViTs (ours plus the larger ones published checkpoints use).
_NAMED_ARCHS: Dict[str, Tuple[int, int, int]] = {
    **{name: (a["embed_dim"], a["depth"], a["num_heads"]) for name, a in ARCHS.items()},
    "vit_huge": (1280, 32, 16),
    "vit_giant": (1536, 40, 24),
}
#: Heads of the standard widths (head dimension 64); any other width needs ``num_heads`` from the
#: checkpoint's metadata or the caller, because the weights do not show how ``qkv`` is split.
_HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1536: 24}

# (pattern, reason) of keys a layout knows to drop.
_DINO_HEAD = (r"^head\.", "DINO/iBOT projection head")
_IBOT_MASK = (r"^masked_embed$", "iBOT mask embedding (pretraining only)")
_DINOV2_HEADS = (r"^(dino_head|ibot_head)\.", "DINOv2 projection heads")
_DINOV2_MASK = (r"^mask_token$", "DINOv2 mask token (pretraining only)")
_MAE_DECODER = (r"^decoder_", "MAE decoder")
_MAE_MASK = (r"^mask_token$", "MAE mask token (pretraining only)")
_CLASSIFIER = (r"^head\.(weight|bias)$", "classifier head")

#: Layouts and the keys each knows to drop.
FOREIGN_FORMATS: Dict[str, List[Tuple[str, str]]] = {
    "visionfm": [],
    "visionfm-official": [_DINO_HEAD, _IBOT_MASK],
    "ibot": [_DINO_HEAD, _IBOT_MASK],
    "dino": [_DINO_HEAD],
    "dinov2": [_DINOV2_HEADS, _DINOV2_MASK],
    "mae": [_MAE_DECODER, _MAE_MASK, _CLASSIFIER],
    "timm": [_CLASSIFIER],
}
_OBJECTIVE = {"visionfm-official": "ibot", "ibot": "ibot", "dino": "dino", "dinov2": "dinov2", "mae": "mae",
              "timm": "unknown", "visionfm": "unknown"}
_PREFIXES = ("module.", "_orig_mod.")
_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")


# ----------------------------------------------------------------------------------------------- reports
@dataclass
class KeyReport:
    """What happened to every key of a checkpoint on its way into the encoder.

    Attributes:
        source_format: The layout (a key of :data:`FOREIGN_FORMATS`).
        mapped: Number of tensors that became encoder parameters.
        dropped: Keys the layout knows to drop, by reason.
        missing: Encoder parameters the checkpoint did not provide.
        unexpected: Checkpoint keys that are neither encoder parameters nor known drops.
    """

    source_format: str
    mapped: int = 0
    dropped: Dict[str, List[str]] = field(default_factory=dict)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.unexpected

    def summary(self) -> str:
        dropped = "; ".join(f"{reason}: {len(keys)}" for reason, keys in sorted(self.dropped.items())) or "none"
        return (f"{self.source_format}: {self.mapped} tensors mapped; dropped (known) {dropped}; "
                f"missing {self.missing or 'none'}; unexpected {self.unexpected or 'none'}")

    def as_metadata(self) -> Dict[str, Any]:
        return {"source_format": self.source_format, "mapped": self.mapped,
                "dropped": {reason: len(keys) for reason, keys in sorted(self.dropped.items())}}


# ----------------------------------------------------------------------------------------- architecture
@dataclass(frozen=True)
class ViTSpec:
    """The shape of a ViT encoder as far as it matters for its ``state_dict`` and its forward pass.

    Attributes:
        grid: Side of the stored (square) position-embedding grid; ``grid * patch_size`` is the image size
            the weights were trained at.
        layer_scale: Blocks have ``ls1``/``ls2`` layer scale (DINOv2, DeiT-3).
        no_embed_class: The position embedding covers patches only (timm's layout for DINOv2 registers).
        global_pool: ``token`` (CLS) or ``avg`` (mean of patch tokens, with ``fc_norm``: fine-tuned MAE).
    """

    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    grid: int
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    qk_norm: bool = False
    layer_scale: bool = False
    class_token: bool = True
    reg_tokens: int = 0
    no_embed_class: bool = False
    pre_norm: bool = False
    global_pool: str = "token"
    fc_norm: bool = False

    @property
    def arch(self) -> str:
        return arch_name(self.embed_dim, self.depth, self.num_heads)

    @property
    def img_size(self) -> int:
        return self.grid * self.patch_size

    @property
    def num_pos_prefix(self) -> int:
        """Prefix tokens (CLS, registers) that have an entry in the position embedding."""
        return 0 if self.no_embed_class else int(self.class_token) + self.reg_tokens

    def timm_kwargs(self) -> Dict[str, Any]:
        """Keyword arguments for ``timm.models.vision_transformer.VisionTransformer`` beyond the defaults
        (besides ``img_size``, ``patch_size``, ``num_classes=0`` and ``dynamic_img_size=True``)."""
        kwargs: Dict[str, Any] = {"embed_dim": self.embed_dim, "depth": self.depth, "num_heads": self.num_heads}
        if self.mlp_ratio != 4.0:
            kwargs["mlp_ratio"] = self.mlp_ratio
        if not self.qkv_bias:
            kwargs["qkv_bias"] = False
        if self.qk_norm:
            kwargs["qk_norm"] = True
        if self.layer_scale:
            kwargs["init_values"] = 1e-5  # any non-zero value creates the LayerScale; the weights replace it
        if not self.class_token:
            kwargs["class_token"] = False
        if self.reg_tokens:
            kwargs["reg_tokens"] = self.reg_tokens
        if self.no_embed_class:
            kwargs["no_embed_class"] = True
        if self.pre_norm:
            kwargs["pre_norm"] = True
        if self.global_pool != "token":
            kwargs["global_pool"] = self.global_pool
        if self.fc_norm:
            kwargs["fc_norm"] = True
        return kwargs

    def to_metadata(self) -> Dict[str, Any]:
        return {"arch": self.arch, "patch_size": self.patch_size, "img_size": self.img_size,
                "embed_dim": self.embed_dim, "depth": self.depth, "num_heads": self.num_heads,
                "timm_kwargs": self.timm_kwargs()}


def arch_name(embed_dim: int, depth: int, num_heads: int) -> str:
    """``vit_tiny``... for the named sizes, ``vit_tiny_d2`` for a named width at another depth, else
    ``vit_e<width>_d<depth>_h<heads>``."""
    for name, dims in _NAMED_ARCHS.items():
        if dims == (embed_dim, depth, num_heads):
            return name
    for name, (width, _, heads) in _NAMED_ARCHS.items():
        if (width, heads) == (embed_dim, num_heads):
            return f"{name}_d{depth}"
    return f"vit_e{embed_dim}_d{depth}_h{num_heads}"


def _base_arch(name: Optional[str]) -> Optional[str]:
    """``vit_base`` from ``vit_base``, ``vit_base_patch16_224``, ``mae_vit_large_patch16``, ``deit_small``."""
    if not name:
        return None
    name = str(name).lower().replace("deit_", "vit_")
    match = re.search(r"vit_(tiny|small|base|large|huge|giant)", name)
    return f"vit_{match.group(1)}" if match else None


def _resolve_heads(embed_dim: int, depth: int, meta: Mapping[str, Any], num_heads: Optional[int],
                   where: str) -> int:
    if num_heads is not None:
        heads = int(num_heads)
    elif meta.get("num_heads"):
        heads = int(meta["num_heads"])
    elif _base_arch(meta.get("arch")) in _NAMED_ARCHS and _NAMED_ARCHS[_base_arch(meta.get("arch"))][0] == embed_dim:
        heads = _NAMED_ARCHS[_base_arch(meta.get("arch"))][2]
    elif embed_dim in _HEADS_BY_WIDTH:
        heads = _HEADS_BY_WIDTH[embed_dim]
    else:
        raise WeightsFormatError(f"{where}: cannot tell how many attention heads this {embed_dim}-wide ViT has (the "
                         f"weights do not show how qkv is split and no metadata names it); pass num_heads= "
                         f"(--num-heads N on the command line)")
    if heads <= 0 or embed_dim % heads:
        raise WeightsFormatError(f"{where}: {heads} heads do not divide the embedding width {embed_dim}")
    return heads


def _square_side(n: int) -> Optional[int]:
    side = math.isqrt(n) if n > 0 else 0
    return side if side > 0 and side * side == n else None


def infer_spec(state: Mapping[str, torch.Tensor], meta: Optional[Mapping[str, Any]] = None,
               num_heads: Optional[int] = None, where: str = "checkpoint") -> ViTSpec:
    """Read a ViT's shape from its timm-layout ``state_dict`` (and ``meta`` for what the weights cannot
    show: the number of heads, and ``no_embed_class`` where the token count is ambiguous).

    Raises:
        ValueError: naming ``where`` and what does not fit a timm ViT.
    """
    meta = dict(meta or {})
    if "patch_embed.proj.weight" not in state or "pos_embed" not in state:
        raise WeightsFormatError(f"{where}: not a ViT encoder state (no pos_embed / patch_embed.proj.weight keys; "
                         f"first keys: {sorted(state)[:8]})")
    proj = state["patch_embed.proj.weight"]
    if proj.ndim != 4 or proj.shape[-1] != proj.shape[-2]:
        raise WeightsFormatError(f"{where}: patch_embed.proj.weight has shape {tuple(proj.shape)}; expected a square "
                         f"convolution (D, 3, p, p)")
    if proj.shape[1] != 3:
        raise WeightsFormatError(f"{where}: the patch embedding takes {proj.shape[1]} input channels; encoders here take 3 "
                         f"(grey images are repeated)")
    embed_dim, patch = int(proj.shape[0]), int(proj.shape[-1])
    if any(".mlp.w12." in k or ".mlp.w3." in k for k in state):
        raise WeightsFormatError(f"{where}: SwiGLU MLP blocks (mlp.w12 / mlp.w3, as in DINOv2 ViT-g) are not supported: "
                         f"our encoders are timm ViTs with a GELU MLP; use a DINOv2 ViT-S/B/L checkpoint")
    indices = sorted({int(m.group(1)) for k in state if (m := re.match(r"^blocks\.(\d+)\.", k))})
    if not indices or indices != list(range(len(indices))):
        raise WeightsFormatError(f"{where}: transformer blocks are missing or not numbered 0..N-1 (found {indices[:6]}...)")
    depth = len(indices)
    if "blocks.0.mlp.fc1.weight" not in state:
        raise WeightsFormatError(f"{where}: blocks.0.mlp.fc1.weight is missing: not a timm-layout ViT block")
    mlp_ratio = state["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim
    heads = _resolve_heads(embed_dim, depth, meta, num_heads, where)

    class_token = "cls_token" in state
    reg_tokens = int(state["reg_token"].shape[1]) if "reg_token" in state else 0
    prefix = int(class_token) + reg_tokens
    tokens = int(state["pos_embed"].shape[1])
    if "no_embed_class" in meta:
        no_embed_class = bool(meta["no_embed_class"])
    else:
        no_embed_class = _square_side(tokens - prefix) is None and _square_side(tokens) is not None
    grid = _square_side(tokens if no_embed_class else tokens - prefix)
    if grid is None:
        raise WeightsFormatError(f"{where}: pos_embed has {tokens} tokens, which is not {prefix} prefix token(s) plus a "
                         f"square patch grid")
    has_norm, has_fc_norm = "norm.weight" in state, "fc_norm.weight" in state
    if has_norm and has_fc_norm:
        raise WeightsFormatError(f"{where}: holds both a final norm and fc_norm; a timm ViT has one or the other")
    return ViTSpec(embed_dim=embed_dim, depth=depth, num_heads=heads, patch_size=patch, grid=grid,
                   mlp_ratio=float(mlp_ratio), qkv_bias="blocks.0.attn.qkv.bias" in state,
                   qk_norm="blocks.0.attn.q_norm.weight" in state, layer_scale="blocks.0.ls1.gamma" in state,
                   class_token=class_token, reg_tokens=reg_tokens, no_embed_class=no_embed_class,
                   pre_norm="norm_pre.weight" in state, global_pool="avg" if has_fc_norm else "token",
                   fc_norm=has_fc_norm)


def build_encoder(spec: ViTSpec, img_size: Optional[int] = None, drop_path_rate: float = 0.0) -> VisionTransformer:
    """A randomly initialised encoder of this shape (``num_classes=0``, ``dynamic_img_size=True``, as
    :func:`visionfm.models.vit.create_encoder` makes them), with its position embedding sized for
    ``img_size`` (default: the size the weights were trained at)."""
    size = img_size or spec.img_size
    kwargs = spec.timm_kwargs()
    dims = (kwargs.pop("embed_dim"), kwargs.pop("depth"), kwargs.pop("num_heads"))
    if spec.arch in ARCHS and spec.patch_size in (8, 14, 16):
        return create_encoder(spec.arch, spec.patch_size, size, drop_path_rate=drop_path_rate, **kwargs)
    return VisionTransformer(img_size=size, patch_size=spec.patch_size, num_classes=0, dynamic_img_size=True,
                             embed_dim=dims[0], depth=dims[1], num_heads=dims[2], drop_path_rate=drop_path_rate,
                             **kwargs)


# -------------------------------------------------------------------------------------------- key mapping
def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def map_to_timm(state: Mapping[str, torch.Tensor], source_format: str) -> Tuple[Dict[str, torch.Tensor], KeyReport]:
    """Rename a checkpoint's encoder keys to timm's and drop the keys the layout knows to drop.

    Keys that are neither renamed nor dropped pass through unchanged: the loader's key-by-key comparison
    with the encoder reports them as unexpected.

    Args:
        state: The checkpoint's state dict (``module.``, ``_orig_mod.`` and ``backbone.`` prefixes allowed).
        source_format: A key of :data:`FOREIGN_FORMATS`.

    Returns:
        ``(timm_state, report)``; the report lists the dropped keys by reason.
    """
    if source_format not in FOREIGN_FORMATS:
        raise WeightsFormatError(f"unknown checkpoint layout {source_format!r}; known: {', '.join(FOREIGN_FORMATS)}")
    keys = {_strip_prefixes(k): v for k, v in state.items()}
    if any(k.startswith("backbone.") for k in keys):
        # multi-crop wrappers (DINO, iBOT, VisionFM, DINOv2): the encoder is under backbone., heads beside it
        keys = {k[len("backbone."):] if k.startswith("backbone.") else k: v for k, v in keys.items()}
    if any(_CHUNKED_BLOCK.match(k) for k in keys) and not any(re.match(r"^blocks\.\d+\.norm1\.", k) for k in keys):
        # DINOv2 block chunks (FSDP): blocks.<chunk>.<index>. -> blocks.<index>.
        keys = {_CHUNKED_BLOCK.sub(r"blocks.\1.", k): v for k, v in keys.items()}
    report = KeyReport(source_format)
    mapped: Dict[str, torch.Tensor] = {}
    rules = [(re.compile(pattern), reason) for pattern, reason in FOREIGN_FORMATS[source_format]]
    for key, value in keys.items():
        reason = next((why for pattern, why in rules if pattern.search(key)), None)
        if reason is not None:
            report.dropped.setdefault(reason, []).append(key)
        else:
            mapped[key] = value
    if source_format == "dinov2" and "register_tokens" in mapped:
        # DINOv2's position embedding has a CLS entry but none for registers; timm's register layout keeps
        # the position embedding for patches only, so the CLS entry is folded into the CLS token (exact).
        pos = mapped.pop("pos_embed")
        mapped["reg_token"] = mapped.pop("register_tokens")
        mapped["cls_token"] = mapped["cls_token"] + pos[:, :1]
        mapped["pos_embed"] = pos[:, 1:]
    for reason in report.dropped:
        report.dropped[reason].sort()
    report.mapped = len(mapped)
    return mapped, report


def _sniff(state: Mapping[str, torch.Tensor]) -> str:
    """The layout of a bare state dict, from its keys."""
    keys = {_strip_prefixes(k) for k in state}
    keys = {k[len("backbone."):] if k.startswith("backbone.") else k for k in keys}
    mask = next((state[k] for k in state if _strip_prefixes(k).endswith("mask_token")), None)
    if any(k.startswith("decoder_") for k in keys) or (mask is not None and mask.ndim == 3):
        return "mae"
    if (any(".ls1.gamma" in k for k in keys) or "register_tokens" in keys or (mask is not None and mask.ndim == 2)
            or any(k.startswith(("dino_head.", "ibot_head.")) for k in keys)):
        return "dinov2"
    if "masked_embed" in keys:
        return "ibot"
    return "timm"


# ------------------------------------------------------------------------------------------ checkpoints
@dataclass
class ForeignCheckpoint:
    """A foreign checkpoint read and mapped: the timm state, our metadata, the key report and the shape."""

    state: Dict[str, torch.Tensor]
    metadata: Dict[str, Any]
    report: KeyReport
    spec: ViTSpec


def _args_dict(args: Any) -> Dict[str, Any]:
    if args is None:
        return {}
    if isinstance(args, Mapping):
        return dict(args)
    return dict(vars(args)) if hasattr(args, "__dict__") else {}


def _visionfm_source_modality(path: Path, args: Mapping[str, Any]) -> Optional[str]:
    """The modality a VisionFM checkpoint says it was trained on (its ``args.modality`` or file name)."""
    named = args.get("modality")
    if not named:
        match = re.match(r"^VFM_(.+?)_weights", path.name, flags=re.IGNORECASE)
        named = match.group(1) if match else None
    if not named:
        return None
    key = str(named).strip().lower().replace(" ", "").replace("_", "")
    if key in _VISIONFM_NAMES:
        return _VISIONFM_NAMES[key]
    return get_modality(str(named)).name


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _pick_state(obj: Any, path: Path, checkpoint_key: Optional[str]) -> Tuple[Dict[str, torch.Tensor], str, Dict]:
    """Find the encoder state inside a loaded checkpoint: ``(state, layout, args)``."""
    if not isinstance(obj, Mapping):
        raise WeightsFormatError(f"{path}: holds a {type(obj).__name__}, not a state dict or a checkpoint dict")
    args = _args_dict(obj.get("args"))
    if checkpoint_key is not None:
        if checkpoint_key not in obj:
            raise WeightsFormatError(f"{path}: no entry {checkpoint_key!r} (top-level keys: {sorted(map(str, obj))})")
        entry = checkpoint_key
    elif _is_tensor_dict(obj):
        entry = None
    else:
        entry = next((k for k in ("teacher", "student", "model", "state_dict") if k in obj), None)
        if entry is None:
            raise WeightsFormatError(f"{path}: found no encoder weights: top-level keys are {sorted(map(str, obj))}; "
                             f"expected a state dict or one of teacher / student / model / state_dict "
                             f"(choose one with checkpoint_key= / --checkpoint-key)")
    state = obj if entry is None else obj[entry]
    if not _is_tensor_dict(state):
        raise WeightsFormatError(f"{path}: entry {entry!r} is not a dict of tensors" if entry else
                         f"{path}: not a dict of tensors")
    state = dict(state)
    if entry in ("teacher", "student"):
        layout = _sniff(state)
        if layout == "dinov2":
            pass
        elif _visionfm_source_modality(path, args) is not None:
            layout = "visionfm-official"
        elif layout == "ibot" or "pred_ratio" in args:
            layout = "ibot"
        else:
            layout = "dino"
    else:
        layout = _sniff(state)
        if layout == "ibot" and _visionfm_source_modality(path, args) is not None:
            layout = "visionfm-official"
    log.info("%s: reading %s (%s layout)", path, f"entry {entry!r}" if entry else "a bare state dict", layout)
    # Our own training checkpoints (pretrain/dino.py, mae.py) carry the run's config: the modality it names
    # decides the normalisation the encoder was trained with, not the layout's default.
    config = obj.get("config") if isinstance(obj.get("config"), Mapping) else None
    return state, layout, {**args, "_entry": entry, "_epoch": obj.get("epoch") if entry else None,
                           "_config": config}


def read_foreign_checkpoint(path: "str | os.PathLike", modality: str, allow_pickle: bool = False,
                            checkpoint_key: Optional[str] = None, num_heads: Optional[int] = None,
                            mean: Optional[Sequence[float]] = None,
                            std: Optional[Sequence[float]] = None) -> ForeignCheckpoint:
    """Read a checkpoint in any supported layout and map it onto our timm encoder.

    Args:
        path: ``.pth``/``.pt`` (loaded with ``weights_only=True`` and the allow-list of
            :mod:`visionfm.weights.safety`) or ``.safetensors`` (ours, timm's or DINOv2's).
        modality: The modality the encoder is for (name or alias). A VisionFM checkpoint names its own; a
            disagreement is logged and the checkpoint's modality is kept in the metadata.
        allow_pickle: Fully unpickle a ``.pth`` the allow-list refuses (trusted files only).
        checkpoint_key: Which entry holds the encoder (default: ``teacher``, then ``student``, ``model``,
            ``state_dict``, or the file itself when it is a bare state dict).
        num_heads: Attention heads, for widths whose head count neither the metadata nor the standard sizes
            tell.
        mean, std: Override the normalisation carried with the weights.

    Raises:
        UnsafeCheckpointError: the pickle needs more than the allow-list (see :mod:`visionfm.weights.safety`).
        ValueError: the file's layout or shapes do not map onto a timm ViT.
    """
    path = Path(path)
    requested = get_modality(modality)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        ours = read_metadata(path)
        raw = load_safetensors(path)
        layout = "visionfm" if ours else _sniff(raw)
        args: Dict[str, Any] = {"_entry": None, "_epoch": None}
        source_meta = dict(ours)
    else:
        raw, layout, args = _pick_state(load_checkpoint(path, allow_pickle=allow_pickle), path, checkpoint_key)
        source_meta = {}
    state, report = map_to_timm(raw, layout)
    hints = dict(source_meta)
    if "arch" not in hints and (args.get("arch") or args.get("model")):
        hints["arch"] = args.get("arch") or args.get("model")
    spec = infer_spec(state, hints, num_heads=num_heads, where=str(path))
    if args.get("patch_size") and int(args["patch_size"]) != spec.patch_size:
        raise WeightsFormatError(f"{path}: args.patch_size is {args['patch_size']} but the patch embedding is "
                         f"{spec.patch_size}x{spec.patch_size}")

    run_config = args.get("_config") or {}
    trained_on = run_config.get("modality") if isinstance(run_config.get("modality"), str) else None
    source_modality = source_meta.get("modality") or (_visionfm_source_modality(path, args)
                                                      if layout == "visionfm-official" else None)
    if trained_on and not source_modality:
        source_modality = get_modality(trained_on).name
    if source_modality and source_modality != requested.name:
        log.warning("%s: the checkpoint was trained on %s images but %s was requested; keeping %s in the "
                    "metadata", path, source_modality, requested.name, source_modality)
    modality_name = source_modality or requested.name
    if mean is not None or std is not None:
        if mean is None or std is None or len(mean) != 3 or len(std) != 3:
            raise WeightsFormatError("mean and std overrides need 3 values each, given together")
        norm, norm_source = (tuple(map(float, mean)), tuple(map(float, std))), "user override"
    elif layout == "visionfm":
        fallback = MODALITIES[modality_name]
        norm = (tuple(source_meta.get("mean") or fallback.mean), tuple(source_meta.get("std") or fallback.std))
        norm_source = source_meta.get("normalisation_source", "visionfm export")
    elif trained_on:
        m = MODALITIES[modality_name]
        norm, norm_source = (tuple(m.mean), tuple(m.std)), f"the {m.name} modality of the run's config"
    elif layout == "visionfm-official":
        if modality_name in VISIONFM_NORMALISATION:
            norm, norm_source = VISIONFM_NORMALISATION[modality_name], "VisionFM pretraining statistics"
        else:
            m = MODALITIES[modality_name]
            norm, norm_source = (tuple(m.mean), tuple(m.std)), "visionfm modality registry"
    else:
        norm, norm_source = (IMAGENET_MEAN, IMAGENET_STD), "ImageNet (default for this layout)"

    metadata: Dict[str, Any] = {key: value for key, value in source_meta.items() if key not in ("conversion",)}
    metadata.update({
        "format": "visionfm-encoder/1",
        "modality": modality_name,
        **spec.to_metadata(),
        "no_embed_class": spec.no_embed_class,
        "mean": [float(v) for v in norm[0]],
        "std": [float(v) for v in norm[1]],
        "normalisation_source": norm_source,
        "timm_class": "timm.models.vision_transformer.VisionTransformer",
    })
    if layout != "visionfm":
        label = {"visionfm-official": "VisionFM official pretraining", "mae": "MAE/RETFound"}.get(layout, layout)
        metadata.update({
            "objective": str(run_config.get("objective") or _OBJECTIVE[layout]),
            "source_format": layout,
            "source_file": path.name,
            "data": f"{label} checkpoint {path.name}" + (f" ({modality_name})" if source_modality else ""),
            "conversion": report.as_metadata(),
        })
        if args.get("_entry"):
            metadata["source_entry"] = args["_entry"]
        if isinstance(args.get("_epoch"), (int, float)):
            metadata["epoch"] = int(args["_epoch"])
    log.info("%s: %s", path, report.summary())
    return ForeignCheckpoint(state, metadata, report, spec)


def load_foreign_checkpoint(path: "str | os.PathLike", modality: str,
                            **options: Any) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """``(timm_state_dict, metadata)`` of a checkpoint in any supported layout (see
    :func:`read_foreign_checkpoint` for ``options``)."""
    checkpoint = read_foreign_checkpoint(path, modality, **options)
    return checkpoint.state, checkpoint.metadata

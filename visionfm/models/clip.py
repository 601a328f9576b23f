"""CLIP alignment of a modality's image encoder with a text encoder, and the zero-shot API.

A :class:`CLIPModel` is one modality's ViT encoder (from ``weights/<modality>_<arch>.safetensors``), a text encoder
(:class:`visionfm.models.text.TextEncoder`, all-MiniLM-L6-v2 by default), two projections into one L2-normalised
space and a learnable temperature (its inverse, the logit scale, is clamped to ``max_logit_scale``).

Shipped CLIP weights (``weights/<modality>_clip.safetensors``) hold the projections, the logit scale and, when they
were tuned, the image encoder and the tuned text layers; the metadata names the image encoder file (with its
sha256) and the text encoder package, which stays in its package.

Example:
    >>> model = CLIPModel.load("oct")                                               # doctest: +SKIP
    >>> probs, logits = model.zero_shot(images, ["no macular edema", "diabetic macular edema"])  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import VisionFMError
from ..modalities import Modality, get_modality
from ..weights.export import WeightsFileError
from ..weights.loader import DEFAULT_WEIGHTS_DIR, EncoderInfo, WeightsNotFoundError, load_encoder
from .text import TextEncoder

__all__ = ["CLIP_FORMAT", "IMAGE_POOLS", "Projection", "CLIPModel", "prepare_images", "clip_weights_path",
           "EncoderMismatchError"]

log = logging.getLogger(__name__)

CLIP_FORMAT = "visionfm-clip/1"
IMAGE_POOLS = ("token", "avg", "token+avg")
ImageInput = Union[Tensor, np.ndarray, "PIL.Image.Image", Sequence[Any]]  # noqa: F821


class EncoderMismatchError(VisionFMError, ValueError):
    """CLIP weights whose image encoder file is not the one they were trained on."""


class Projection(nn.Module):
    """Standardisation, then a linear map (``hidden_dim=0``) or a two-layer MLP into the joint embedding space.

    ``shift``/``scale`` (buffers, saved with the weights) standardise the input features per dimension. Frozen ViT and
    sentence features share a large common component (all OCT B-scans look alike to a CLS token); removing it lets the
    projection work on what differs between images. The trainer sets them from the training features
    (:meth:`set_standardisation`); by default they are the identity.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 0, dropout: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("shift", torch.zeros(in_dim))
        self.register_buffer("scale", torch.ones(in_dim))
        if hidden_dim:
            self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, hidden_dim), nn.GELU(),
                                     nn.Linear(hidden_dim, out_dim))
        else:
            self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, out_dim, bias=False))

    @torch.no_grad()
    def set_standardisation(self, features: Tensor, eps: float = 1e-4) -> None:
        """Use the mean and standard deviation of ``features`` ``(N, in_dim)`` (N >= 2) as shift and scale."""
        if features.ndim != 2 or features.shape[1] != self.shift.numel() or features.shape[0] < 2:
            raise ValueError(f"need (N >= 2, {self.shift.numel()}) features, got {tuple(features.shape)}")
        features = features.float().to(self.shift.device)
        self.shift.copy_(features.mean(0))
        self.scale.copy_(features.std(0).clamp(min=eps))

    def forward(self, x: Tensor) -> Tensor:
        return self.net((x - self.shift.to(x.dtype)) / self.scale.to(x.dtype))


# ------------------------------------------------------------------------------------------------ images
_LUMA = torch.tensor([0.299, 0.587, 0.114])
_GREY_PIL_MODES = ("L", "I;16", "I;16L", "I;16B", "I")


def _pil_to_array(image: Any, index: int, modality: Modality) -> np.ndarray:
    mode = image.mode
    if mode in _GREY_PIL_MODES:
        if not modality.is_grey:
            raise ValueError(f"image {index}: a grey PIL image (mode {mode!r}) was given to the {modality.name} encoder, "
                             f"which expects colour (mode 'RGB') images")
        arr = np.array(image)
        if arr.dtype != np.uint8:  # 16-bit grey
            from ..data.io import _to_uint8  # noqa: PLC0415 - the project's one conversion rule

            arr = _to_uint8(arr)
        return arr[:, :, None]
    if mode == "RGB":
        return np.array(image.convert("L"))[:, :, None] if modality.is_grey else np.array(image)
    raise ValueError(f"image {index}: PIL mode {mode!r} is not supported; convert it first with "
                     f"image.convert({'L' if modality.is_grey else 'RGB'!r}) ({modality.name} images are "
                     f"{'grey' if modality.is_grey else 'colour'})")


def _tensor_to_unit(image: Tensor, index: int, modality: Modality) -> Tensor:
    """One ``(C, H, W)`` tensor as float in ``[0, 1]`` with the modality's channel count."""
    if image.ndim != 3:
        raise ValueError(f"image {index}: expected (C, H, W), got shape {tuple(image.shape)}")
    if image.dtype == torch.uint8:
        x = image.float() / 255.0
    elif image.is_floating_point():
        x = image.float()
        lo, hi = float(x.min()), float(x.max())
        if lo < -1e-3 or hi > 1.0 + 1e-3:
            raise ValueError(f"image {index}: float images must hold values in [0, 1] (got {lo:.3g}..{hi:.3g}); pass "
                             "uint8 images or unnormalised floats, the model normalises them itself")
        x = x.clamp(0.0, 1.0)
    else:
        raise ValueError(f"image {index}: unsupported dtype {image.dtype}; use uint8 or float in [0, 1]")
    channels = x.shape[0]
    if channels not in (1, 3):
        raise ValueError(f"image {index}: {channels} channels; expected 1 (grey) or 3 (RGB)"
                         + (" - drop the alpha channel first" if channels == 4 else ""))
    if modality.is_grey and channels == 3:
        x = (x * _LUMA.to(x.device).view(3, 1, 1)).sum(0, keepdim=True)
    elif not modality.is_grey and channels == 1:
        raise ValueError(f"image {index}: a 1-channel (grey) image was given to the {modality.name} encoder, which "
                         "expects 3-channel colour images")
    return x


def _square_resize(x: Tensor, size: int, mode: str) -> Tensor:
    """``(C, H, W)`` float: make square as the modality does when images are loaded, then resize."""
    _, h, w = x.shape
    if mode == "center" and h != w:
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        x = x[:, top:top + side, left:left + side]
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x[None], size=(size, size), mode="bicubic", antialias=True, align_corners=False)[0]
    return x.clamp(0.0, 1.0)


def _as_list(images: ImageInput) -> List[Any]:
    try:
        from PIL import Image  # noqa: PLC0415
    except ImportError:  # pragma: no cover - Pillow is a dependency
        Image = None
    if Image is not None and isinstance(images, Image.Image):
        return [images]
    if isinstance(images, Tensor):
        if images.ndim == 3:
            return [images]
        if images.ndim == 4:
            return list(images)
        raise ValueError(f"image tensor must be (C, H, W) or (B, C, H, W), got shape {tuple(images.shape)}")
    if isinstance(images, np.ndarray):
        if images.ndim in (2, 3):
            return [images]
        if images.ndim == 4:
            return list(images)
        raise ValueError(f"image array must be (H, W), (H, W, C) or (B, H, W, C), got shape {images.shape}")
    if isinstance(images, (list, tuple)):
        return list(images)
    raise TypeError(f"images must be a PIL image, a tensor, a numpy array or a list of them, got {type(images).__name__}")


def prepare_images(images: ImageInput, modality: "str | Modality", size: int, mean: Sequence[float],
                   std: Sequence[float], device: "torch.device | str" = "cpu") -> Tensor:
    """Turn PIL images, ``uint8``/float tensors or numpy arrays into a normalised ``(B, 3, size, size)`` batch.

    Images are made square the way the modality's training images were (central square for fundus, whole frame for
    B-scans), resized, repeated to 3 channels if grey and normalised with ``mean``/``std``.

    Raises:
        ValueError: an empty input, a PIL mode other than ``L``/``RGB`` (16-bit grey allowed for grey modalities),
            grey images for a colour modality, 4-channel tensors, floats outside ``[0, 1]``...
    """
    m = get_modality(modality)
    items = _as_list(images)
    if not items:
        raise ValueError("no images given")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, Tensor):
            x = _tensor_to_unit(item.to(device), i, m)
        elif isinstance(item, np.ndarray):
            arr = item[:, :, None] if item.ndim == 2 else item
            if arr.ndim != 3:
                raise ValueError(f"image {i}: numpy images must be (H, W) or (H, W, C), got shape {item.shape}")
            x = _tensor_to_unit(torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).to(device), i, m)
        elif hasattr(item, "mode") and hasattr(item, "size"):  # a PIL image
            arr = _pil_to_array(item, i, m)
            x = _tensor_to_unit(torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).to(device), i, m)
        else:
            raise TypeError(f"image {i}: expected a PIL image, tensor or numpy array, got {type(item).__name__}")
        out.append(_square_resize(x, size, m.augment.square_crop))
    batch = torch.stack(out)
    if batch.shape[1] == 1:
        batch = batch.expand(-1, 3, -1, -1)
    mean_t = torch.tensor(mean, dtype=batch.dtype, device=batch.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=batch.dtype, device=batch.device).view(1, 3, 1, 1)
    return (batch - mean_t) / std_t


# ------------------------------------------------------------------------------------------------ model
def clip_weights_path(modality: str, weights_dir: "str | os.PathLike | None" = None) -> Path:
    """``<weights_dir>/<modality>_clip.safetensors`` (``weights_dir`` defaults to ``$VISIONFM_WEIGHTS`` or
    ``weights/``).

    Raises:
        WeightsNotFoundError: naming the folder, what it holds and how to train CLIP weights.
    """
    m = get_modality(modality)
    wdir = Path(weights_dir or os.environ.get("VISIONFM_WEIGHTS") or DEFAULT_WEIGHTS_DIR)
    path = wdir / f"{m.name}_clip.safetensors"
    if not path.is_file():
        available = sorted(p.name for p in wdir.glob("*_clip.safetensors")) if wdir.is_dir() else []
        raise WeightsNotFoundError(
            f"no CLIP weights for {m.name} in {wdir} (CLIP weights there: {', '.join(available) or 'none'}). Train them "
            f"with 'python pretrain/clip.py --modality {m.name} --data OCT_DME --export-to {wdir}' or pass the file "
            "with --weights")
    return path


class CLIPModel(nn.Module):
    """Image encoder + text encoder + projections + clamped temperature.

    Args:
        image_encoder: A timm ViT (``num_classes=0``), as :func:`visionfm.load_encoder` returns it.
        image_info: Its :class:`~visionfm.weights.loader.EncoderInfo` (modality, size, normalisation).
        text_encoder: The text encoder.
        embed_dim: Width of the joint space.
        image_pool: Image feature: ``token`` (CLS), ``avg`` (mean patch token) or ``token+avg`` (both, concatenated).
        image_blocks: Take the pooled features of the last ``image_blocks`` transformer blocks (each through the
            encoder's final norm) and concatenate them; 1 = the encoder's output only.
        projection_hidden: 0 for linear projections, else the hidden width of two-layer MLP projections.
        dropout: Dropout on the projections' inputs (training only).
        init_temperature: Initial softmax temperature (CLIP: 0.07).
        max_logit_scale: Upper clamp of ``1 / temperature`` (CLIP: 100).
    """

    def __init__(self, image_encoder: nn.Module, image_info: EncoderInfo, text_encoder: TextEncoder,
                 embed_dim: int = 256, image_pool: str = "token", projection_hidden: int = 0, dropout: float = 0.0,
                 init_temperature: float = 0.07, max_logit_scale: float = 100.0, image_blocks: int = 1) -> None:
        super().__init__()
        if image_pool not in IMAGE_POOLS:
            raise ValueError(f"image_pool must be one of {', '.join(IMAGE_POOLS)}, got {image_pool!r}")
        if not 0 < init_temperature <= 1 or max_logit_scale < 1:
            raise ValueError("init_temperature must be in (0, 1] and max_logit_scale >= 1")
        self.image_encoder = image_encoder
        self.image_info = image_info
        self.modality = get_modality(image_info.modality)
        self.text_encoder = text_encoder
        depth = len(getattr(image_encoder, "blocks", []))
        if not 1 <= int(image_blocks) <= max(depth, 1):
            raise ValueError(f"image_blocks must be between 1 and the encoder's depth {depth}, got {image_blocks}")
        self.image_pool = image_pool
        self.image_blocks = int(image_blocks)
        self.embed_dim = int(embed_dim)
        feature_dim = image_info.embed_dim * (2 if image_pool == "token+avg" else 1) * self.image_blocks
        self.image_proj = Projection(feature_dim, embed_dim, projection_hidden, dropout)
        self.text_proj = Projection(text_encoder.embed_dim, embed_dim, projection_hidden, dropout)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.max_logit_scale = float(max_logit_scale)
        self.config: Dict[str, Any] = {"embed_dim": int(embed_dim), "image_pool": image_pool,
                                       "image_blocks": self.image_blocks,
                                       "projection_hidden": int(projection_hidden), "dropout": float(dropout),
                                       "max_logit_scale": float(max_logit_scale)}
        self.metadata: Dict[str, Any] = {}
        self.knowledge = None  # a visionfm.tasks.zeroshot.KnowledgeBase, loaded on first use

    # ------------------------------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    @property
    def logit_scale_value(self) -> Tensor:
        """``1 / temperature``, clamped to ``[1, max_logit_scale]``."""
        return self.logit_scale.clamp(0.0, math.log(self.max_logit_scale)).exp()

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Clamp the stored parameter in place (after each optimiser step, as CLIP does)."""
        self.logit_scale.clamp_(0.0, math.log(self.max_logit_scale))

    def share_text_tower(self, other: "CLIPModel") -> None:
        """Use ``other``'s text encoder, text projection and temperature (two modalities in one joint space)."""
        if other.embed_dim != self.embed_dim:
            raise ValueError("models with different embedding widths cannot share a text tower")
        self.text_encoder = other.text_encoder
        self.text_proj = other.text_proj
        self.logit_scale = other.logit_scale

    # ------------------------------------------------------------------------------------------ encoding
    def image_tokens(self, pixels: Tensor, until_block: int) -> Tensor:
        """The token sequence entering block ``until_block`` (0: the embedded patches), as timm computes it."""
        enc = self.image_encoder
        x = enc.norm_pre(enc.patch_drop(enc._pos_embed(enc.patch_embed(pixels))))
        for block in list(enc.blocks)[:until_block]:
            x = block(x)
        return x

    def features_from_tokens(self, tokens: Tensor, from_block: int) -> Tensor:
        """Pooled features from the tokens entering block ``from_block``: the remaining blocks run, and the outputs of
        the last ``image_blocks`` blocks go through the final norm and are pooled and concatenated. A frozen encoder's
        early blocks can thus be run once and cached while its top blocks train."""
        enc = self.image_encoder
        depth = len(enc.blocks)
        if from_block > depth - self.image_blocks:
            raise ValueError(f"tokens after block {from_block} cannot give the last {self.image_blocks} blocks' features")
        prefix = getattr(enc, "num_prefix_tokens", 1)
        parts = []
        x = tokens
        for index in range(from_block, depth):
            x = enc.blocks[index](x)
            if index >= depth - self.image_blocks:
                normed = enc.norm(x)
                if self.image_pool in ("token", "token+avg"):
                    parts.append(normed[:, 0])
                if self.image_pool in ("avg", "token+avg"):
                    parts.append(normed[:, prefix:].mean(1))
        return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]

    def image_features(self, pixels: Tensor) -> Tensor:
        """Pooled encoder features of a normalised ``(B, 3, H, W)`` batch (see :meth:`features_from_tokens`)."""
        return self.features_from_tokens(self.image_tokens(pixels, 0), 0)

    def embed_image_features(self, features: Tensor) -> Tensor:
        return F.normalize(self.image_proj(features), dim=-1)

    def embed_text_features(self, features: Tensor) -> Tensor:
        return F.normalize(self.text_proj(features), dim=-1)

    def encode_image(self, pixels: Tensor) -> Tensor:
        """Normalised joint-space embeddings of a normalised pixel batch (with gradients)."""
        return self.embed_image_features(self.image_features(pixels))

    def encode_text(self, texts: Sequence[str]) -> Tensor:
        """Normalised joint-space embeddings of texts (with gradients)."""
        return self.embed_text_features(self.text_encoder(texts))

    def forward(self, pixels: Tensor, texts: Sequence[str]) -> Tuple[Tensor, Tensor, Tensor]:
        """``(image embeddings, text embeddings, logit scale)``."""
        return self.encode_image(pixels), self.encode_text(texts), self.logit_scale_value

    def preprocess(self, images: ImageInput) -> Tensor:
        """See :func:`prepare_images`; uses the encoder's size and normalisation, on the model's device."""
        return prepare_images(images, self.modality, self.image_info.img_size, self.image_info.mean,
                              self.image_info.std, self.device)

    @contextlib.contextmanager
    def _inference(self) -> Iterator[None]:
        """Eval mode and no gradients inside; every submodule's own train/eval flag is restored afterwards."""
        modes = {module: module.training for module in self.modules()}
        self.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            for module, mode in modes.items():
                module.training = mode

    def embed_images(self, images: ImageInput, batch_size: int = 32) -> Tensor:
        """Normalised embeddings ``(N, embed_dim)`` (on the CPU) of images in any accepted form, in batches."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        items = _as_list(images)
        if not items:
            raise ValueError("no images given")
        out = []
        with self._inference():
            for start in range(0, len(items), batch_size):
                chunk = items[start:start + batch_size]
                chunk_input = torch.stack(chunk) if all(isinstance(c, Tensor) and c.shape == chunk[0].shape
                                                        for c in chunk) else chunk
                out.append(self.encode_image(self.preprocess(chunk_input)).float().cpu())
        return torch.cat(out)

    def embed_texts(self, texts: Sequence[str], batch_size: int = 256) -> Tensor:
        """Normalised embeddings ``(N, embed_dim)`` (on the CPU) of texts, in batches, without gradients."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise ValueError("no texts given")
        with self._inference():
            return torch.cat([self.encode_text(texts[i:i + batch_size]).float().cpu()
                              for i in range(0, len(texts), batch_size)])

    def _knowledge(self):
        if self.knowledge is None:
            from ..data.knowledge import KnowledgeBase  # noqa: PLC0415

            self.knowledge = KnowledgeBase.load()
        return self.knowledge

    def class_prompts(self, class_texts: Sequence[Union[str, Sequence[str]]], expand: bool = True) -> List[List[str]]:
        """The prompt list of each class: a string is expanded with the modality's templates and, for known
        categories, their names and descriptions (``expand=False``: used as the only prompt); a list of strings is
        used as given."""
        if isinstance(class_texts, str):
            raise ValueError("class_texts must be a list of class names (or of prompt lists), not one string")
        class_texts = list(class_texts)
        if not class_texts:
            raise ValueError("class_texts is empty: give at least two class names, e.g. "
                             "['no macular edema', 'diabetic macular edema']")
        if len(class_texts) < 2:
            raise ValueError(f"zero-shot classification needs at least two classes, got {class_texts!r}")
        prompts: List[List[str]] = []
        for i, entry in enumerate(class_texts):
            if isinstance(entry, str):
                if not entry.strip():
                    raise ValueError(f"class {i} is an empty string")
                prompts.append(self._knowledge().class_prompts(entry, self.modality.name) if expand else [entry])
            elif isinstance(entry, (list, tuple)) and entry and all(isinstance(t, str) and t.strip() for t in entry):
                prompts.append(list(entry))
            else:
                raise ValueError(f"class {i}: expected a class name or a non-empty list of prompts, got {entry!r}")
        keys = [tuple(p) for p in prompts]
        if len(set(keys)) != len(keys):
            raise ValueError(f"two classes have the same prompts: {class_texts!r}")
        return prompts

    def class_prototypes(self, class_texts: Sequence[Union[str, Sequence[str]]], expand: bool = True) -> Tensor:
        """One normalised prototype per class ``(C, embed_dim)``: the mean of the class's normalised prompt
        embeddings, normalised again (prompt ensembling)."""
        prompts = self.class_prompts(class_texts, expand)
        flat = [p for group in prompts for p in group]
        embeddings = self.embed_texts(flat)
        out, start = [], 0
        for group in prompts:
            out.append(F.normalize(embeddings[start:start + len(group)].mean(0), dim=-1))
            start += len(group)
        return torch.stack(out)

    def zero_shot(self, images: ImageInput, class_texts: Sequence[Union[str, Sequence[str]]], batch_size: int = 32,
                  expand: bool = True) -> Tuple[Tensor, Tensor]:
        """Classify images by their similarity to class prompts.

        Args:
            images: PIL images (mode ``RGB``, or ``L`` for grey modalities), ``uint8`` tensors, float tensors in
                ``[0, 1]`` (``(C, H, W)``, ``(B, C, H, W)`` or a list), or numpy ``(H, W[, C])`` arrays. They are
                squared, resized and normalised as the encoder's training images were.
            class_texts: Class names (expanded into prompt ensembles, see :meth:`class_prompts`) or prompt lists.
            batch_size: Images per forward pass.
            expand: Expand class names with templates and the knowledge file.

        Returns:
            ``(probs, logits)`` on the CPU, each ``(N, C)``; ``logits = logit_scale * cosine similarity``.

        The model's (and every submodule's) train/eval state is the same afterwards as before.
        """
        prototypes = self.class_prototypes(class_texts, expand)
        embeddings = self.embed_images(images, batch_size)
        with torch.no_grad():
            logits = self.logit_scale_value.item() * embeddings @ prototypes.t()
        return logits.softmax(-1), logits

    # ------------------------------------------------------------------------------------------ saving
    def clip_state_dict(self, include_image_encoder: bool = False, include_text_encoder: bool = False) -> Dict[str, Tensor]:
        """What CLIP weights store: projections and logit scale, plus optionally the (tuned) image encoder and the
        trainable text-encoder parameters."""
        state: Dict[str, Tensor] = {}
        for k, v in self.image_proj.state_dict().items():
            state[f"image_proj.{k}"] = v
        for k, v in self.text_proj.state_dict().items():
            state[f"text_proj.{k}"] = v
        state["logit_scale"] = self.logit_scale.detach().reshape(1)
        if include_image_encoder:  # the tuned tensors only; the rest comes from the encoder file
            for k, v in self.tuned_image_state().items():
                state[f"image_encoder.{k}"] = v
        if include_text_encoder:
            for k, v in self.text_encoder.trainable_state_dict().items():
                state[f"text_encoder.{k}"] = v
        return state

    def tuned_image_state(self) -> Dict[str, Tensor]:
        """The image encoder's trainable tensors (all of them when it is fully tuned)."""
        trainable = {n for n, p in self.image_encoder.named_parameters() if p.requires_grad}
        full = len(trainable) == len(list(self.image_encoder.parameters()))
        return {k: v for k, v in self.image_encoder.state_dict().items() if full or k in trainable}

    def export_metadata(self, image_encoder_file: Optional[str], image_encoder_sha256: Optional[str],
                        includes_image_encoder: bool, includes_text_layers: bool, **extra: Any) -> Dict[str, Any]:
        info = self.image_info
        # "image_modality", not "modality": weights/ tools and load_encoder treat files with a "modality" as encoders.
        meta = {"format": CLIP_FORMAT, "image_modality": self.modality.name, **self.config,
                "image_encoder": {"file": image_encoder_file, "sha256": image_encoder_sha256,
                                  "embedded": self._embedded_kind() if includes_image_encoder else False,
                                  "arch": info.arch, "patch_size": info.patch_size,
                                  "img_size": info.img_size, "embed_dim": info.embed_dim,
                                  "num_heads": int(self.image_encoder.blocks[0].attn.num_heads), "mean": list(info.mean),
                                  "std": list(info.std)},
                "text_encoder": {**self.text_encoder.identity, "pooling": "mean",
                                 "max_length": self.text_encoder.max_length, "hidden_size": self.text_encoder.embed_dim,
                                 "tuned_layers_included": includes_text_layers},
                "logit_scale": self.logit_scale_value.item()}
        meta.update(extra)
        return meta

    def _embedded_kind(self) -> str:
        state = self.tuned_image_state()
        return "full" if len(state) == len(self.image_encoder.state_dict()) else "partial"

    def save(self, path: "str | os.PathLike", metadata: Mapping[str, Any], include_image_encoder: bool = False,
             include_text_encoder: bool = False, dtype: Optional[torch.dtype] = None) -> str:
        """Write CLIP weights (safetensors with JSON metadata, atomically). Returns the file's sha256."""
        from ..weights.export import save_encoder  # noqa: PLC0415

        state = self.clip_state_dict(include_image_encoder, include_text_encoder)
        return save_encoder(state, path, dict(metadata), dtype=dtype)

    @classmethod
    def load(cls, modality: Optional[str] = None, weights: "str | os.PathLike | None" = None,
             weights_dir: "str | os.PathLike | None" = None, device: "torch.device | str | None" = None,
             text_encoder: "TextEncoder | str | os.PathLike | None" = None, image_encoder_weights: "str | None" = None,
             allow_encoder_mismatch: bool = False) -> "CLIPModel":
        """Load CLIP weights with their image encoder and text encoder, in eval mode.

        Args:
            modality: Finds ``<weights_dir>/<modality>_clip.safetensors`` when ``weights`` is not given.
            weights: A CLIP weights file.
            weights_dir: Folder of the shipped weights (default ``$VISIONFM_WEIGHTS`` or ``weights/``).
            device: Where to put the model (default CPU).
            text_encoder: A loaded text encoder or a folder/package to use instead of the one in the metadata.
            image_encoder_weights: The image encoder file to use instead of the one in the metadata.
            allow_encoder_mismatch: Accept an image encoder file whose sha256 differs from the recorded one.

        Raises:
            WeightsNotFoundError, EncoderMismatchError, ValueError (a file that is not CLIP weights, or keys that do
            not fit).
        """

        from ..weights.export import load_safetensors, read_metadata, sha256_file  # noqa: PLC0415

        if weights is None:
            if modality is None:
                raise ValueError("give a modality or a CLIP weights file")
            weights = clip_weights_path(modality, weights_dir)
        path = Path(weights)
        if not path.is_file():
            raise WeightsNotFoundError(f"CLIP weights file not found: {path}")
        meta = read_metadata(path)
        if meta.get("format") != CLIP_FORMAT:
            raise WeightsFileError(f"{path}: not CLIP weights (metadata format {meta.get('format')!r}, expected {CLIP_FORMAT!r})")
        if modality is not None and get_modality(modality).name != meta["image_modality"]:
            raise WeightsFileError(f"{path}: CLIP weights for {meta['image_modality']}, but modality {modality!r} was requested")
        state = load_safetensors(path)
        groups: Dict[str, Dict[str, Tensor]] = {"image_proj": {}, "text_proj": {}, "image_encoder": {}, "text_encoder": {}}
        for key, value in state.items():
            prefix, _, rest = key.partition(".")
            if key == "logit_scale":
                continue
            if prefix not in groups:
                raise WeightsFileError(f"{path}: unexpected tensor {key!r} in CLIP weights")
            groups[prefix][rest] = value.float() if value.is_floating_point() else value
        if "logit_scale" not in state:
            raise WeightsFileError(f"{path}: no logit_scale tensor")

        enc_meta = meta["image_encoder"]
        if enc_meta.get("embedded") == "full":  # a fully tuned encoder travels inside the CLIP weights
            from ..weights.formats import build_encoder, infer_spec  # noqa: PLC0415

            spec = infer_spec(groups["image_encoder"], enc_meta, where=str(path))
            encoder = build_encoder(spec, int(enc_meta["img_size"]))
            encoder.load_state_dict(groups["image_encoder"], strict=True)
            info = EncoderInfo(meta["image_modality"], enc_meta["arch"], enc_meta["patch_size"], enc_meta["img_size"],
                               enc_meta["embed_dim"], tuple(enc_meta["mean"]), tuple(enc_meta["std"]), str(path), enc_meta)
        else:
            enc_path = Path(image_encoder_weights) if image_encoder_weights else None
            if enc_path is None:
                name = enc_meta.get("file")
                if not name:
                    raise WeightsFileError(f"{path}: metadata names no image encoder file")
                candidates = [path.parent / name]
                if weights_dir or os.environ.get("VISIONFM_WEIGHTS"):
                    candidates.append(Path(weights_dir or os.environ["VISIONFM_WEIGHTS"]) / name)
                candidates.append(DEFAULT_WEIGHTS_DIR / name)
                if enc_meta.get("path"):
                    candidates.append(Path(enc_meta["path"]))
                enc_path = next((c for c in candidates if c.is_file()), None)
                if enc_path is None:
                    raise WeightsNotFoundError(f"{path}: its image encoder {name} is none of "
                                               f"{', '.join(str(c) for c in candidates)}; pass image_encoder_weights")
            recorded = enc_meta.get("sha256")
            if recorded and not allow_encoder_mismatch:
                actual = sha256_file(enc_path)
                if actual != recorded:
                    raise EncoderMismatchError(
                        f"{path} was trained on the image encoder {enc_meta.get('file')} with sha256 {recorded[:12]}..., "
                        f"but {enc_path} has sha256 {actual[:12]}... (the encoder was retrained or replaced). Retrain "
                        f"the CLIP weights with 'python pretrain/clip.py --modality {meta['image_modality']} ...', or pass "
                        "allow_encoder_mismatch=True to use them anyway")
            encoder, info = load_encoder(meta["image_modality"], weights=enc_path, img_size=enc_meta.get("img_size"))
            if groups["image_encoder"]:  # the tuned top blocks replace the file's
                own = encoder.state_dict()
                bad = [k for k, v in groups["image_encoder"].items() if k not in own or own[k].shape != v.shape]
                if bad:
                    raise WeightsFileError(f"{path}: tuned image-encoder tensors that do not fit {enc_path}: {bad[:5]}")
                encoder.load_state_dict({**own, **groups["image_encoder"]}, strict=True)
        if isinstance(text_encoder, TextEncoder):
            text = text_encoder
        else:
            text_meta = meta["text_encoder"]
            text = TextEncoder.from_pretrained(text_encoder or text_meta["name"], freeze=True,
                                               max_length=int(text_meta.get("max_length", 77)))
            if text_encoder is None and text_meta.get("version") and text.identity.get("version") != text_meta["version"]:
                log.warning("%s was trained with %s %s, but %s is installed", path, text_meta["name"],
                            text_meta["version"], text.identity.get("version"))
            if text.embed_dim != text_meta.get("hidden_size", text.embed_dim):
                raise WeightsFileError(f"{path}: trained with a {text_meta['hidden_size']}-d text encoder, "
                                 f"{text.identity.get('name')} is {text.embed_dim}-d")
        if groups["text_encoder"]:
            own = text.state_dict()
            bad = [k for k in groups["text_encoder"] if k not in own or own[k].shape != groups["text_encoder"][k].shape]
            if bad:
                raise WeightsFileError(f"{path}: tuned text-encoder tensors that do not fit {text.identity.get('name')}: {bad[:5]}")
            text.load_state_dict({**own, **groups["text_encoder"]}, strict=True)
        model = cls(encoder, info, text, embed_dim=int(meta["embed_dim"]), image_pool=meta["image_pool"],
                    projection_hidden=int(meta.get("projection_hidden", 0)), dropout=float(meta.get("dropout", 0.0)),
                    max_logit_scale=float(meta.get("max_logit_scale", 100.0)),
                    image_blocks=int(meta.get("image_blocks", 1)))
        for name in ("image_proj", "text_proj"):
            try:
                getattr(model, name).load_state_dict(groups[name], strict=True)
            except RuntimeError as err:  # torch lists the missing and unexpected keys
                raise WeightsFileError(f"{path}: {name} keys do not fit the metadata's projection: {err}") from None
        with torch.no_grad():
            model.logit_scale.copy_(state["logit_scale"].float().reshape(()))
        model.metadata = meta
        model.source = str(path)
        model.eval()
        return model.to(torch.device(device) if device is not None else torch.device("cpu"))

    def extra_repr(self) -> str:
        return (f"modality={self.modality.name!r}, embed_dim={self.embed_dim}, image_pool={self.image_pool!r}, "
                f"image_blocks={self.image_blocks}, "
                f"logit_scale={self.logit_scale_value.item():.2f}")

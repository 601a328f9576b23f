"""``VisionFMViT``: a modality's ViT encoder (through :func:`visionfm.load_encoder`) as an mmseg backbone.

Shared by segmentation and detection (mmdet builds it from mmseg's registry), so it lives below both tasks;
importing this module needs mmseg."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from mmengine.model import BaseModule
from mmseg.registry import MODELS
from torch import Tensor

from ..weights.loader import EncoderInfo, load_encoder
from .vit import encoder_features

__all__ = ["VisionFMViT"]


@MODELS.register_module()
class VisionFMViT(BaseModule):
    """Multi-level patch-token maps from chosen blocks of a modality's pretrained ViT.

    Args:
        modality: Modality name or alias (``cfp``, ``oct``...): picks the default weights file.
        weights: Weights file; ``None`` means ``weights/<modality>_<arch>.safetensors``.
        arch: Architecture to request (checked against the file).
        img_size: Size the position embedding is resized to once at load (the training crop size, so that
            crops need no interpolation at run time); other input sizes are interpolated on the fly.
        random_init: Random initialisation with the same architecture (the baseline).
        out_indices: 0-based blocks whose outputs are returned (e.g. ``(3, 5, 7, 11)`` of a 12-block ViT).
        frozen: Freeze the encoder (linear / decoder probe): no gradients, eval mode, run under ``no_grad``.
        drop_path_rate: Stochastic depth when fine-tuning.
        with_input: Also return the (normalised) input image as the first output, for heads with a
            full-resolution convolutional path (:class:`VisionFMUNETRHead`).

    Outputs ``(B, embed_dim, H/p, W/p)`` maps, one per ``out_indices`` entry (preceded by the input with
    ``with_input``). Inputs must be multiples of the patch size (mmseg's data preprocessor pads them with
    ``size_divisor``); anything else is an error rather than a silent misalignment.
    """

    def __init__(self, modality: str = "cfp", weights: Optional[str] = None, arch: Optional[str] = None,
                 img_size: Optional[int] = None, random_init: bool = False,
                 out_indices: Sequence[int] = (3, 5, 7, 11), frozen: bool = False, drop_path_rate: float = 0.0,
                 with_input: bool = False, init_cfg=None):
        super().__init__(init_cfg)
        self.encoder, info = load_encoder(modality, weights=weights, arch=arch, img_size=img_size,
                                          random_init=random_init, drop_path_rate=drop_path_rate)
        self.info: EncoderInfo = info
        depth = len(self.encoder.blocks)
        out_indices = [int(i) for i in out_indices]
        bad = [i for i in out_indices if not 0 <= i < depth]
        if not out_indices or bad:
            raise ValueError(f"out_indices {out_indices}: the {info.arch} encoder has blocks 0..{depth - 1}")
        if sorted(out_indices) != out_indices:
            raise ValueError(f"out_indices must be increasing, got {out_indices}")
        self.out_indices: Tuple[int, ...] = tuple(out_indices)
        self.patch_size = info.patch_size
        self.embed_dim = info.embed_dim
        self.with_input = with_input
        self.frozen = frozen
        if frozen:
            for param in self.encoder.parameters():
                param.requires_grad_(False)
            self.encoder.eval()

    @property
    def out_channels(self) -> Tuple[int, ...]:
        return (self.embed_dim,) * len(self.out_indices)

    def init_weights(self) -> None:
        """Leave the encoder as loaded. (mmengine's default would call timm's own ``init_weights`` on the
        ViT and silently replace the pretrained weights with a fresh random initialisation.)"""

    def train(self, mode: bool = True) -> "VisionFMViT":
        super().train(mode)
        if self.frozen:
            self.encoder.eval()  # no dropout / drop path in a frozen encoder
        return self

    def forward(self, inputs: Tensor) -> Tuple[Tensor, ...]:
        h, w = inputs.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"VisionFMViT input is {h}x{w}, not a multiple of the patch size {self.patch_size}: "
                             f"pad with the data preprocessor's size_divisor and use crop sizes that are multiples")
        if self.frozen:
            with torch.no_grad():
                feats = encoder_features(self.encoder, inputs, self.out_indices)
        else:
            feats = encoder_features(self.encoder, inputs, self.out_indices)
        return (inputs, *feats) if self.with_input else tuple(feats)

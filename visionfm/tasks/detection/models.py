"""mmdet components: the modality encoder as a backbone and a ViTDet-style simple feature pyramid.

Importing this module registers, in mmdet's ``MODELS`` registry:

* ``VisionFMViT``: the same class as the segmentation backbone
  (:class:`visionfm.models.mm_backbone.VisionFMViT`): a modality's ViT loaded through
  :func:`visionfm.load_encoder` (``weights``, ``random_init``...), returning stride-``patch`` maps of the chosen
  blocks, and leaving the loaded weights alone in ``init_weights``;
* ``SimpleFeaturePyramid``: one ViT map (or one per level, "multi-block") turned into a pyramid of strides
  ``patch / scale`` by transposed convolutions (up) and max pooling (down), each level then projected by a
  1x1 and a 3x3 convolution with channel LayerNorm (Li et al., "Exploring Plain Vision Transformer Backbones
  for Object Detection", 2022); further levels by stride-2 subsampling, as ViTDet's last-level max pool.

mmdet configs (``configs/det/*.py``) use them with ``type='VisionFMViT'`` / ``type='SimpleFeaturePyramid'``
after ``custom_imports=dict(imports=['visionfm.tasks.detection.models'])``.

Example:
    >>> import torch
    >>> neck = SimpleFeaturePyramid(in_channels=192, out_channels=32, scale_factors=(2.0, 1.0, 0.5), num_outs=4)
    >>> [tuple(f.shape[-2:]) for f in neck([torch.zeros(1, 192, 8, 8)])]
    [(16, 16), (8, 8), (4, 4), (2, 2)]
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from mmdet.registry import MODELS
from mmengine.model import BaseModule
from torch import Tensor, nn
from torch.nn import functional as F

from ...models.mm_backbone import VisionFMViT

__all__ = ["VisionFMViT", "LayerNorm2d", "SimpleFeaturePyramid"]

if "VisionFMViT" not in MODELS.module_dict:
    MODELS.register_module(module=VisionFMViT)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a ``(B, C, H, W)`` map (ViTDet's norm in the pyramid)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def _resample(channels: int, scale: float) -> Tuple[nn.Module, int]:
    """Layers that change a map's resolution by ``scale`` (4, 2, 1, 0.5 or 0.25) and the channels they output."""
    if scale == 4.0:
        return nn.Sequential(nn.ConvTranspose2d(channels, channels // 2, 2, stride=2), LayerNorm2d(channels // 2),
                             nn.GELU(), nn.ConvTranspose2d(channels // 2, channels // 4, 2, stride=2)), channels // 4
    if scale == 2.0:
        return nn.ConvTranspose2d(channels, channels // 2, 2, stride=2), channels // 2
    if scale == 1.0:
        return nn.Identity(), channels
    if scale == 0.5:
        return nn.MaxPool2d(2, 2), channels
    if scale == 0.25:
        return nn.MaxPool2d(4, 4), channels
    raise ValueError(f"SimpleFeaturePyramid scale factors must be among 4, 2, 1, 0.5, 0.25; got {scale}")


@MODELS.register_module()
class SimpleFeaturePyramid(BaseModule):
    """ViTDet's simple feature pyramid.

    Args:
        in_channels: Channels of the backbone maps (the encoder's ``embed_dim``); an int, or a list with one
            (equal) entry per backbone output as mmdet configs often write it.
        out_channels: Channels of every pyramid level.
        scale_factors: Resolution of each level relative to the backbone map, finest first (``(4, 2, 1, 0.5)``
            gives strides 4, 8, 16, 32 on a patch-16 encoder).
        num_outs: Total levels; levels beyond ``len(scale_factors)`` are stride-2 subsamplings of the last one.
        use_all_inputs: With several backbone maps (e.g. blocks 3, 5, 7, 11): ``False`` builds every level from
            the last map (ViTDet); ``True`` feeds map ``i`` to level ``i`` (there must be one per level).
        stem_channels: Channels of a convolutional image path (0: none). Levels finer than the patch grid
            (scale factor 2 or 4) are upsampled from patch tokens and cannot say where inside a 16-px patch a
            small object lies; with a stem, stride-2 convolutions of the image (as ViT-Adapter's spatial prior
            module) are concatenated to those levels before their projection. The backbone must then pass the
            image first (``VisionFMViT(with_input=True)``; ``downstream/det.py`` sets it).
        patch_size: The encoder's patch size (the stride of its maps), to place the stem's maps.
    """

    def __init__(self, in_channels: "int | Sequence[int]", out_channels: int = 256,
                 scale_factors: Sequence[float] = (4.0, 2.0, 1.0, 0.5), num_outs: Optional[int] = None,
                 use_all_inputs: bool = False, stem_channels: int = 0, patch_size: int = 16, init_cfg=None):
        super().__init__(init_cfg)
        if not isinstance(in_channels, int):
            channels = sorted(set(int(c) for c in in_channels))
            if len(channels) != 1:
                raise ValueError(f"SimpleFeaturePyramid needs equal input channels, got {list(in_channels)}")
            in_channels = channels[0]
        self.scale_factors = tuple(float(s) for s in scale_factors)
        if not self.scale_factors or list(self.scale_factors) != sorted(self.scale_factors, reverse=True):
            raise ValueError(f"scale_factors must be given finest first, got {list(scale_factors)}")
        self.num_outs = int(num_outs or len(self.scale_factors))
        if self.num_outs < len(self.scale_factors):
            raise ValueError(f"num_outs {self.num_outs} is fewer than the {len(self.scale_factors)} scale factors")
        self.use_all_inputs = use_all_inputs
        self.stem_channels = int(stem_channels)
        # stride of each level's map in image pixels, and which levels take the stem's map of that stride
        self.level_strides = [round(patch_size / scale) for scale in self.scale_factors]
        self.stem_levels = [self.stem_channels > 0 and scale > 1.0 for scale in self.scale_factors]
        self.stem = nn.ModuleList()
        if self.stem_channels > 0:
            finest = min(self.level_strides)
            if finest < 2 or finest & (finest - 1):
                raise ValueError(f"a stem needs levels at power-of-two strides, got {self.level_strides}")
            widths = [self.stem_channels] * (max(s for s, f in zip(self.level_strides, self.stem_levels) if f)
                                             .bit_length() - 1)
            widths[0] = max(1, self.stem_channels // 2)
            previous = 3
            for width in widths:  # stride 2, 4, 8...
                self.stem.append(nn.Sequential(nn.Conv2d(previous, width, 3, stride=2, padding=1, bias=False),
                                               LayerNorm2d(width), nn.GELU()))
                previous = width
        self.levels = nn.ModuleList()
        for scale, fused in zip(self.scale_factors, self.stem_levels):
            resample, channels = _resample(in_channels, scale)
            channels += self.stem_channels if fused else 0
            self.levels.append(nn.Sequential(
                resample,
                nn.Conv2d(channels, out_channels, 1, bias=False), LayerNorm2d(out_channels),
                nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), LayerNorm2d(out_channels)))

    def forward(self, inputs: Sequence[Tensor]) -> Tuple[Tensor, ...]:
        inputs = list(inputs)
        stem_maps = {}
        if self.stem_channels > 0:
            if len(inputs) < 2 or inputs[0].shape[1] != 3:
                raise ValueError("SimpleFeaturePyramid(stem_channels>0) needs the image first in its inputs: build the "
                                 "backbone with with_input=True")
            x = inputs.pop(0)
            for stage in self.stem:
                x = stage(x)
                stem_maps[tuple(x.shape[-2:])] = x  # keyed by size: the level of the same size takes it
        if self.use_all_inputs:
            if len(inputs) != len(self.levels):
                raise ValueError(f"SimpleFeaturePyramid(use_all_inputs=True) has {len(self.levels)} levels but got "
                                 f"{len(inputs)} backbone maps")
            sources = inputs
        else:
            sources = [inputs[-1]] * len(self.levels)
        outs: List[Tensor] = []
        for level, fused, x in zip(self.levels, self.stem_levels, sources):
            x = level[0](x)
            if fused:
                size = tuple(x.shape[-2:])
                if size not in stem_maps:
                    raise ValueError(f"no image-path map of size {size} (have {sorted(stem_maps)}): the input must "
                                     f"be padded to a multiple of {max(self.level_strides)} pixels")
                x = torch.cat([x, stem_maps[size]], dim=1)
            outs.append(level[1:](x))
        while len(outs) < self.num_outs:
            outs.append(F.max_pool2d(outs[-1], kernel_size=1, stride=2))
        return tuple(outs)

"""``VisionFMUNETRHead``: a UNETR-like decoder fusing the ViT pyramid with a shallow full-resolution conv path.

Patch tokens (16 px) cannot draw one-pixel capillaries; UNETR's answer is a convolutional path from the image
itself, merged into the decoder at 1/2 and full resolution. Here the pyramid (strides 4..32, from
:class:`VisionFMPyramidNeck`) is decoded top-down, then fused with conv features of the image at stride 2
and stride 1.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
from mmcv.cnn import ConvModule
from mmseg.models.decode_heads.decode_head import BaseDecodeHead
from mmseg.models.utils import resize
from mmseg.registry import MODELS
from torch import Tensor, nn

__all__ = ["VisionFMUNETRHead", "fit_norm"]


def fit_norm(norm_cfg: Optional[dict], channels: int) -> Optional[dict]:
    """A GroupNorm config whose group count divides ``channels`` (the gcd with the configured count), so that
    narrow full-resolution layers and wide pyramid layers share one ``norm_cfg``; other norms unchanged."""
    if norm_cfg is None or norm_cfg.get("type") != "GN":
        return norm_cfg
    return {**norm_cfg, "num_groups": math.gcd(int(norm_cfg.get("num_groups", 1)), channels)}


class _ConvBlock(nn.Sequential):
    """Two 3x3 conv + norm + activation layers (the first may stride)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, conv_cfg, norm_cfg, act_cfg):
        norm_cfg = fit_norm(norm_cfg, out_channels)
        super().__init__(
            ConvModule(in_channels, out_channels, 3, stride=stride, padding=1, conv_cfg=conv_cfg, norm_cfg=norm_cfg,
                       act_cfg=act_cfg),
            ConvModule(out_channels, out_channels, 3, padding=1, conv_cfg=conv_cfg, norm_cfg=norm_cfg,
                       act_cfg=act_cfg))


@MODELS.register_module()
class VisionFMUNETRHead(BaseDecodeHead):
    """UNETR-like decode head: pyramid decoder + full-resolution image path.

    Expects (with ``input_transform='multiple_select'``) the inputs ``[image, level_1, ..., level_n]``: the
    normalised image first (``VisionFMViT(with_input=True)``, passed on by the neck), then pyramid levels from
    fine to coarse.

    Args:
        in_channels: Channels of each selected input, image first (e.g. ``[3, 128, 128, 128, 128]``).
        channels: Channels of the final full-resolution features fed to the classifier.
        decoder_channels: Channels of the top-down pyramid decoder.
        stem_channels: Channels of the image path at full resolution and at stride 2.
        **kwargs: :class:`~mmseg.models.decode_heads.decode_head.BaseDecodeHead` arguments (``num_classes``,
            ``out_channels``, ``in_index``, ``norm_cfg``, ``loss_decode``...).
    """

    def __init__(self, decoder_channels: int = 64, stem_channels: Sequence[int] = (16, 32), **kwargs):
        kwargs.setdefault("input_transform", "multiple_select")
        super().__init__(**kwargs)
        if self.input_transform != "multiple_select" or len(self.in_channels) < 2:
            raise ValueError("VisionFMUNETRHead needs input_transform='multiple_select' and in_channels "
                             "[image_channels, level channels...] (image first, at least one pyramid level)")
        if len(stem_channels) != 2:
            raise ValueError(f"stem_channels must be (full-resolution, stride-2) channels, got {stem_channels}")
        conv = dict(conv_cfg=self.conv_cfg, norm_cfg=self.norm_cfg, act_cfg=self.act_cfg)
        image_channels, level_channels = self.in_channels[0], self.in_channels[1:]
        s1, s2 = stem_channels
        self.stem_full = _ConvBlock(image_channels, s1, 1, **conv)
        self.stem_half = _ConvBlock(s1, s2, 2, **conv)
        self.lateral = nn.ModuleList(
            ConvModule(c, decoder_channels, 1, conv_cfg=self.conv_cfg, norm_cfg=fit_norm(self.norm_cfg, decoder_channels),
                       act_cfg=self.act_cfg) for c in level_channels)
        self.fuse_levels = nn.ModuleList(_ConvBlock(2 * decoder_channels, decoder_channels, 1, **conv)
                                         for _ in level_channels[:-1])
        self.fuse_half = _ConvBlock(decoder_channels + s2, s2, 1, **conv)
        self.fuse_full = _ConvBlock(s2 + s1, self.channels, 1, **conv)

    def _up(self, x: Tensor, like: Tensor) -> Tensor:
        return resize(x, size=like.shape[2:], mode="bilinear", align_corners=self.align_corners)

    def forward(self, inputs: Tuple[Tensor, ...]) -> Tensor:
        selected: List[Tensor] = self._transform_inputs(inputs)
        image, levels = selected[0], selected[1:]
        full = self.stem_full(image)
        half = self.stem_half(full)
        laterals = [lat(x) for lat, x in zip(self.lateral, levels)]
        y = laterals[-1]
        for i in range(len(laterals) - 2, -1, -1):  # top-down, coarse to fine
            y = self.fuse_levels[i](torch.cat([self._up(y, laterals[i]), laterals[i]], dim=1))
        y = self.fuse_half(torch.cat([self._up(y, half), half], dim=1))
        y = self.fuse_full(torch.cat([self._up(y, full), full], dim=1))
        return self.cls_seg(y)

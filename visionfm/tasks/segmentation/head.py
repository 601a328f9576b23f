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
        stem_channels: Channels of the image path's stages at full resolution, stride 2, and optionally
            stride 4, 8... (one two-conv block each; the pyramid decoder output is fused into them coarse to
            fine).
        **kwargs: :class:`~mmseg.models.decode_heads.decode_head.BaseDecodeHead` arguments (``num_classes``,
            ``out_channels``, ``in_index``, ``norm_cfg``, ``loss_decode``...).
    """

    def __init__(self, decoder_channels: int = 64, stem_channels: Sequence[int] = (16, 32), **kwargs):
        kwargs.setdefault("input_transform", "multiple_select")
        super().__init__(**kwargs)
        if self.input_transform != "multiple_select" or len(self.in_channels) < 2:
            raise ValueError("VisionFMUNETRHead needs input_transform='multiple_select' and in_channels "
                             "[image_channels, level channels...] (image first, at least one pyramid level)")
        stem_channels = [int(c) for c in stem_channels]
        if len(stem_channels) < 2 or min(stem_channels) < 1:
            raise ValueError("stem_channels must give the image path's channels at full resolution, stride 2 and "
                             "optionally deeper strides (4, 8, ...), at least two positive values; "
                             f"got {stem_channels}")
        conv = dict(conv_cfg=self.conv_cfg, norm_cfg=self.norm_cfg, act_cfg=self.act_cfg)
        image_channels, level_channels = self.in_channels[0], self.in_channels[1:]
        # Stage i of the image path runs at stride 2**i; a third stage (stride 4) gives the finest ViT level a
        # convolutional partner at its own resolution, with a receptive field of a few vessel widths.
        self.stems = nn.ModuleList(
            _ConvBlock(image_channels if i == 0 else stem_channels[i - 1], c, 1 if i == 0 else 2, **conv)
            for i, c in enumerate(stem_channels))
        self.lateral = nn.ModuleList(
            ConvModule(c, decoder_channels, 1, conv_cfg=self.conv_cfg,
                       norm_cfg=fit_norm(self.norm_cfg, decoder_channels),
                       act_cfg=self.act_cfg) for c in level_channels)
        self.fuse_levels = nn.ModuleList(_ConvBlock(2 * decoder_channels, decoder_channels, 1, **conv)
                                         for _ in level_channels[:-1])
        # fuses[i] merges the decoder output coming from stride 2**(i+1) (or the pyramid) with stage i; the
        # full-resolution one produces the classifier's ``channels``.
        incoming = [stem_channels[i + 1] for i in range(len(stem_channels) - 1)] + [decoder_channels]
        outgoing = [self.channels] + stem_channels[1:]
        self.fuses = nn.ModuleList(_ConvBlock(incoming[i] + stem_channels[i], outgoing[i], 1, **conv)
                                   for i in range(len(stem_channels)))

    #: Parameter names of the two-stage head before the image path took any depth (checkpoints written then).
    _LEGACY_NAMES = {"stem_full.": "stems.0.", "stem_half.": "stems.1.", "fuse_full.": "fuses.0.",
                     "fuse_half.": "fuses.1."}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for old, new in self._LEGACY_NAMES.items():
            for key in [k for k in state_dict if k.startswith(prefix + old)]:
                state_dict[prefix + new + key[len(prefix + old):]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _up(self, x: Tensor, like: Tensor) -> Tensor:
        return resize(x, size=like.shape[2:], mode="bilinear", align_corners=self.align_corners)

    def forward(self, inputs: Tuple[Tensor, ...]) -> Tensor:
        selected: List[Tensor] = self._transform_inputs(inputs)
        image, levels = selected[0], selected[1:]
        stages = []
        x = image
        for stem in self.stems:
            x = stem(x)
            stages.append(x)
        laterals = [lat(x) for lat, x in zip(self.lateral, levels)]
        y = laterals[-1]
        for i in range(len(laterals) - 2, -1, -1):  # top-down, coarse to fine
            y = self.fuse_levels[i](torch.cat([self._up(y, laterals[i]), laterals[i]], dim=1))
        for stage, fuse in zip(reversed(stages), reversed(self.fuses)):  # then down the image path to full res
            y = fuse(torch.cat([self._up(y, stage), stage], dim=1))
        return self.cls_seg(y)

"""``VisionFMPyramidNeck``: single-scale ViT block outputs -> a feature pyramid (ViTDet / BEiT manner)."""

from __future__ import annotations

from typing import List, Sequence, Tuple

from mmcv.cnn import ConvModule, build_norm_layer
from mmengine.model import BaseModule
from mmseg.registry import MODELS
from torch import Tensor, nn

from .head import fit_norm

__all__ = ["VisionFMPyramidNeck"]


def _rescale(channels: int, scale: float, norm_cfg: dict) -> nn.Module:
    """Transposed convolutions up (x2, x4), identity, or max pooling down (x1/2, x1/4)."""
    if scale == 4:
        return nn.Sequential(nn.ConvTranspose2d(channels, channels, 2, 2),
                             build_norm_layer(fit_norm(norm_cfg, channels), channels)[1],
                             nn.GELU(), nn.ConvTranspose2d(channels, channels, 2, 2))
    if scale == 2:
        return nn.ConvTranspose2d(channels, channels, 2, 2)
    if scale == 1:
        return nn.Identity()
    if scale in (0.5, 0.25):
        k = int(round(1 / scale))
        return nn.MaxPool2d(k, k)
    raise ValueError(f"pyramid scale must be one of 4, 2, 1, 0.5, 0.25; got {scale}")


@MODELS.register_module()
class VisionFMPyramidNeck(BaseModule):
    """Turn ViT maps (all at stride p) into a pyramid at strides p/4, p/2, p, 2p (for p = 16: 4, 8, 16, 32).

    Each input level is rescaled by its entry of ``scales`` (transposed convolutions or max pooling) and
    projected to ``out_channels`` by a 1x1 then a 3x3 convolution with normalisation (as ViTDet's simple
    feature pyramid), so that any mmseg decode head (UPerHead, FCNHead, ...) can consume it.

    Args:
        in_channels: Channels of each ViT level (the backbone's ``embed_dim`` repeated).
        out_channels: Channels of every pyramid level.
        scales: One rescale factor per level, shallow to deep.
        norm_cfg: Normalisation config (mmcv); GN works at any batch size, BN needs batches of 2+.

    Inputs beyond ``len(in_channels)`` at the front of the tuple (the image passed on by
    ``VisionFMViT(with_input=True)``) are passed through unchanged, ahead of the pyramid.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int = 128,
                 scales: Sequence[float] = (4, 2, 1, 0.5), norm_cfg: dict = dict(type="GN", num_groups=16),
                 init_cfg=None):
        super().__init__(init_cfg)
        if len(in_channels) != len(scales):
            raise ValueError(f"in_channels has {len(in_channels)} levels but scales has {len(scales)}")
        self.in_channels = list(in_channels)
        self.out_channels = out_channels
        self.scales = list(scales)
        self.rescale = nn.ModuleList(_rescale(c, s, norm_cfg) for c, s in zip(in_channels, scales))
        self.project = nn.ModuleList(
            nn.Sequential(ConvModule(c, out_channels, 1, norm_cfg=fit_norm(norm_cfg, out_channels), act_cfg=None),
                          ConvModule(out_channels, out_channels, 3, padding=1,
                                     norm_cfg=fit_norm(norm_cfg, out_channels), act_cfg=dict(type="GELU")))
            for c in in_channels)

    def forward(self, inputs: Sequence[Tensor]) -> Tuple[Tensor, ...]:
        extra = len(inputs) - len(self.in_channels)
        if extra < 0:
            raise ValueError(f"VisionFMPyramidNeck expects {len(self.in_channels)} levels, got {len(inputs)}")
        passthrough: List[Tensor] = list(inputs[:extra])
        levels = [proj(scale(x)) for x, scale, proj in zip(inputs[extra:], self.rescale, self.project)]
        return tuple(passthrough + levels)

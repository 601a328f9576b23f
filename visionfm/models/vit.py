"""timm Vision Transformer encoders.

Encoders are plain :class:`timm.models.vision_transformer.VisionTransformer` instances without a classifier
(``num_classes=0``), built with ``dynamic_img_size=True`` so that DINO's global and local crops (and
downstream images of any size divisible by the patch) run through one model, with the position
embedding interpolated on the fly. Their ``state_dict`` is timm's, which is what we export.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

__all__ = ["ARCHS", "create_encoder", "encoder_features", "interpolate_pos_embed"]

#: Width, depth and heads of the standard ViT sizes.
ARCHS: Dict[str, Dict[str, int]] = {
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16),
}


def create_encoder(arch: str = "vit_tiny", patch_size: int = 16, img_size: int = 224,
                   drop_path_rate: float = 0.0, **kwargs) -> VisionTransformer:
    """Create a randomly initialised ViT encoder (no classifier head, CLS-token output).

    Args:
        arch: ``vit_tiny``, ``vit_small``, ``vit_base`` or ``vit_large`` (a ``_patchN`` suffix, as in timm
            names, also sets the patch size).
        patch_size: 16, 14 or 8.
        img_size: The nominal image size (the size of the stored position embedding); other sizes are
            interpolated at run time.
        drop_path_rate: Stochastic depth.
        **kwargs: Passed on to timm's ``VisionTransformer``.
    """
    base = arch.split("_patch")[0]
    if "_patch" in arch:
        patch_size = int(arch.split("_patch")[1].split("_")[0])
    if base not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if patch_size not in (8, 14, 16):
        raise ValueError(f"patch size must be 8, 14 or 16, got {patch_size}")
    if img_size % patch_size:
        raise ValueError(f"image size {img_size} is not a multiple of the patch size {patch_size}")
    return VisionTransformer(img_size=img_size, patch_size=patch_size, num_classes=0,
                             dynamic_img_size=True, drop_path_rate=drop_path_rate,
                             **ARCHS[base], **kwargs)


def encoder_features(encoder: VisionTransformer, images: Tensor, blocks: Sequence[int]) -> List[Tensor]:
    """Patch-token feature maps ``(B, C, H/p, W/p)`` after the given (0-based) blocks, for dense heads."""
    return list(encoder.forward_intermediates(images, indices=list(blocks), norm=False,
                                              output_fmt="NCHW", intermediates_only=True))


def interpolate_pos_embed(pos_embed: Tensor, new_grid: Sequence[int], num_prefix_tokens: int = 1) -> Tensor:
    """Resize a stored position embedding ``(1, prefix + H*W, C)`` to a new patch grid (bicubic), keeping
    the prefix (CLS) tokens."""
    from timm.layers import resample_abs_pos_embed

    return resample_abs_pos_embed(pos_embed, new_size=list(new_grid), num_prefix_tokens=num_prefix_tokens)

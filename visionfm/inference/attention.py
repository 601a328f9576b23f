"""Where the encoder looks: the last block's CLS attention per head and the first three PCA components of the
patch features, drawn over the image at its own resolution (the figures of the DINO and DINOv2 papers).

The image goes through the encoder whole (aspect kept, longer side ``size``, each side a multiple of the patch),
since ``dynamic_img_size`` encoders interpolate their position embedding to any grid; the maps, one value per
patch, are then resized to the image's own resolution (above ``LARGE_IMAGE_PIXELS`` to a downscaled copy, which
the log says).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from ..data.inputs import LARGE_IMAGE_PIXELS, InputImage
from ..data.io import read_image
from .embed import pca

__all__ = ["AttentionMaps", "last_block_attention", "encoder_input_size", "attention_maps", "colourise",
           "overlay", "write_attention_pngs"]

log = logging.getLogger(__name__)


@dataclass
class AttentionMaps:
    """Maps of one image on the patch grid.

    Attributes:
        heads: ``(H, gh, gw)`` CLS-to-patch attention of each head of the last block (each row sums to at most 1).
        pca: ``(gh, gw, 3)`` first three principal components of the patch features, each scaled to [0, 1].
    """

    heads: np.ndarray
    pca: np.ndarray


@torch.no_grad()
def last_block_attention(encoder: nn.Module, pixels: Tensor) -> Tuple[Tensor, Tensor]:
    """The last block's attention of the class token to every patch, per head, and the final patch features.

    Returns:
        ``(attention (B, heads, N_patches), patch features (B, N_patches, D))``; the features are after the
        final norm, as ``forward_features`` returns them.
    """
    x = encoder.patch_embed(pixels)
    x = encoder._pos_embed(x)
    x = encoder.patch_drop(x)
    x = encoder.norm_pre(x)
    for block in encoder.blocks[:-1]:
        x = block(x)
    last = encoder.blocks[-1]
    attn = last.attn
    y = last.norm1(x)
    b, n, _ = y.shape
    qkv = attn.qkv(y).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, _ = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    weights = (q[:, :, :1] * attn.scale @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, heads, 1, N)
    tokens = encoder.norm(last(x))
    prefix = int(encoder.num_prefix_tokens)
    return weights[:, :, 0, prefix:], tokens[:, prefix:]


def encoder_input_size(width: int, height: int, size: int, patch: int) -> Tuple[int, int]:
    """``(w, h)`` with the longer side ``size`` and the aspect kept, each side a multiple of ``patch`` (at
    least one patch)."""
    scale = size / max(width, height)
    return (max(patch, int(round(width * scale / patch)) * patch),
            max(patch, int(round(height * scale / patch)) * patch))


@torch.no_grad()
def attention_maps(encoder: nn.Module, image: np.ndarray, size: int, mean: Sequence[float], std: Sequence[float],
                   device: "torch.device | str" = "cpu") -> AttentionMaps:
    """Attention and PCA maps of one ``(H, W, 3)`` uint8 image run through the encoder with its longer side at
    ``size`` pixels."""
    patch = int(encoder.patch_embed.patch_size[0])
    w, h = encoder_input_size(image.shape[1], image.shape[0], size, patch)
    resized = np.asarray(Image.fromarray(image).resize((w, h), Image.BICUBIC), dtype=np.float32) / 255.0
    pixels = torch.from_numpy(resized).permute(2, 0, 1)[None]
    pixels = (pixels - torch.tensor(list(mean)).view(1, 3, 1, 1)) / torch.tensor(list(std)).view(1, 3, 1, 1)
    encoder.eval().to(device)
    attention, tokens = last_block_attention(encoder, pixels.to(device))
    gh, gw = h // patch, w // patch
    heads = attention[0].float().cpu().numpy().reshape(-1, gh, gw)
    comps = pca(tokens[0].float().cpu().numpy(), 3)
    lo, hi = comps.min(axis=0, keepdims=True), comps.max(axis=0, keepdims=True)
    comps = (comps - lo) / np.where(hi - lo > 0, hi - lo, 1.0)
    return AttentionMaps(heads=heads, pca=comps.reshape(gh, gw, 3))


def colourise(values: np.ndarray) -> np.ndarray:
    """``(h, w)`` values to ``(h, w, 3)`` uint8 colours (matplotlib's inferno), scaled to their own range.

    Values are quantised to 256 levels and looked up in a table, so a 40-megapixel map costs its uint8
    colours, not matplotlib's float64 RGBA copy (1.3 GB)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    from matplotlib import colormaps  # noqa: PLC0415

    table = (colormaps["inferno"](np.linspace(0.0, 1.0, 256))[:, :3] * 255.0 + 0.5).astype(np.uint8)
    lo, hi = float(values.min()), float(values.max())
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    levels = np.empty(values.shape, np.uint8)
    levels[...] = np.clip((values - lo) * scale + 0.5, 0, 255)
    return table[levels]


def _upsample(grid: np.ndarray, width: int, height: int) -> np.ndarray:
    """A patch-grid map (``(h, w)`` or ``(h, w, 3)`` float) resized bilinearly to ``width`` x ``height``."""
    channels = [grid] if grid.ndim == 2 else [grid[..., c] for c in range(grid.shape[2])]
    out = [np.asarray(Image.fromarray(c.astype(np.float32), mode="F").resize((width, height), Image.BILINEAR))
           for c in channels]
    return out[0] if grid.ndim == 2 else np.stack(out, axis=-1)


def overlay(image: np.ndarray, colours: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """Blend ``colours`` (same size as ``image``) over the image, a band of rows at a time (the float copies of a
    40-megapixel picture would take gigabytes)."""
    out = np.empty_like(image)
    for top in range(0, image.shape[0], 512):
        rows = slice(top, top + 512)
        out[rows] = (image[rows].astype(np.float32) * (1.0 - alpha) + colours[rows].astype(np.float32) * alpha
                     + 0.5).astype(np.uint8)
    return out


def _output_size(im: InputImage) -> Tuple[int, int]:
    pixels = im.width * im.height
    if pixels <= LARGE_IMAGE_PIXELS:
        return im.width, im.height
    scale = math.sqrt(LARGE_IMAGE_PIXELS / pixels)
    return max(1, int(im.width * scale)), max(1, int(im.height * scale))


def write_attention_pngs(encoder: nn.Module, im: InputImage, folder: Path, size: int, mean: Sequence[float],
                         std: Sequence[float], channels: int = 3, device: "torch.device | str" = "cpu",
                         panel_tile: int = 256) -> Dict[str, List[Path]]:
    """Write ``<name>_head<k>.png`` (attention of head ``k`` over the image), ``<name>_attn_mean.png`` (mean
    over heads), ``<name>_pca.png`` (PCA colours over the image), all at the image's own resolution, and
    ``<name>_panel.png`` (image, heads, mean and PCA side by side, ``panel_tile`` pixels high)."""
    image = read_image(im.path, channels=channels)
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    maps = attention_maps(encoder, image, size, mean, std, device)
    width, height = _output_size(im)
    if (width, height) != (im.width, im.height):
        log.info("%s: overlays written at %dx%d (the %dx%d image scaled to %d MP)", im.path, width, height, im.width,
                 im.height, LARGE_IMAGE_PIXELS // 1_000_000)
        image = np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))
    written: Dict[str, List[Path]] = {"heads": [], "pca": [], "panel": []}
    pictures = []
    for k, head in enumerate(list(maps.heads) + [maps.heads.mean(axis=0)]):
        picture = overlay(image, colourise(_upsample(head, width, height)))
        name = f"{im.name}_head{k}.png" if k < len(maps.heads) else f"{im.name}_attn_mean.png"
        Image.fromarray(picture).save(folder / name)
        written["heads"].append(folder / name)
        pictures.append(picture)
    pca_colours = (np.clip(_upsample(maps.pca, width, height), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    picture = overlay(image, pca_colours, alpha=0.7)
    Image.fromarray(picture).save(folder / f"{im.name}_pca.png")
    written["pca"].append(folder / f"{im.name}_pca.png")
    pictures.append(picture)
    tile_w = max(1, round(panel_tile * width / height))
    tiles = [np.asarray(Image.fromarray(p).resize((tile_w, panel_tile), Image.BILINEAR))
             for p in [image] + pictures]
    Image.fromarray(np.concatenate(tiles, axis=1)).save(folder / f"{im.name}_panel.png")
    written["panel"].append(folder / f"{im.name}_panel.png")
    return written

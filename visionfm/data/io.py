"""The one image reader of the project.

Reads 8- and 16-bit, grey and colour TIFF/GIF/JPEG/PNG/BMP files into ``uint8`` arrays of a requested
channel count. Every failure names the file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import VisionFMError

__all__ = ["IMAGE_EXTENSIONS", "ImageReadError", "read_image", "check_image", "image_channels", "is_image_file"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".ppm", ".pgm")


class ImageReadError(VisionFMError, OSError):
    """An image file that cannot be read; the message starts with the file's path."""


def is_image_file(path: "str | os.PathLike") -> bool:
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    arr = arr.astype(np.float64)
    if np.issubdtype(arr.dtype, np.floating) and arr.max(initial=0) <= 1.0 and arr.min(initial=0) >= 0.0:
        return (arr * 255.0 + 0.5).astype(np.uint8)
    # 16-bit and other integer images: scale by the dtype's range when it is used, else by the data's max.
    hi = arr.max(initial=0)
    scale = 65535.0 if hi > 255 else 255.0
    if hi > 65535:
        scale = hi
    return np.clip(arr / scale * 255.0 + 0.5, 0, 255).astype(np.uint8)


def read_image(path: "str | os.PathLike", channels: int = 3, min_size: Optional[int] = None) -> np.ndarray:
    """Read an image as a ``uint8`` array of shape ``(H, W, channels)``.

    Args:
        path: Image file.
        channels: 1 (grey; colour images are converted with ITU-R 601 luma) or 3 (grey images are
            repeated).
        min_size: When given, JPEGs may be decoded at a reduced scale (1/2, 1/4, 1/8) as long as both sides
            stay at least this large: a 4288x2848 fundus photo needed at 256 px decodes about 10x faster.

    Raises:
        ImageReadError: the file is missing, not an image, truncated or of an unsupported mode.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    path = Path(path)
    try:
        with Image.open(path) as img:
            if min_size and img.format == "JPEG":
                img.draft(img.mode, (min_size, min_size))
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                arr = _to_uint8(np.asarray(img))
                img = Image.fromarray(arr)
            elif img.mode == "P":
                img = img.convert("RGBA" if "transparency" in img.info else "RGB")
            if img.mode in ("RGBA", "LA"):
                img = img.convert("RGB" if img.mode == "RGBA" else "L")
            if img.mode == "1":
                img = img.convert("L")
            img = img.convert("L" if channels == 1 else "RGB")
            arr = np.asarray(img)
    except FileNotFoundError:
        raise ImageReadError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise ImageReadError(f"{path}: cannot read image ({err.__class__.__name__}: {err})") from None
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.shape[0] < 2 or arr.shape[1] < 2:
        raise ImageReadError(f"{path}: image is only {arr.shape[1]}x{arr.shape[0]} pixels")
    return np.ascontiguousarray(arr)


def check_image(path: "str | os.PathLike") -> Tuple[int, int]:
    """Full-decode validity check; returns ``(width, height)``.

    ``Image.verify()`` alone passes truncated JPEGs (it checks structure, not the entropy-coded data), so the
    pixels are decoded too. JPEGs decode at a reduced scale (DCT scaling still reads every byte), which keeps
    this cheap for large photographs.

    Raises:
        ImageReadError: naming the file.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            size = img.size
            if img.format == "JPEG":
                img.draft(img.mode, (64, 64))
            img.load()
    except FileNotFoundError:
        raise ImageReadError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise ImageReadError(f"{path}: not a readable image ({err.__class__.__name__}: {err})") from None
    return size


def image_channels(path: "str | os.PathLike") -> int:
    """Channels the file stores (1 for grey, 16-bit or palette-grey; 3 for colour), read from the header."""
    with Image.open(path) as img:
        mode = img.mode
        if mode == "P":
            palette = img.getpalette() or []
            rgb = np.asarray(palette[: 3 * 256]).reshape(-1, 3)
            return 1 if rgb.size and bool((rgb == rgb[:, :1]).all()) else 3
    return 1 if mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F") else 3

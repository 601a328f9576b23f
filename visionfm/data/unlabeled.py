"""Unlabelled image collections for pretraining: a folder tree, a CSV list, or the synthetic demo set."""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..modalities import Modality, get_modality
from .io import ImageReadError, check_image, is_image_file, read_image

__all__ = ["DataError", "list_images", "square_and_resize", "UnlabeledImages"]

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A dataset that cannot be used as given (empty, missing, malformed)."""


def list_images(source: "str | os.PathLike", limit: Optional[int] = None) -> List[Path]:
    """Image files of a folder tree (sorted, recursive) or of a CSV whose ``path`` column (or first
    column) lists them, relative to the CSV's folder.

    Raises:
        DataError: the source does not exist or holds no images.
    """
    source = Path(source)
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.is_file() and is_image_file(p))
        if not files:
            raise DataError(f"{source}: no images found (looked for {', '.join(('png', 'jpg', 'tif', 'bmp', 'gif'))} "
                            "files in the folder tree)")
    elif source.is_file() and source.suffix.lower() == ".csv":
        with open(source, newline="") as fh:
            rows = list(csv.reader(fh))
        if not rows:
            raise DataError(f"{source}: empty CSV")
        header = [c.strip().lower() for c in rows[0]]
        col = header.index("path") if "path" in header else 0
        body = rows[1:] if ("path" in header or not is_image_file(rows[0][0])) else rows
        files = [(source.parent / r[col].strip()) for r in body if r and r[col].strip()]
        if not files:
            raise DataError(f"{source}: the CSV lists no images")
    elif not source.exists():
        raise DataError(f"{source}: no such folder or CSV file")
    else:
        raise DataError(f"{source}: expected a folder of images or a .csv list of image paths")
    return files[:limit] if limit else files


def square_and_resize(image: np.ndarray, size: int, mode: str = "center") -> np.ndarray:
    """Make an ``(H, W, C)`` uint8 image square (``center``: central square; ``stretch``: whole frame) and
    resize it to ``size`` x ``size`` with antialiasing."""
    h, w = image.shape[:2]
    if mode == "center" and h != w:
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        image = image[top:top + side, left:left + side]
    elif mode not in ("center", "stretch"):
        raise ValueError(f"unknown square mode {mode!r}")
    pil = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
    out = np.asarray(pil.resize((size, size), Image.BICUBIC))
    return out[:, :, None] if out.ndim == 2 else out


class UnlabeledImages(Dataset):
    """Images for self-supervised pretraining, returned as ``uint8`` tensors ``(C, size, size)``.

    Every file is checked when the dataset is built, so a corrupt file fails the run before training starts
    (or, with ``skip_corrupt``, is left out and counted in the log).

    Args:
        files: Image paths.
        modality: Decides grey/colour reading and how non-square frames are squared.
        size: Side length images are stored at; crops are taken from this.
        skip_corrupt: Leave unreadable files out instead of failing.
        cache: Decode each file once and keep the resized image in memory (right for the small datasets of
            ophthalmology; turn off for very large collections and use loader workers instead).
    """

    def __init__(self, files: Sequence["str | os.PathLike"], modality: "Modality | str", size: int,
                 skip_corrupt: bool = False, cache: bool = True) -> None:
        self.modality = get_modality(modality)
        self.size = int(size)
        good, bad = [], []
        for f in files:
            try:
                check_image(f)
                good.append(Path(f))
            except ImageReadError as err:
                if not skip_corrupt:
                    raise ImageReadError(f"{err} (pass --skip-corrupt to leave such files out)") from None
                bad.append(str(f))
        if bad:
            log.warning("skipped %d unreadable image(s), first: %s", len(bad), bad[0])
        if not good:
            raise DataError("no readable images left" + (f" ({len(bad)} unreadable)" if bad else ""))
        self.files = good
        self.skipped = bad
        self._cache: Optional[List[torch.Tensor]] = None
        if cache:
            self._cache = [self._load(i) for i in range(len(self.files))]

    def _load(self, index: int) -> torch.Tensor:
        image = read_image(self.files[index], channels=self.modality.channels, min_size=self.size)
        image = square_and_resize(image, self.size, self.modality.augment.square_crop)
        return torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).contiguous()

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        if self._cache is not None:
            return self._cache[index]
        return self._load(index)

    def describe(self) -> str:
        roots = sorted({str(p.parent) for p in self.files})
        where = roots[0] if len(roots) == 1 else f"{len(roots)} folders"
        return f"{len(self.files)} images from {where}"

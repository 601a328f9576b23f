"""Unlabelled image collections for pretraining: a folder tree, a CSV list, or the synthetic demo set."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import VisionFMError
from ..modalities import Modality, get_modality
from .io import ImageReadError, check_image, image_channels, is_image_file, read_image

__all__ = ["DataError", "list_images", "parse_size", "fit_and_resize", "square_and_resize", "SharedCache",
           "UnlabeledImages"]

log = logging.getLogger(__name__)


class DataError(VisionFMError, ValueError):
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


def parse_size(size: "int | Sequence[int]") -> Tuple[int, int]:
    """``(height, width)`` from a side length or a ``[height, width]`` pair."""
    if isinstance(size, (list, tuple)):
        if len(size) != 2:
            raise ValueError(f"an image size is one side length or [height, width], got {list(size)}")
        h, w = (int(v) for v in size)
    else:
        h = w = int(size)
    if h < 1 or w < 1:
        raise ValueError(f"image size must be positive, got {size}")
    return h, w


def fit_and_resize(image: np.ndarray, size: "int | Sequence[int]", mode: str = "center") -> np.ndarray:
    """Bring an ``(H, W, C)`` uint8 image to ``size`` (a side length or ``[height, width]``) with antialiasing.

    ``center`` keeps the largest central region of the target's aspect ratio (fundus: the circular field of view,
    no distortion); ``stretch`` resizes the whole frame (B-scans, whose edges carry retina; give a ``[height,
    width]`` close to the scans' own aspect, such as 256 x 640 for 1408 x 573 scans, so nothing is squashed)."""
    th, tw = parse_size(size)
    h, w = image.shape[:2]
    if mode == "center" and h * tw != w * th:
        if w * th > h * tw:  # too wide: keep the full height
            cw = max(1, int(round(h * tw / th)))
            left = (w - cw) // 2
            image = image[:, left:left + cw]
        else:
            ch = max(1, int(round(w * th / tw)))
            top = (h - ch) // 2
            image = image[top:top + ch]
    elif mode not in ("center", "stretch"):
        raise ValueError(f"unknown square mode {mode!r}")
    pil = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
    out = np.asarray(pil.resize((tw, th), Image.BICUBIC))
    return out[:, :, None] if out.ndim == 2 else out


def square_and_resize(image: np.ndarray, size: int, mode: str = "center") -> np.ndarray:
    """Make an ``(H, W, C)`` uint8 image square (``center``: central square; ``stretch``: whole frame) and
    resize it to ``size`` x ``size`` with antialiasing."""
    return fit_and_resize(image, int(size), mode)


@dataclass(frozen=True)
class SharedCache:
    """One decoded copy of a dataset for all the processes of one machine (``torchrun --nproc_per_node N``).

    The process with ``leader=True`` (local rank 0) checks and decodes every image once into a ``uint8`` array
    file in ``folder``, written under a temporary name and renamed when complete; after ``wait`` (a barrier of
    every rank) the others map that file read-only, so the operating system's page cache holds the images once
    per machine rather than once per rank. The file name is a hash of the image list (paths, sizes, modification
    times) and of how images are stored, so a rerun (a resume) maps the existing file without decoding again, and
    a changed file or setting decodes anew.

    Attributes:
        folder: Where the array files go: a disk local to the machine (each machine decodes its own copy).
        leader: Whether this process decodes and writes.
        wait: Called by every process after the leader has written (a barrier across the ranks).
    """

    folder: Path
    leader: bool
    wait: Callable[[], None]

    @staticmethod
    def default_folder() -> Path:
        """``<system temp folder>/visionfm-decoded``."""
        return Path(tempfile.gettempdir()) / "visionfm-decoded"


def _cache_key(files: Sequence[Path], settings: Dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for f in files:
        stat = os.stat(f)
        digest.update(f"{os.path.abspath(f)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


class UnlabeledImages(Dataset):
    """Images for self-supervised pretraining, returned as ``uint8`` tensors ``(C, height, width)``.

    Every file is checked when the dataset is built, so a corrupt file fails the run before training starts
    (or, with ``skip_corrupt``, is left out and counted in the log).

    Args:
        files: Image paths.
        modality: Decides grey/colour reading and how non-square frames are squared.
        size: Side length, or ``[height, width]``, images are stored at; crops are taken from this (keep it large
            enough to hold the detail crops should see: a fundus at 512 px or more, B-scans near their own aspect).
        min_side: Smallest accepted side in pixels (one patch): smaller images are refused, not upsampled.
        skip_corrupt: Leave unreadable files (and images smaller than ``min_side``) out instead of failing.
        cache: Decode each file once and keep the resized image in memory (right for the small datasets of
            ophthalmology; turn off for very large collections and use loader workers instead).
        shared_cache: With ``cache``, keep the decoded images in one file mapped by every process of the machine
            (see :class:`SharedCache`) instead of a copy in each process.
    """

    def __init__(self, files: Sequence["str | os.PathLike"], modality: "Modality | str", size: "int | Sequence[int]",
                 skip_corrupt: bool = False, cache: bool = True, min_side: int = 16,
                 shared_cache: Optional[SharedCache] = None) -> None:
        self.modality = get_modality(modality)
        self.height, self.width = parse_size(size)
        self.size = self.height if self.height == self.width else (self.height, self.width)
        self._cache: Optional[List[torch.Tensor]] = None
        self._array: Optional[np.ndarray] = None
        if cache and shared_cache is not None:
            self._map_shared(files, skip_corrupt, min_side, shared_cache)
            return
        self.files, self.skipped = self._check(files, skip_corrupt, min_side)
        per_image = self.height * self.width * self.modality.channels
        if cache:
            log.info("decoding %d images once into memory at %dx%d (%d channel(s), uint8): %.0f KiB each, %.1f MiB "
                     "in all", len(self.files), self.height, self.width, self.modality.channels, per_image / 1024,
                     per_image * len(self.files) / 2 ** 20)
            self._cache = [self._load(i) for i in range(len(self.files))]
        else:
            log.info("images are decoded at every step at %dx%d (%.0f KiB each; data.cache is off)", self.height,
                     self.width, per_image / 1024)

    def _check(self, files: Sequence["str | os.PathLike"], skip_corrupt: bool,
               min_side: int) -> Tuple[List[Path], List[str]]:
        """The readable files (each fully decoded once) and the unreadable ones left out with ``skip_corrupt``."""
        good, bad, mismatched = [], [], []
        for f in files:
            try:
                width, height = check_image(f)  # a full decode: truncated files fail here, not mid-training
                if min(width, height) < min_side:  # upsampling it would train on interpolation, not anatomy
                    raise ImageReadError(f"{f}: image is {width}x{height} pixels, smaller than one {min_side}-px "
                                         "patch")
                if image_channels(f) != self.modality.channels:
                    mismatched.append(str(f))
                good.append(Path(f))
            except ImageReadError as err:
                if not skip_corrupt:
                    raise ImageReadError(f"{err} (pass --skip-corrupt to leave such files out)") from None
                bad.append(str(f))
        if bad:
            log.warning("skipped %d unreadable image(s), first: %s", len(bad), bad[0])
        if mismatched:
            stored = "grey" if self.modality.channels == 3 else "colour"
            log.warning("%d of %d image(s) are %s but the %s modality reads %s: they are converted; first: %s",
                        len(mismatched), len(files), stored, self.modality.name,
                        "colour" if self.modality.channels == 3 else "grey", mismatched[0])
        if not good:
            raise DataError("no readable images left" + (f" ({len(bad)} unreadable)" if bad else ""))
        return good, bad

    def _map_shared(self, files: Sequence["str | os.PathLike"], skip_corrupt: bool, min_side: int,
                    shared: SharedCache) -> None:
        """Decode into (leader) or map (every process) the machine's array file of these images."""
        files = [Path(f) for f in files]
        settings = {"size": [self.height, self.width], "channels": self.modality.channels, "min_side": min_side,
                    "square": self.modality.augment.square_crop, "skip_corrupt": skip_corrupt, "format": 1}
        try:
            stem = shared.folder / f"{self.modality.name}-{_cache_key(files, settings)}"
        except OSError as err:
            raise DataError(f"cannot read the image list for the shared cache: {err}") from None
        array_path, list_path = stem.with_suffix(".npy"), stem.with_suffix(".json")
        if shared.leader and not (array_path.is_file() and list_path.is_file()):
            self.files, self.skipped = self._check(files, skip_corrupt, min_side)
            shape = (len(self.files), self.height, self.width, self.modality.channels)
            log.info("decoding %d images once into %s at %dx%d (%d channel(s), uint8, %.1f MiB), shared by the "
                     "processes of this machine", len(self.files), array_path, self.height, self.width,
                     self.modality.channels, np.prod(shape) / 2 ** 20)
            shared.folder.mkdir(parents=True, exist_ok=True)
            partial = array_path.with_name(f"{array_path.name}.{os.getpid()}.partial")
            array = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=shape)
            for i in range(len(self.files)):
                array[i] = self._load(i).permute(1, 2, 0).numpy()
            array.flush()
            del array
            listing = list_path.with_name(f"{list_path.name}.{os.getpid()}.partial")
            listing.write_text(json.dumps({"files": [str(f) for f in self.files], "skipped": self.skipped}))
            os.replace(partial, array_path)  # complete files only, under their final names
            os.replace(listing, list_path)
        shared.wait()
        if not (array_path.is_file() and list_path.is_file()):
            raise DataError(f"the shared image cache {array_path} is missing after the leader process wrote it: "
                            "is data.cache_dir on a disk every process of this machine sees?")
        listing = json.loads(list_path.read_text())
        self.files, self.skipped = [Path(f) for f in listing["files"]], list(listing["skipped"])
        self._array = np.load(array_path, mmap_mode="r")
        if self._array.shape != (len(self.files), self.height, self.width, self.modality.channels):
            raise DataError(f"{array_path} holds an array of shape {self._array.shape}, not the "
                            f"{len(self.files)} images of {self.height}x{self.width} expected: delete it and rerun")
        if shared.leader:
            log.info("mapping %d decoded images from %s", len(self.files), array_path)

    def _load(self, index: int) -> torch.Tensor:
        image = read_image(self.files[index], channels=self.modality.channels, min_size=max(self.height, self.width))
        image = fit_and_resize(image, (self.height, self.width), self.modality.augment.square_crop)
        return torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).contiguous()

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        if self._cache is not None:
            return self._cache[index]
        if self._array is not None:  # a copy: the mapped file is read-only
            return torch.from_numpy(np.array(self._array[index])).permute(2, 0, 1).contiguous()
        return self._load(index)

    def describe(self) -> str:
        roots = sorted({str(p.parent) for p in self.files})
        where = roots[0] if len(roots) == 1 else f"{len(roots)} folders"
        return f"{len(self.files)} images from {where}"

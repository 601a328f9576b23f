"""Images a user points a command at: a folder or a CSV, checked once before any work starts.

Every command that applies a model to new images (``predict``, ``embed``, ``attention``, zero-shot on a folder)
reads its input through :func:`collect_images`, so they all

- decode every file fully before the first output is written (a truncated JPEG fails here, not halfway),
- name the file and the problem in the error, or with ``skip_corrupt`` leave bad files out and count them,
- give each image a unique output name (``x.tif`` and ``x.png`` never both write ``x.png``),
- note a grey image given to a colour modality and the reverse, refuse images smaller than one patch and warn
  about very large ones, each through one function.
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..errors import VisionFMError
from .io import IMAGE_EXTENSIONS, ImageReadError, check_image, image_channels, is_image_file

__all__ = ["InputImage", "InputError", "LARGE_IMAGE_PIXELS", "collect_images", "unique_names", "note_channels",
           "check_min_side", "warn_if_large"]

log = logging.getLogger(__name__)

#: Above this many pixels an image is called large: a 4288x2848 fundus photograph is 12 MP, a montage 64 MP.
LARGE_IMAGE_PIXELS = 40_000_000

_CSV_PATH_COLUMNS = ("path", "image", "file", "filename")


class InputError(VisionFMError, ValueError):
    """The images given to a command cannot be used; the message names the folder or file."""


@dataclass(frozen=True)
class InputImage:
    """One checked input image.

    Attributes:
        path: The file.
        name: Unique stem for this image's output files.
        width, height: Size in pixels, read when the file was checked.
        channels: 1 when the file stores grey values, 3 for colour.
        label: The CSV's ``label`` column, when there is one.
    """

    path: Path
    name: str
    width: int
    height: int
    channels: int
    label: Optional[str] = None


def _from_folder(folder: Path, recursive: bool) -> List[Path]:
    pattern = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in pattern if p.is_file() and not p.name.startswith("."))


def _from_csv(table: Path) -> List[tuple]:
    with open(table, newline="") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        column = next((c for c in columns if c.strip().lower() in _CSV_PATH_COLUMNS), None)
        if column is None:
            raise InputError(f"{table}: no image path column (one of {', '.join(_CSV_PATH_COLUMNS)}); "
                             f"columns are {columns}")
        label = next((c for c in columns if c.strip().lower() == "label"), None)
        rows = []
        for number, row in enumerate(reader, start=2):
            value = (row.get(column) or "").strip()
            if not value:
                raise InputError(f"{table}: line {number} has an empty {column!r}")
            path = Path(value).expanduser()
            rows.append((path if path.is_absolute() else table.parent / path, row.get(label) if label else None))
    return rows


def unique_names(paths: Sequence[Path]) -> List[str]:
    """An output stem per path, unique even on case-insensitive file systems.

    The stem is used where it is unique; files that share a stem (``x.tif``, ``x.png``) keep their extension
    (``x_tif``, ``x_png``); files that still clash (same name in two subfolders) get their parent folder's name
    in front, and a counter as the last resort."""
    names = [p.stem for p in paths]
    for attempt in range(3):
        counts: Dict[str, int] = {}
        for n in names:
            counts[n.lower()] = counts.get(n.lower(), 0) + 1
        clashing = [i for i, n in enumerate(names) if counts[n.lower()] > 1]
        if not clashing:
            return names
        for i in clashing:
            if attempt == 0:
                names[i] = f"{paths[i].stem}_{paths[i].suffix.lstrip('.').lower()}"
            elif attempt == 1:
                names[i] = f"{paths[i].parent.name}__{names[i]}"
            else:
                names[i] = f"{names[i]}_{i}"
    return names


def collect_images(source: "str | os.PathLike", *, limit: Optional[int] = None, recursive: bool = False,
                   skip_corrupt: bool = False) -> List[InputImage]:
    """List and check the images of a folder, or of a CSV with a ``path`` column (relative to the CSV's folder)
    and an optional ``label`` column.

    Args:
        source: A folder or a ``.csv`` file.
        limit: Keep the first N images (in sorted order) before checking.
        recursive: Include subfolders of a folder.
        skip_corrupt: Leave out files that are not readable images (logged with a count) instead of failing.

    Raises:
        InputError: the source is missing or empty, or nothing readable is left.
        ImageReadError: a file is not a readable image (without ``skip_corrupt``); the message names it.
    """
    source = Path(source).expanduser()
    if not source.exists():
        raise InputError(f"{source}: no such folder or CSV file")
    if source.is_dir():
        entries = [(p, None) for p in _from_folder(source, recursive)]
        what = "folder"
    elif source.suffix.lower() == ".csv":
        entries = _from_csv(source)
        what = "CSV"
    else:
        raise InputError(f"{source}: expected a folder of images or a .csv file with a 'path' column")
    if not entries:
        raise InputError(f"{source}: the {what} is empty (images: {', '.join(e.lstrip('.') for e in IMAGE_EXTENSIONS)})")
    if limit is not None:
        if limit < 1:
            raise InputError(f"--limit must be at least 1, got {limit}")
        entries = entries[:limit]
    good, bad = [], []
    for path, label in entries:
        try:
            if not is_image_file(path):
                raise ImageReadError(f"{path}: not an image file (extension {path.suffix or 'none'}; expected one of "
                                     f"{', '.join(IMAGE_EXTENSIONS)})")
            width, height = check_image(path)
            good.append((path, width, height, image_channels(path), label))
        except ImageReadError as err:
            if not skip_corrupt:
                raise ImageReadError(f"{err} (pass --skip-corrupt to leave such files out)") from None
            bad.append(str(err))
    if bad:
        log.warning("skipped %d unreadable file(s) of %d (--skip-corrupt); first: %s", len(bad), len(entries), bad[0])
    if not good:
        raise InputError(f"{source}: no readable images" + (f" ({len(bad)} unreadable)" if bad else ""))
    names = unique_names([g[0] for g in good])
    renamed = sum(1 for g, n in zip(good, names) if g[0].stem != n)
    if renamed:
        log.info("%d file(s) share a name with another input: their outputs keep the extension or folder in the "
                 "name (for example %s)", renamed, next(n for g, n in zip(good, names) if g[0].stem != n))
    return [InputImage(p, n, w, h, c, lab) for (p, w, h, c, lab), n in zip(good, names)]


def note_channels(images: Sequence[InputImage], channels: int, modality: str) -> int:
    """Log one note when images are grey for a colour modality or colour for a grey one; returns how many."""
    mismatched = [im for im in images if im.channels != channels]
    if mismatched:
        stored, read = ("grey", "colour") if channels == 3 else ("colour", "grey")
        how = "each grey channel is repeated three times" if channels == 3 else "converted to grey (ITU-R 601 luma)"
        log.warning("%d of %d image(s) are %s but the %s modality reads %s: %s; first: %s", len(mismatched),
                    len(images), stored, modality, read, how, mismatched[0].path)
    return len(mismatched)


def check_min_side(images: Sequence[InputImage], min_side: int, what: str = "one patch") -> None:
    """Refuse images smaller than ``min_side`` pixels on a side (smaller than one patch or window)."""
    for im in images:
        if min(im.width, im.height) < min_side:
            raise InputError(f"{im.path}: image is {im.width}x{im.height} pixels, smaller than {what} "
                             f"({min_side} px)")


def warn_if_large(images: Sequence[InputImage], handling: str) -> int:
    """Warn once per large image (above :data:`LARGE_IMAGE_PIXELS`) saying how the command handles it."""
    large = [im for im in images if im.width * im.height > LARGE_IMAGE_PIXELS]
    for im in large:
        log.warning("%s: large image %dx%d (%.0f MP): %s", im.path, im.width, im.height, im.width * im.height / 1e6,
                    handling)
    return len(large)

"""Named image sources for pretraining: ``DATASET:split`` tokens resolved against a data root.

``python pretrain/dino.py --modality cfp --data DRIVE:train,IDRiD:train,OCT_DME:train`` pretrains on the
training images of those datasets only, so no downstream test image is ever seen in pretraining. The
resolved list is written as a CSV into the run folder, which records exactly what the encoder saw.
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
from pathlib import Path
from typing import Callable, Dict, List

from ..modalities import get_modality
from .io import is_image_file
from .unlabeled import DataError

__all__ = ["SOURCES", "is_named_source", "resolve_named_source", "write_source_csv"]


def _glob(folder: str, what: str, modality: "str | None" = None,
          recursive: bool = False) -> Callable[[Path, str], List[Path]]:
    """A source made of the images in ``folder`` (with ``recursive``, its whole tree, e.g. ImageFolder class
    folders whose labels pretraining ignores); ``modality`` guards against pretraining one modality on another's
    images."""
    def find(root: Path, requested: str) -> List[Path]:
        if modality is not None and requested != modality:
            raise DataError(f"{what} holds {get_modality(modality).description} images, not {requested}: use it "
                            f"with --modality {modality}")
        base = root / folder
        if not base.is_dir():
            raise DataError(f"{what}: folder {base} not found (put the dataset under the data root, or pass --data-root)")
        found = base.rglob("*") if recursive else base.iterdir()
        files = sorted(p for p in found if p.is_file() and is_image_file(p))
        if not files:
            raise DataError(f"{what}: no images in {base}")
        return files
    return find


def _oct_dme(split: str) -> Callable[[Path, str], List[Path]]:
    def find(root: Path, modality: str) -> List[Path]:
        from .datasets.oct_fundus import load_splits

        return [r.path for r in load_splits(root, modality)[split]]
    return find


#: Known ``DATASET:split`` sources (training parts only: test splits are never offered for pretraining).
SOURCES: Dict[str, Callable[[Path, str], List[Path]]] = {
    "DRIVE:train": _glob("DRIVE/training/images", "DRIVE:train"),
    "IDRiD:train": _glob("IDRiD/A. Segmentation/1. Original Images/a. Training Set", "IDRiD:train"),
    "OCT_DME:train": _oct_dme("train"),
    "OCT_DME:val": _oct_dme("val"),
    # The unlabelled pretraining corpus (see <data root>/pretrain/README.md): the EyeDisease4 training images (its
    # class folders are ignored; its test split is held back) and the TVHL patients who are not in OCT_DME.
    "EyeDisease4:train": _glob("EyeDisease4/train", "EyeDisease4:train", modality="cfp", recursive=True),
    "TVHL:cfp": _glob("pretrain/cfp/TVHL-other-patients", "TVHL:cfp", modality="cfp"),
    "TVHL:oct": _glob("pretrain/oct/TVHL-other-patients", "TVHL:oct", modality="oct"),
}


def is_named_source(spec: str) -> bool:
    """True when ``spec`` is a comma-separated list of known ``DATASET:split`` tokens."""
    tokens = [t.strip() for t in str(spec).split(",") if t.strip()]
    return bool(tokens) and all(t in SOURCES for t in tokens)


def resolve_named_source(spec: str, data_root: "str | Path", modality: str) -> List[Path]:
    """The image files of a comma-separated list of ``DATASET:split`` tokens."""
    m = get_modality(modality).name
    files: List[Path] = []
    for token in (t.strip() for t in spec.split(",") if t.strip()):
        if token not in SOURCES:
            raise DataError(f"unknown data source {token!r}; known: {', '.join(SOURCES)} (or pass a folder / CSV)")
        files.extend(SOURCES[token](Path(data_root), m))
    return files


def write_source_csv(files: List[Path], path: "str | Path") -> Path:
    """Write absolute paths as a one-column ``path`` CSV (the form ``--data`` accepts).

    Every rank of a ``torchrun`` job resolves the named source before any process group exists and writes the same
    list, possibly into the same shared folder while another rank reads it. So the file is written to a temporary
    name of this process and renamed over ``path`` (a reader sees the old or the new file, never a partial one), and
    left alone when it already holds exactly this list.
    """
    path = Path(path)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path"])
    for f in files:
        writer.writerow([str(Path(f).resolve())])
    text = buffer.getvalue()
    try:
        if path.read_text() == text:
            return path
    except (OSError, UnicodeDecodeError):
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path

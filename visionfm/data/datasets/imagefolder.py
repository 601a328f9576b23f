"""RETFound's ImageFolder layout: ``<root>/{train,val,test}/<class name>/<image>``.

Class names are the folder names under ``train/`` (sorted numerically when they are all integers, e.g. DR
grades ``0..4``, else alphabetically, unless an explicit order is given). ``val/`` may be missing, in which
case a seeded, stratified part of ``train/`` is held out for validation (ImageFolder trees carry no patient
ids, so that hold-out is per image; it is logged).

Example layout::

    APTOS/
      train/0/001.png  train/1/002.png ...
      val/0/...        val/1/...
      test/0/...       test/1/...
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..io import is_image_file
from ..unlabeled import DataError
from .labeled import SPLITS, LabeledSample, LabeledSplits, grouped_split, own_group

__all__ = ["read_imagefolder", "order_class_names"]

log = logging.getLogger(__name__)

_SPLIT_ALIASES = {"train": ("train", "training"), "val": ("val", "valid", "validation"), "test": ("test", "testing")}


def order_class_names(names: Sequence[str], explicit: Optional[Sequence[str]] = None, where: str = "") -> List[str]:
    """Class order: ``explicit`` when given (it must cover ``names``), numeric when all names are integers,
    else alphabetical."""
    names = sorted(set(str(n) for n in names))
    if explicit:
        explicit = [str(n) for n in explicit]
        unknown = [n for n in names if n not in explicit]
        if unknown:
            raise DataError(f"{where}: label(s) {unknown} are not among the given class names {explicit}")
        return explicit
    if all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return names


def _find_split(root: Path, split: str) -> Optional[Path]:
    for name in _SPLIT_ALIASES[split]:
        if (root / name).is_dir():
            return root / name
    return None


def _scan(split_dir: Path) -> Dict[str, List[Path]]:
    classes: Dict[str, List[Path]] = {}
    ignored = 0
    for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = []
        for f in sorted(class_dir.rglob("*")):
            if not f.is_file() or f.name.startswith("."):
                continue
            if is_image_file(f):
                files.append(f)
            else:
                ignored += 1
        classes[class_dir.name] = files
    if ignored:
        log.warning("%s: ignored %d file(s) that are not images (by extension)", split_dir, ignored)
    return classes


def read_imagefolder(root: "str | os.PathLike", class_names: Optional[Sequence[str]] = None,
                     kind: str = "multiclass", val_fraction: float = 0.15, seed: int = 0) -> LabeledSplits:
    """Read an ImageFolder tree.

    Args:
        root: Folder holding ``train/``, ``val/`` (optional) and ``test/``.
        class_names: Explicit class order (needed for ordinal labels whose names do not sort into grade
            order).
        kind: ``multiclass`` or ``ordinal`` (an ImageFolder tree cannot hold multi-label data).
        val_fraction: Part of ``train/`` held out when there is no ``val/``.
        seed: Seed of that hold-out.

    Raises:
        DataError: a missing folder, a class folder without images, or a class in ``val``/``test`` that
            ``train`` lacks; each message names the folder.
    """
    root = Path(root)
    if kind == "multilabel":
        raise DataError("an ImageFolder tree holds one class per image; use --dataset csv with several label "
                        "columns for multi-label data")
    if not root.is_dir():
        raise DataError(f"{root}: no such folder; --dataset imagefolder expects --data-root DIR with "
                        "train/, val/ and test/ folders of class sub-folders")
    dirs = {s: _find_split(root, s) for s in SPLITS}
    for s in ("train", "test"):
        if dirs[s] is None:
            raise DataError(f"{root}: no {s}/ folder; expected {root}/train/<class>/*.png, {root}/val/<class>/... "
                            f"and {root}/test/<class>/...")
    scanned = {s: _scan(d) for s, d in dirs.items() if d is not None}
    train_classes = scanned["train"]
    if not train_classes:
        raise DataError(f"{dirs['train']}: no class folders")
    for name, files in train_classes.items():
        if not files:
            raise DataError(f"{dirs['train'] / name}: class folder holds no images")
    names = order_class_names(train_classes, class_names, str(root))
    index = {n: i for i, n in enumerate(names)}
    splits: Dict[str, List[LabeledSample]] = {}
    for split, classes in scanned.items():
        extra = [c for c in classes if c not in index]
        if extra:
            raise DataError(f"{dirs[split]}: class folder(s) {extra} do not exist under {dirs['train']}")
        splits[split] = [LabeledSample(f, index[c], own_group(f, root)) for c, files in classes.items() for f in files]
    notes = []
    if dirs["val"] is None:
        held = grouped_split(splits["train"], (1.0 - val_fraction, val_fraction, 0.0), seed)
        splits["train"], splits["val"] = held["train"], held["val"]
        note = f"{root} has no val/ folder: held out {len(splits['val'])} train images (seed {seed}) for validation"
        log.info(note)
        notes.append(note)
    return LabeledSplits(splits, names, kind, description=f"ImageFolder {root}", notes=notes)

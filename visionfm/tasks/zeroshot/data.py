"""Image + label / image + caption collections for CLIP training and zero-shot evaluation.

Sources (``--data``):

- ``OCT_DME``: the OCT / fundus DME-DR dataset (:mod:`visionfm.data.datasets.oct_fundus`), patient-level splits;
  categories ``diabetic_macular_edema`` / ``no_diabetic_macular_edema`` (and, with ``labels: [dme, dr]``, the DR
  grade); every image carries its patient and eye, so OCT and fundus images of the same eye can be paired.
- ``IDRiD``: lesion presence in IDRiD's segmentation part (a lesion is present when the image has a mask file for
  it): microaneurysms, haemorrhages, hard and soft exudates; ``train`` is the official training set, ``test`` the
  testing set (there is no validation split). Fundus only.
- a CSV file: a ``path`` column (relative to the CSV's folder) and a ``label`` column (category names of the
  knowledge file, several separated by ``;``) and/or a ``caption`` column (free text, used as is); optional
  ``split`` (``train``/``val``/``test``; rows without one are training rows), and ``patient`` + ``eye`` or ``pair_id`` for cross-modal pairing.
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ...data.io import read_image
from ...data.unlabeled import DataError, square_and_resize
from ...modalities import get_modality
from ...data.knowledge import Category, KnowledgeBase

__all__ = ["CaptionedImage", "BUILTIN_SOURCES", "load_source", "oct_dme_records", "idrid_lesion_records",
           "csv_records", "load_pixels", "stratified_limit", "DME_CATEGORIES", "DR_CATEGORIES"]

log = logging.getLogger(__name__)

DME_CATEGORIES = {0: "no_diabetic_macular_edema", 1: "diabetic_macular_edema"}
DR_CATEGORIES = {0: "no_diabetic_retinopathy", 1: "non_proliferative_diabetic_retinopathy",
                 2: "proliferative_diabetic_retinopathy"}
IDRID_FOLDER = "IDRiD"
IDRID_LESIONS = {"1. Microaneurysms": ("MA", "microaneurysms"), "2. Haemorrhages": ("HE", "haemorrhages"),
                 "3. Hard Exudates": ("EX", "hard_exudates"), "4. Soft Exudates": ("SE", "soft_exudates")}
BUILTIN_SOURCES = {"oct_dme": "OCT_DME", "idrid": "IDRiD"}


@dataclass(frozen=True)
class CaptionedImage:
    """One training or evaluation image.

    Attributes:
        path: Image file.
        modality: Canonical modality name.
        categories: Knowledge-file category keys the caption is built from (empty when ``caption`` is given).
        caption: A fixed caption (CSV ``caption`` column); otherwise captions are built from ``categories``.
        label: Class index for evaluation (OCT_DME: DME 0/1), if any.
        pair_key: Identifies the eye across modalities (``<patient>_<eye>``), if known.
        patient: Patient id, if known.
    """

    path: Path
    modality: str
    categories: Tuple[str, ...] = ()
    caption: Optional[str] = None
    label: Optional[int] = None
    pair_key: Optional[str] = None
    patient: Optional[str] = None

    @property
    def label_key(self) -> str:
        """What defines positives in the label-aware loss: the category set, or the fixed caption."""
        return "|".join(self.categories) if self.categories else f"caption:{self.caption}"


def oct_dme_records(data_root: "str | os.PathLike", modality: str, split: str, labels: Sequence[str] = ("dme",),
                    seed: int = 0) -> List[CaptionedImage]:
    """The OCT_DME dataset's images of one modality and split, with DME (and optionally DR) categories."""
    from ...data.datasets.oct_fundus import load_splits  # noqa: PLC0415

    unknown = set(labels) - {"dme", "dr"}
    if unknown or not labels:
        raise DataError(f"OCT_DME labels must be a non-empty subset of [dme, dr], got {list(labels)}")
    splits = load_splits(data_root, modality, seed=seed)
    if split not in splits:
        raise DataError(f"OCT_DME has splits {', '.join(splits)}; got {split!r}")
    out = []
    for r in splits[split]:
        cats = []
        if "dme" in labels:
            cats.append(DME_CATEGORIES[r.dme])
        if "dr" in labels and r.dr is not None:
            cats.append(DR_CATEGORIES[r.dr])
        out.append(CaptionedImage(r.path, r.modality, tuple(cats), None, r.dme, f"{r.patient}_{r.eye}", r.patient))
    return out


def idrid_lesion_records(data_root: "str | os.PathLike", split: str) -> List[CaptionedImage]:
    """IDRiD segmentation images with the lesions they have masks for (``train`` or ``test``)."""
    names = {"train": "a. Training Set", "test": "b. Testing Set"}
    if split not in names:
        raise DataError(f"IDRiD lesion presence has splits train and test (no validation split); got {split!r}")
    root = Path(data_root) / IDRID_FOLDER / "A. Segmentation"
    images = root / "1. Original Images" / names[split]
    masks = root / "2. All Segmentation Groundtruths" / names[split]
    if not images.is_dir() or not masks.is_dir():
        raise DataError(f"IDRiD not found: expected {images} and {masks} (the official 'A. Segmentation' layout); "
                        "put the dataset there or pass --data-root")
    files = sorted(p for p in images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".tif"))
    if not files:
        raise DataError(f"{images}: no images")
    out = []
    for f in files:
        cats = tuple(key for folder, (suffix, key) in IDRID_LESIONS.items()
                     if (masks / folder / f"{f.stem}_{suffix}.tif").is_file())
        if not cats:
            raise DataError(f"{f}: no lesion mask of any kind found under {masks}; is the layout complete?")
        out.append(CaptionedImage(f, "cfp", cats, None, None, None, None))
    return out


def csv_records(path: "str | os.PathLike", modality: str, split: Optional[str], knowledge: KnowledgeBase,
                default_split: str = "train") -> List[CaptionedImage]:
    """Rows of an image + label / image + caption CSV (see the module docstring) that belong to ``split``; a row
    without a ``split`` value belongs to ``default_split`` (so an unsplit CSV is training data only, and a CSV given
    for evaluation is evaluated whole by passing ``default_split=split``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such CSV file")
    m = get_modality(modality).name
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        fields = [f.strip().lower() for f in (reader.fieldnames or [])]
        if "path" not in fields or not ({"label", "caption"} & set(fields)):
            raise DataError(f"{path}: needs a 'path' column and a 'label' and/or 'caption' column (has {fields})")
        rows = [{(k or "").strip().lower(): (v or "").strip() for k, v in row.items()} for row in reader]
    out = []
    for line, row in enumerate(rows, start=2):
        if split and (row.get("split") or default_split) != split:
            continue
        image = path.parent / row["path"]
        if not row["path"] or not image.is_file():
            raise DataError(f"{path}:{line}: image {row['path']!r} does not exist (paths are relative to the CSV)")
        cats: Tuple[str, ...] = ()
        if row.get("label"):
            cats = tuple(ensure_category(knowledge, name.strip(), path).key
                         for name in row["label"].split(";") if name.strip())
        caption = row.get("caption") or None
        if not cats and not caption:
            raise DataError(f"{path}:{line}: neither a label nor a caption")
        pair = row.get("pair_id") or (f"{row['patient']}_{row.get('eye', '')}" if row.get("patient") else None)
        out.append(CaptionedImage(image, m, cats if not caption else (), caption, None, pair, row.get("patient") or None))
    if not out:
        raise DataError(f"{path}: no rows" + (f" of split {split!r}" if split else ""))
    return out


def ensure_category(knowledge: KnowledgeBase, name: str, where: "str | os.PathLike") -> Category:
    """The category of a label; a label the knowledge file does not know becomes a category with only its name (and a
    warning, because it gets no expert descriptions)."""
    found = knowledge.find(name)
    if found is not None:
        return found
    key = name.strip()
    log.warning("%s: label %r is not in %s; captions will use the name only (add it to the knowledge file to give "
                "it descriptions)", where, name, knowledge.source)
    cat = Category(key, (key,), {})
    knowledge.add(cat)
    return cat


def load_source(source: str, modality: str, split: str, data_root: "str | os.PathLike", knowledge: KnowledgeBase,
                labels: Sequence[str] = ("dme",), seed: int = 0) -> List[CaptionedImage]:
    """Records of one ``--data`` source (a built-in name, case-insensitive, or a CSV file) for a modality and split."""
    builtin = BUILTIN_SOURCES.get(str(source).lower())
    m = get_modality(modality).name
    if builtin == "OCT_DME":
        return oct_dme_records(data_root, m, split, labels, seed)
    if builtin == "IDRiD":
        if m != "cfp":
            raise DataError(f"IDRiD holds colour fundus images; it cannot train the {m} encoder")
        return idrid_lesion_records(data_root, split)
    if str(source).lower().endswith(".csv"):
        return csv_records(source, m, split, knowledge)
    raise DataError(f"unknown data source {source!r}: use {', '.join(BUILTIN_SOURCES.values())} or a .csv file")


def stratified_limit(records: Sequence[CaptionedImage], limit: Optional[int]) -> List[CaptionedImage]:
    """At most ``limit`` records, taken round-robin over labels (or label keys) so that a small quick-trial subset
    still holds every class; order within a class is kept."""
    records = list(records)
    if not limit or limit >= len(records):
        return records
    groups: Dict[str, List[CaptionedImage]] = {}
    for r in records:
        groups.setdefault(str(r.label) if r.label is not None else r.label_key, []).append(r)
    out: List[CaptionedImage] = []
    queues = [list(g) for _, g in sorted(groups.items())]
    while len(out) < limit:
        for q in queues:
            if q and len(out) < limit:
                out.append(q.pop(0))
    return out


def load_pixels(paths: Sequence["str | os.PathLike"], modality: str, size: int) -> torch.Tensor:
    """Decode, square (as the modality's training images are) and resize images into ``uint8 (N, C, size, size)``."""
    m = get_modality(modality)
    out = np.empty((len(paths), size, size, m.channels), np.uint8)
    for i, p in enumerate(paths):
        out[i] = square_and_resize(read_image(p, channels=m.channels), size, m.augment.square_crop)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()

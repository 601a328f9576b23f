"""The OCT + colour fundus DME/DR dataset (Hughes Cano et al.), folder ``OCT_AND_EYE_FUNDUS_DME_DR``.

Images are named ``<patient>_<OD|OI>_<o|f>_<n>.jpg``; labels come from ``OCT_subset.csv`` and
``EYE_FUNDUS_subset.csv`` (columns ``path, Name, DME, DR``) or, for the full release, ``OCT.csv`` and
``EYE FUNDUS.csv``. Splits are by patient, computed once over the patients of both modalities, so that a
patient's OCT and fundus images are always in the same split (no leakage across tasks or modalities).
"""

from __future__ import annotations

import csv
import hashlib
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ...modalities import get_modality
from .locate import DatasetNotFoundError, dataset_folder

__all__ = ["FOLDER", "DR_GRADES", "LabeledImage", "DatasetNotFoundError", "read_records", "patient_splits",
           "load_splits"]

FOLDER = "OCT_AND_EYE_FUNDUS_DME_DR"
DR_GRADES = {"0": 0, "NPDR": 1, "PDR": 2}
_LABEL_FILES = {"oct": ("OCT_subset.csv", "OCT.csv"), "cfp": ("EYE_FUNDUS_subset.csv", "EYE FUNDUS.csv")}
_NAME = re.compile(r"^(?P<patient>\d+)_(?P<eye>O[DI])_(?P<kind>[of])_(?P<n>\d+)$", re.IGNORECASE)


@dataclass(frozen=True)
class LabeledImage:
    """One image with its labels. ``dr`` is ``None`` where the image was not graded."""

    path: Path
    patient: str
    eye: str  # "OD" (right) or "OI" (left)
    modality: str
    dme: int
    dr: Optional[int]
    extra: Dict[str, str] = field(default_factory=dict, compare=False, hash=False)


def _layout_help(root: Path) -> str:
    return (f"expected {root}/{FOLDER}/ with OCT/, 'EYE FUNDUS/' and the label CSVs OCT_subset.csv (or OCT.csv) and "
            f"EYE_FUNDUS_subset.csv (or 'EYE FUNDUS.csv') with columns path,Name,DME,DR; put the dataset there or "
            f"pass --data-root")


def read_records(data_root: "str | Path", modality: str) -> List[LabeledImage]:
    """All labelled images of one modality (``oct`` or ``cfp``)."""
    m = get_modality(modality).name
    if m not in _LABEL_FILES:
        raise ValueError(f"{FOLDER} holds OCT and colour fundus images; modality {m!r} is not in it")
    root = dataset_folder(data_root, FOLDER, lambda p: any((p / n).is_file() for n in _LABEL_FILES[m]))
    if not root.is_dir():
        raise DatasetNotFoundError(f"dataset OCT_DME not found: {root} does not exist; {_layout_help(Path(data_root))}")
    csv_path = next((root / n for n in _LABEL_FILES[m] if (root / n).is_file()), None)
    if csv_path is None:
        raise DatasetNotFoundError(f"{root}: no label file {' or '.join(_LABEL_FILES[m])}; {_layout_help(Path(data_root))}")
    files = {p.name.lower(): p for p in root.rglob("*.jpg")}
    records: List[LabeledImage] = []
    with open(csv_path, newline="", encoding="utf-8-sig") as fh:
        for line, row in enumerate(csv.DictReader(fh), start=2):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
            name = row.get("Name") or Path(row.get("path", "")).stem
            match = _NAME.match(name)
            if not match:
                raise ValueError(f"{csv_path}:{line}: image name {name!r} is not <patient>_<OD|OI>_<o|f>_<n>")
            path = root / row["path"] if row.get("path") else files.get(f"{name}.jpg".lower())
            if path is None or not path.is_file():
                if "path" in row:  # the subset CSV promises its files
                    raise DatasetNotFoundError(f"{csv_path}:{line}: listed image {path or name} does not exist")
                continue  # the full-release CSV lists images that a subset does not carry
            if row.get("DME") not in ("0", "1"):
                raise ValueError(f"{csv_path}:{line}: DME label must be 0 or 1, got {row.get('DME')!r}")
            dr = DR_GRADES.get(row.get("DR", "").upper())
            records.append(LabeledImage(path, match["patient"], match["eye"].upper(), m, int(row["DME"]), dr))
    if not records:
        raise DatasetNotFoundError(f"{csv_path}: no images found")
    return records


def patient_splits(patients: Dict[str, int], fractions: Tuple[float, float, float] = (0.6, 0.15, 0.25),
                   seed: int = 0) -> Dict[str, str]:
    """Assign each patient to ``train``/``val``/``test``, stratified by a per-patient label.

    Deterministic for a seed and independent of the order patients are given in.
    """
    out: Dict[str, str] = {}
    for label in sorted(set(patients.values())):
        group = sorted((p for p, lab in patients.items() if lab == label),
                       key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).hexdigest())
        random.Random(seed).shuffle(group)
        n = len(group)
        n_test = int(round(fractions[2] * n))
        n_val = int(round(fractions[1] * n))
        for i, patient in enumerate(group):
            out[patient] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return out


def load_splits(data_root: "str | Path", modality: str, seed: int = 0,
                fractions: Sequence[float] = (0.6, 0.15, 0.25)) -> Dict[str, List[LabeledImage]]:
    """Patient-level train/val/test splits of one modality's images.

    The split is computed over the patients of both modalities (a patient counts as DME-positive if any of
    their images is), so a given patient lands in the same split for OCT and for fundus.
    """
    everyone: Dict[str, int] = {}
    root = Path(data_root)
    for mod in _LABEL_FILES:
        try:
            recs = read_records(root, mod)
        except DatasetNotFoundError:
            if mod == get_modality(modality).name:
                raise
            continue
        for r in recs:
            everyone[r.patient] = max(everyone.get(r.patient, 0), r.dme)
    assignment = patient_splits(everyone, tuple(fractions), seed)
    splits: Dict[str, List[LabeledImage]] = {"train": [], "val": [], "test": []}
    for r in read_records(root, modality):
        splits[assignment[r.patient]].append(r)
    return splits

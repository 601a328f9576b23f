"""A CSV listing images and labels, with an optional patient id column and an optional split column.

Columns (names matched case-insensitively; each can be named explicitly):
    * image path: ``path``, ``image``, ``file``, ``filename``, ``image_path`` (relative paths are relative to
      ``image_root``, by default the CSV's folder);
    * label: ``label``, ``class``, ``diagnosis``, ``grade`` (one class name per row); or, for multi-label
      data, several 0/1 columns given as ``label_columns``;
    * patient id (optional): ``patient``, ``patient_id``, ``subject``, ``subject_id``; when present, splits
      are made by patient so no patient is in two splits;
    * split (optional): ``split`` with ``train``/``val``/``test``; when present it is used as given.

Example::

    path,label,patient
    img/001.png,DME,17
    img/002.png,normal,17
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..io import is_image_file
from ..unlabeled import DataError
from .imagefolder import order_class_names
from .labeled import SPLITS, LabeledSample, LabeledSplits, check_files, grouped_split, own_group

__all__ = ["read_csv_dataset"]

log = logging.getLogger(__name__)

IMAGE_COLUMNS = ("path", "image", "file", "filename", "image_path", "img")
LABEL_COLUMNS = ("label", "class", "diagnosis", "grade")
PATIENT_COLUMNS = ("patient", "patient_id", "patientid", "subject", "subject_id")
SPLIT_COLUMNS = ("split",)
_SPLIT_VALUES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "test": "test", "testing": "test"}


def _column(header: Dict[str, str], given: Optional[str], candidates: Sequence[str], what: str, csv_path: Path,
            required: bool) -> Optional[str]:
    """The header name of a column: the given one (must exist) or the first candidate present."""
    if given:
        if given.lower() not in header:
            raise DataError(f"{csv_path}: no {what} column {given!r}; columns are {list(header.values())}")
        return header[given.lower()]
    for name in candidates:
        if name in header:
            return header[name]
    if required:
        raise DataError(f"{csv_path}: no {what} column; name it one of {', '.join(candidates)} or pass its name "
                        f"(columns are {list(header.values())})")
    return None


def read_csv_dataset(csv_path: "str | os.PathLike", image_root: "str | os.PathLike | None" = None,
                     kind: str = "multiclass", image_column: Optional[str] = None,
                     label_column: Optional[str] = None, label_columns: Optional[Sequence[str]] = None,
                     patient_column: Optional[str] = None, split_column: Optional[str] = None,
                     class_names: Optional[Sequence[str]] = None,
                     fractions: Sequence[float] = (0.6, 0.15, 0.25), seed: int = 0) -> LabeledSplits:
    """Read a labelled CSV and split it.

    Args:
        csv_path: The CSV file.
        image_root: Folder that relative image paths start from (default: the CSV's folder).
        kind: ``multiclass``, ``ordinal`` or ``multilabel`` (multi-label needs ``label_columns``).
        image_column, label_column, patient_column, split_column: Explicit column names (else detected).
        label_columns: The 0/1 columns of a multi-label CSV, in class order.
        class_names: Explicit class order for single-label data.
        fractions: train/val/test fractions when there is no split column.
        seed: Seed of that split.

    Raises:
        DataError: naming the CSV (and line) for a missing column, an empty label, a bad 0/1 value, an unknown
            split name or an image that does not exist.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: CSV file not found")
    root = Path(image_root) if image_root else csv_path.parent
    with open(csv_path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames:
            raise DataError(f"{csv_path}: empty CSV (no header)")
        header = {name.strip().lower(): name for name in reader.fieldnames if name}
        rows = list(reader)
    if not rows:
        raise DataError(f"{csv_path}: the CSV has a header but no rows")
    img_col = _column(header, image_column, IMAGE_COLUMNS, "image path", csv_path, True)
    group_col = _column(header, patient_column, PATIENT_COLUMNS, "patient id", csv_path, False)
    split_col = _column(header, split_column, SPLIT_COLUMNS, "split", csv_path, False)
    if kind == "multilabel":
        if not label_columns:
            raise DataError(f"{csv_path}: multi-label data needs the names of its 0/1 label columns "
                            "(--label-columns a,b,c)")
        label_cols = [_column(header, c, (), "label", csv_path, True) for c in label_columns]
        names = [str(c) for c in label_columns]
    else:
        if label_columns:
            raise DataError(f"{csv_path}: several label columns are given but the label type is {kind}; pass "
                            "--label-type multilabel")
        label_col = _column(header, label_column, LABEL_COLUMNS, "label", csv_path, True)
        raw = []
        for line, row in enumerate(rows, start=2):
            value = (row.get(label_col) or "").strip()
            if not value:
                raise DataError(f"{csv_path}:{line}: empty label in column {label_col!r}")
            raw.append(value)
        names = order_class_names(raw, class_names, str(csv_path))
        if kind == "ordinal" and not class_names and not all(n.lstrip("-").isdigit() for n in names):
            raise DataError(f"{csv_path}: ordinal labels {names} are not integer grades; give their order with "
                            "--set data.class_names=[...]")
        index = {n: i for i, n in enumerate(names)}
    samples: List[LabeledSample] = []
    split_of: List[str] = []
    for i, (line, row) in enumerate(enumerate(rows, start=2)):
        rel = (row.get(img_col) or "").strip()
        if not rel:
            raise DataError(f"{csv_path}:{line}: empty image path in column {img_col!r}")
        path = Path(rel) if Path(rel).is_absolute() else root / rel
        if not is_image_file(path):
            raise DataError(f"{csv_path}:{line}: {rel!r} does not look like an image file (by extension)")
        if kind == "multilabel":
            values = []
            for col in label_cols:
                v = (row.get(col) or "").strip()
                if v not in ("0", "1", "0.0", "1.0"):
                    raise DataError(f"{csv_path}:{line}: multi-label column {col!r} must be 0 or 1, got {v!r}")
                values.append(int(float(v)))
            label = tuple(values)
        else:
            label = index[raw[i]]
        group = (row.get(group_col) or "").strip() if group_col else own_group(path, root)
        if group_col and not group:
            raise DataError(f"{csv_path}:{line}: empty patient id in column {group_col!r}")
        samples.append(LabeledSample(path, label, group))
        if split_col:
            value = (row.get(split_col) or "").strip().lower()
            if value not in _SPLIT_VALUES:
                raise DataError(f"{csv_path}:{line}: split must be train, val or test, got {value!r}")
            split_of.append(_SPLIT_VALUES[value])
    check_files(samples, csv_path)
    notes = []
    if split_col:
        splits: Dict[str, List[LabeledSample]] = {s: [] for s in SPLITS}
        for sample, split in zip(samples, split_of):
            splits[split].append(sample)
        if group_col:
            _check_groups_disjoint(splits, csv_path)
        notes.append(f"splits from column {split_col!r}")
    else:
        splits = grouped_split(samples, fractions, seed)
        how = f"by patient (column {group_col!r})" if group_col else "by image (no patient column)"
        notes.append(f"split {how}, stratified, seed {seed}, fractions {list(fractions)}")
    log.info("%s: %s", csv_path, notes[-1])
    return LabeledSplits(splits, names, kind, description=f"CSV {csv_path}", notes=notes)


def _check_groups_disjoint(splits: Dict[str, List[LabeledSample]], csv_path: Path) -> None:
    seen: Dict[str, str] = {}
    for split, samples in splits.items():
        for s in samples:
            other = seen.setdefault(s.group_key, split)
            if other != split:
                raise DataError(f"{csv_path}: patient {s.group!r} appears in both the {other} and the {split} "
                                "split of the split column (that leaks patients across splits)")

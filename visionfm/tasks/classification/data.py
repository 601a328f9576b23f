"""The classification datasets by name: ``OCT_DME`` (the OCT/fundus DME-DR set), ``EyeDisease4`` (four fundus
classes; evaluation and selection splits carved from its training split), ``imagefolder`` and ``csv``.

Each is turned into a :class:`~visionfm.data.datasets.labeled.LabeledSplits` with patient-level splits where
patient ids exist.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional

from ...data.datasets import oct_fundus
from ...data.datasets.csvfile import read_csv_dataset
from ...data.datasets.eyedisease4 import read_eyedisease4
from ...data.datasets.imagefolder import read_imagefolder
from ...data.datasets.labeled import SPLITS, LabeledSample, LabeledSplits
from ...data.unlabeled import DataError
from ...modalities import get_modality

__all__ = ["DATASETS", "OCT_DME_TASKS", "canonical_dataset", "read_oct_dme", "load_classification_data"]

log = logging.getLogger(__name__)

DATASETS = ("OCT_DME", "EyeDisease4", "imagefolder", "csv")
#: OCT_DME targets: DME yes/no (binary) and DR grade (ordinal; images without a grade are left out).
OCT_DME_TASKS = {"dme": ("multiclass", ["no DME", "DME"]), "dr": ("ordinal", ["no DR", "NPDR", "PDR"])}


def canonical_dataset(name: str) -> str:
    for known in DATASETS:
        if str(name).strip().lower() == known.lower():
            return known
    raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def read_oct_dme(data_root: "str | Path", modality: str, task: str = "dme", split_seed: int = 0,
                 kind: Optional[str] = None) -> LabeledSplits:
    """The OCT/fundus DME-DR set (``--modality oct``: OCT B-scans; ``cfp``: fundus photographs) with its
    patient-level splits (:func:`visionfm.data.datasets.oct_fundus.load_splits`).

    Args:
        data_root: Folder holding ``OCT_AND_EYE_FUNDUS_DME_DR``.
        modality: ``oct`` or ``cfp``.
        task: ``dme`` or ``dr``.
        split_seed: Seed of the patient split. Keep the default 0: pretraining leaves out the test patients of
            that split.
        kind: Override the label kind (e.g. ``multiclass`` to treat DR grades as unordered classes).
    """
    task = str(task).lower()
    if task not in OCT_DME_TASKS:
        raise DataError(f"OCT_DME task must be one of {', '.join(OCT_DME_TASKS)}, got {task!r}")
    default_kind, names = OCT_DME_TASKS[task]
    kind = kind or default_kind
    if kind == "multilabel":
        raise DataError("OCT_DME labels are single-label (dme: yes/no, dr: grade); multilabel does not apply")
    raw = oct_fundus.load_splits(data_root, get_modality(modality).name, seed=split_seed)
    splits: Dict[str, List[LabeledSample]] = {}
    notes = [f"patient-level split of {oct_fundus.FOLDER} (seed {split_seed})"]
    for split in SPLITS:
        records = raw[split]
        if task == "dme":
            splits[split] = [LabeledSample(r.path, int(r.dme), r.patient) for r in records]
        else:
            graded = [r for r in records if r.dr is not None]
            if len(graded) < len(records):
                note = f"{split}: left out {len(records) - len(graded)} image(s) without a DR grade"
                log.info(note)
                notes.append(note)
            splits[split] = [LabeledSample(r.path, int(r.dr), r.patient) for r in graded]
    return LabeledSplits(splits, list(names), kind,
                         description=f"OCT_DME ({get_modality(modality).name}, {task}) in {Path(data_root)}",
                         notes=notes)


def load_classification_data(cfg: Dict[str, Any], data_root: Path) -> LabeledSplits:
    """The dataset a merged classification config names (``dataset``, ``task``, ``data.*``)."""
    name = canonical_dataset(cfg["dataset"])
    data = cfg["data"]
    kind = data.get("label_type")
    if name == "OCT_DME":
        return read_oct_dme(data_root, cfg["modality"], cfg.get("task") or "dme", int(data.get("split_seed", 0)), kind)
    if name == "EyeDisease4":  # 'test' is a 20 % carve of train/ (the real test split is held back)
        return read_eyedisease4(data_root, seed=int(data.get("split_seed", 0)))
    if name == "imagefolder":
        return read_imagefolder(data_root, data.get("class_names"), kind or "multiclass",
                                float(data.get("val_fraction", 0.15)), int(data.get("split_seed", 0)))
    if not data.get("csv"):
        raise DataError("--dataset csv needs --csv FILE (a CSV with image path and label columns)")
    label_columns = data.get("label_columns")
    if isinstance(label_columns, str):
        label_columns = [c.strip() for c in label_columns.split(",") if c.strip()]
    if kind is None:
        kind = "multilabel" if label_columns else "multiclass"
    return read_csv_dataset(data["csv"], data.get("image_root"), kind, data.get("image_column"),
                            data.get("label_column"), label_columns, data.get("patient_column"),
                            data.get("split_column"), data.get("class_names"),
                            tuple(data.get("split_fractions", (0.6, 0.15, 0.25))), int(data.get("split_seed", 0)))

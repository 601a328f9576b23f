"""IDRiD for detection: boxes derived from the segmentation masks (part A) and from the centre points of the
localisation part (part C).

Targets and protocols:

* ``od`` (optic disc), part A: one box per image, the box of the optic-disc mask (an empty or missing OD mask
  is an error). The true point for the point metric is the box centre and the disc diameter the mean of the
  box's sides. Train/val: the 54 images of ``a. Training Set``, of which ``val_count`` (default 10) chosen by a
  fixed seeded shuffle form the validation split; test: the 27 images of ``b. Testing Set``.
* ``lesions``, part A, same splits: classes ``haemorrhage`` (HE), ``hard_exudate`` (EX), ``soft_exudate`` (SE);
  boxes from connected components of each mask, merged and filtered by
  :func:`visionfm.data.boxes.component_boxes` (``merge_gap`` and ``min_size`` at the original
  resolution; defaults in ``configs/det/default.yaml``). A missing lesion mask means the lesion is absent.
  Microaneurysms are left out: at 10-20 pixels in a 4288-pixel image they vanish at detector resolution.
* ``fovea`` (and ``od`` with ``source="localization"``), part C: a ``box_size`` square around each centre point
  of the markup CSVs (clipped to the image). Disc diameter for the 1/8-DD criterion: ``disc_diameter`` (default
  522 px, the median optic-disc size over the 81 part-A masks; part C carries no disc outline).
  Protocol: when part C's ``a. Training Set`` images are present (the full release), train/val come from them
  and test is ``b. Testing Set``. Otherwise (the copy in ``shared/data`` has only testing images 001-060) the
  present testing images are split by a fixed seeded shuffle into ``loc_test_count`` test (default 20),
  ``val_count`` validation (default 8) and the rest (32) training images. The two parts are different image
  sets with different numbering, so they are never mixed.

Example:
    >>> recs, classes = load_idrid_detection("data", "od", "val", limit=2)  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import logging
import random
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..boxes import DetectionRecord, check_boxes, component_boxes, mask_box, point_box
from ..io import check_image, is_image_file
from .generic_seg import DatasetNotFoundError, read_mask
from .idrid_seg import FOLDER, list_pairs
from .locate import dataset_folder

__all__ = ["TARGET_CLASSES", "LESION_CODES", "NOMINAL_DISC_DIAMETER", "SPLITS", "read_markups",
           "load_idrid_detection"]

log = logging.getLogger(__name__)

TARGET_CLASSES: Dict[str, Tuple[str, ...]] = {
    "od": ("optic_disc",),
    "fovea": ("fovea",),
    "lesions": ("haemorrhage", "hard_exudate", "soft_exudate"),
}
#: Lesion class -> IDRiD mask code.
LESION_CODES: Dict[str, str] = {"haemorrhage": "HE", "hard_exudate": "EX", "soft_exudate": "SE"}
#: Median optic-disc size (mean of box width and height) over the 81 part-A masks, 4288x2848 images.
NOMINAL_DISC_DIAMETER = 522.0
SPLITS = ("train", "val", "test")
SPLIT_SEED = 0  # fixed, independent of the run's --seed: the validation images never change between runs

LOC_PART = "C. Localization"
_LOC_IMAGES = {"train": "a. Training Set", "test": "b. Testing Set"}
_MARKUPS = {
    "od": ("1. Optic Disc Center Location", {"train": "a. IDRiD_OD_Center_Training Set_Markups.csv",
                                             "test": "b. IDRiD_OD_Center_Testing Set_Markups.csv"}),
    "fovea": ("2. Fovea Center Location", {"train": "IDRiD_Fovea_Center_Training Set_Markups.csv",
                                           "test": "IDRiD_Fovea_Center_Testing Set_Markups.csv"}),
}


def _seeded_order(names: Sequence[str]) -> List[str]:
    order = sorted(names)
    random.Random(SPLIT_SEED).shuffle(order)
    return order


def _carve(names: Sequence[str], split: str, val_count: int) -> List[str]:
    """Training names split into ``train`` and ``val`` (``val_count`` of them, fixed shuffle)."""
    if not 0 < val_count < len(names):
        raise ValueError(f"val_count must be between 1 and {len(names) - 1} for {len(names)} training images, "
                         f"got {val_count}")
    order = _seeded_order(names)
    chosen = order[:val_count] if split == "val" else order[val_count:]
    return sorted(chosen)


# ----------------------------------------------------------------------------------------- part A (masks)
def _seg_records(data_root: Path, target: str, split: str, val_count: int, limit: Optional[int],
                 merge_gap: float, min_size: float) -> List[DetectionRecord]:
    official = "test" if split == "test" else "train"
    pairs = {p.name: p for p in list_pairs(data_root, official)}
    names = sorted(pairs) if split == "test" else _carve(list(pairs), split, val_count)
    if limit is not None:
        names = names[:limit]
    records = []
    for name in names:
        pair = pairs[name]
        width, height = check_image(pair.image)
        if target == "od":
            mask_path = pair.masks.get("OD")
            if mask_path is None:
                raise DatasetNotFoundError(f"{pair.image}: no optic-disc mask IDRiD_NN_OD.tif for this image")
            mask = _mask(mask_path, width, height)
            box = mask_box(mask, source=str(mask_path))
            records.append(DetectionRecord(
                name, pair.image, width, height, box[None], np.zeros(1, np.int64),
                point=(float(box[0] + box[2]) / 2, float(box[1] + box[3]) / 2),
                disc_diameter=float((box[2] - box[0]) + (box[3] - box[1])) / 2, source=str(mask_path)))
        else:
            boxes, labels = [], []
            for label, cls in enumerate(TARGET_CLASSES["lesions"]):
                mask_path = pair.masks.get(LESION_CODES[cls])
                if mask_path is None:
                    continue  # the dataset's way of saying the lesion is absent from this image
                found = component_boxes(_mask(mask_path, width, height), merge_gap, min_size)
                log.debug("%s: %d components -> %d merged -> %d boxes (%d below %s px)", mask_path,
                          found.components, found.merged, len(found.boxes), found.dropped, min_size)
                boxes.append(found.boxes)
                labels.append(np.full(len(found.boxes), label, np.int64))
            records.append(DetectionRecord(
                name, pair.image, width, height,
                np.concatenate(boxes) if boxes else np.zeros((0, 4), np.float32),
                np.concatenate(labels) if labels else np.zeros(0, np.int64),
                source=f"{pair.image} (lesion masks)"))
    return records


def _mask(path: Path, width: int, height: int) -> np.ndarray:
    mask = read_mask(path)
    if mask.shape != (height, width):
        raise ValueError(f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image is {width}x{height}")
    return mask


# ----------------------------------------------------------------------------------- part C (points, CSV)
def _header_key(name: str) -> str:
    return re.sub(r"[^a-z]", "", name.lower())


def read_markups(path: "str | Path") -> Dict[str, Tuple[float, float]]:
    """Read an IDRiD markup CSV (``Image No, X- Coordinate, Y - Coordinate``, trailing empty columns) into
    ``{image name: (x, y)}``. Blank rows are ignored; anything else malformed is an error naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(f"IDRiD markup file not found: {path}")
    points: Dict[str, Tuple[float, float]] = {}
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        keys = [_header_key(h) for h in header or []]
        try:
            i_name, i_x, i_y = keys.index("imageno"), keys.index("xcoordinate"), keys.index("ycoordinate")
        except ValueError:
            raise ValueError(f"{path}: header must have 'Image No', 'X- Coordinate', 'Y - Coordinate'; got {header}") \
                from None
        for line, row in enumerate(reader, start=2):
            if not any(cell.strip() for cell in row):
                continue
            try:
                name = row[i_name].strip()
                x, y = float(row[i_x]), float(row[i_y])
            except (IndexError, ValueError):
                raise ValueError(f"{path}:{line}: expected an image name and two numbers, got {row[:3]}") from None
            if not name:
                raise ValueError(f"{path}:{line}: empty image name")
            if name in points:
                raise ValueError(f"{path}:{line}: image {name} is listed twice")
            points[name] = (x, y)
    if not points:
        raise ValueError(f"{path}: no markup rows")
    return points


def _loc_images(root: Path, split: str) -> Dict[str, Path]:
    folder = root / "1. Original Images" / _LOC_IMAGES[split]
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.iterdir()) if p.is_file() and is_image_file(p)}


def _loc_records(data_root: Path, target: str, split: str, val_count: int, test_count: int,
                 limit: Optional[int], box_size: float, disc_diameter: float) -> List[DetectionRecord]:
    root = dataset_folder(data_root, FOLDER, lambda p: (p / LOC_PART).is_dir()) / LOC_PART
    if not root.is_dir():
        raise DatasetNotFoundError(f"dataset IDRiD (localisation) not found: {root} does not exist; expected "
                                   f"IDRiD/{LOC_PART}/1. Original Images/... and 2. Groundtruths/... (pass --data-root)")
    sub, files = _MARKUPS[target]
    truth_dir = root / "2. Groundtruths" / sub
    train_images = _loc_images(root, "train")
    test_images = _loc_images(root, "test")
    if train_images:  # full release: the official split
        source = "train" if split in ("train", "val") else "test"
        images = train_images if source == "train" else test_images
        points = read_markups(truth_dir / files[source])
        missing = sorted(set(points) - set(images))
        if missing:
            raise DatasetNotFoundError(f"{root / '1. Original Images' / _LOC_IMAGES[source]}: {len(missing)} images "
                                       f"listed in {files[source]} are missing (first: {missing[0]})")
        names = sorted(images) if split == "test" else _carve(list(images), split, val_count)
    else:  # only testing images are present: split them (see the module docstring)
        if not test_images:
            raise DatasetNotFoundError(f"{root / '1. Original Images'}: no localisation images in "
                                       f"'{_LOC_IMAGES['train']}' or '{_LOC_IMAGES['test']}'")
        points = read_markups(truth_dir / files["test"])
        order = _seeded_order(list(test_images))
        if not (test_count > 0 and val_count > 0 and test_count + val_count < len(order)):
            raise ValueError(f"{len(order)} localisation images cannot give {test_count} test and {val_count} "
                             f"validation images and still leave training images")
        chosen = {"test": order[:test_count], "val": order[test_count:test_count + val_count],
                  "train": order[test_count + val_count:]}[split]
        names, images = sorted(chosen), test_images
    if limit is not None:
        names = names[:limit]
    records = []
    for name in names:
        if name not in points:
            raise DatasetNotFoundError(f"{images[name]}: no {target} centre for {name} in {truth_dir}")
        width, height = check_image(images[name])
        x, y = points[name]
        src = f"{truth_dir} ({name})"
        box = check_boxes(point_box(x, y, box_size, width, height, source=src)[None], width, height, src)
        records.append(DetectionRecord(name, images[name], width, height, box, np.zeros(1, np.int64),
                                       point=(x, y), disc_diameter=disc_diameter, source=src))
    return records


# ------------------------------------------------------------------------------------------------ public
def load_idrid_detection(data_root: "str | Path", target: str, split: str, *, source: str = "auto",
                         val_count: int = 10, loc_test_count: int = 20, loc_val_count: int = 8,
                         limit: Optional[int] = None, merge_gap: float = 0.0, min_size: float = 12.0,
                         box_size: float = NOMINAL_DISC_DIAMETER,
                         disc_diameter: float = NOMINAL_DISC_DIAMETER) -> Tuple[List[DetectionRecord], Tuple[str, ...]]:
    """Records and class names of one IDRiD detection split (see the module docstring for the protocols).

    Args:
        data_root: Folder holding ``IDRiD/``.
        target: ``od``, ``fovea`` or ``lesions``.
        split: ``train``, ``val`` or ``test``.
        source: ``segmentation`` (part A masks), ``localization`` (part C points) or ``auto`` (part A for
            ``od`` and ``lesions``, part C for ``fovea``).
        val_count: Validation images carved from part A's training set.
        loc_test_count, loc_val_count: Test / validation images of part C when only its testing images exist.
        limit: At most this many images (quick trials).
        merge_gap, min_size: Lesion box rule (pixels at the original resolution).
        box_size: Side of the box drawn around a point (pixels at the original resolution).
        disc_diameter: Disc diameter for part C's 1/8-DD criterion.
    """
    target = str(target).lower()
    if target not in TARGET_CLASSES:
        raise ValueError(f"IDRiD detection target must be one of {', '.join(TARGET_CLASSES)}, got {target!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if source == "auto":
        source = "localization" if target == "fovea" else "segmentation"
    data_root = Path(data_root)
    if source == "segmentation":
        if target == "fovea":
            raise ValueError("IDRiD part A has no fovea annotation; the fovea target uses source=localization")
        records = _seg_records(data_root, target, split, val_count, limit, merge_gap, min_size)
    elif source == "localization":
        if target == "lesions":
            raise ValueError("IDRiD part C has only centre points; lesions use source=segmentation")
        records = _loc_records(data_root, target, split, loc_val_count, loc_test_count, limit, box_size,
                               disc_diameter)
    else:
        raise ValueError(f"IDRiD source must be auto, segmentation or localization, got {source!r}")
    if not records:
        raise DatasetNotFoundError(f"IDRiD {target} {split} split is empty")
    return records, TARGET_CLASSES[target]

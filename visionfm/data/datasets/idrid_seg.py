"""IDRiD part A, lesion and optic-disc segmentation (Porwal et al., 2018), folder ``IDRiD/A. Segmentation``.

API (also used by the detection task to derive boxes from masks):

* ``TARGETS``: target code -> ground-truth folder name: ``MA`` microaneurysms, ``HE`` haemorrhages, ``EX`` hard
  exudates, ``SE`` soft exudates, ``OD`` optic disc.
* ``list_pairs(data_root, split) -> List[IDRiDSegImage]``: every image of ``split`` (``"train"`` = the 54
  images of ``a. Training Set``, ``"test"`` = the 27 of ``b. Testing Set``), each with ``masks``, a dict from
  every target code to its mask file, or ``None`` where the dataset has no file (the lesion is absent from
  that image: an empty mask, as the dataset defines it).
* ``load_idrid_seg(data_root, target, include_absent=False) -> SegSplits`` for training a segmentation model
  of one target. By default images without that target's mask are left out (the challenge evaluated each
  lesion on the images that have it; the count is in ``SegSplits.notes``); ``include_absent`` keeps them with
  an all-background mask.
* Masks are read with :func:`visionfm.data.datasets.generic_seg.read_mask` (palette indices 0/1, and the one
  RGBA 0/255 testing mask, both binarise correctly).

Layout::

    IDRiD/A. Segmentation/1. Original Images/{a. Training Set,b. Testing Set}/IDRiD_NN.jpg      (4288x2848)
    IDRiD/A. Segmentation/2. All Segmentation Groundtruths/{a. Training Set,b. Testing Set}/
        1. Microaneurysms/IDRiD_NN_MA.tif  2. Haemorrhages/IDRiD_NN_HE.tif  3. Hard Exudates/IDRiD_NN_EX.tif
        4. Soft Exudates/IDRiD_NN_SE.tif   5. Optic Disc/IDRiD_NN_OD.tif
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from .generic_seg import DatasetNotFoundError, SegSample, SegSplits, list_images
from .locate import dataset_folder

__all__ = ["FOLDER", "PART", "TARGETS", "SPLIT_FOLDERS", "LAYOUT", "IDRiDSegImage", "list_pairs", "load_idrid_seg"]

FOLDER = "IDRiD"
PART = "A. Segmentation"
TARGETS: Dict[str, str] = {"MA": "1. Microaneurysms", "HE": "2. Haemorrhages", "EX": "3. Hard Exudates",
                           "SE": "4. Soft Exudates", "OD": "5. Optic Disc"}
SPLIT_FOLDERS = {"train": "a. Training Set", "test": "b. Testing Set"}
LAYOUT = (f"IDRiD/{PART}/1. Original Images/<a. Training Set|b. Testing Set>/IDRiD_NN.jpg and "
          f"IDRiD/{PART}/2. All Segmentation Groundtruths/<split>/<N. Lesion>/IDRiD_NN_<MA|HE|EX|SE|OD>.tif")


@dataclass(frozen=True)
class IDRiDSegImage:
    """One IDRiD segmentation image and its masks (``None`` = structure absent, an empty mask)."""

    name: str
    split: str
    image: Path
    masks: Dict[str, Optional[Path]]


def _root(data_root: "str | Path") -> Path:
    root = dataset_folder(data_root, FOLDER, lambda p: (p / PART).is_dir()) / PART
    if not root.is_dir():
        raise DatasetNotFoundError(
            f"dataset IDRiD (segmentation) not found: {root} does not exist. Put IDRiD's '{PART}' folder there "
            f"(expected layout {LAYOUT}) or pass --data-root DIR / set VISIONFM_DATA to the folder holding IDRiD/")
    return root


def list_pairs(data_root: "str | Path", split: str) -> List[IDRiDSegImage]:
    """Every image of an IDRiD segmentation split with its mask file per target (see the module docstring).

    Raises:
        DatasetNotFoundError: missing folders, or a mask file without its image.
    """
    if split not in SPLIT_FOLDERS:
        raise ValueError(f"split must be one of {', '.join(SPLIT_FOLDERS)}, got {split!r}")
    root = _root(data_root)
    images_dir = root / "1. Original Images" / SPLIT_FOLDERS[split]
    truth_dir = root / "2. All Segmentation Groundtruths" / SPLIT_FOLDERS[split]
    for folder in (images_dir, truth_dir):
        if not folder.is_dir():
            raise DatasetNotFoundError(f"dataset IDRiD: {folder} is missing; expected layout {LAYOUT}")
    images = list_images(images_dir)
    if not images:
        raise DatasetNotFoundError(f"dataset IDRiD: no images in {images_dir}")
    names = {p.stem for p in images}
    masks: Dict[str, Dict[str, Path]] = {}
    for code, sub in TARGETS.items():
        folder = truth_dir / sub
        if not folder.is_dir():
            raise DatasetNotFoundError(f"dataset IDRiD: {folder} is missing; expected layout {LAYOUT}")
        found = {}
        for mask in list_images(folder):
            suffix = f"_{code}"
            if not mask.stem.upper().endswith(suffix):
                raise DatasetNotFoundError(f"{mask}: IDRiD {code} masks are named IDRiD_NN_{code}.tif")
            image_name = mask.stem[: -len(suffix)]
            if image_name not in names:
                raise DatasetNotFoundError(f"{mask}: no image {images_dir}/{image_name}.jpg for this mask")
            found[image_name] = mask
        masks[code] = found
    return [IDRiDSegImage(p.stem, split, p, {code: masks[code].get(p.stem) for code in TARGETS}) for p in images]


def load_idrid_seg(data_root: "str | Path", target: str, include_absent: bool = False) -> SegSplits:
    """Training and test splits for segmenting one IDRiD target (``MA``, ``HE``, ``EX``, ``SE`` or ``OD``)."""
    code = str(target or "").upper()
    if code not in TARGETS:
        raise ValueError(f"IDRiD segmentation needs --target, one of {', '.join(TARGETS)} (got {target!r})")
    splits, notes = {}, []
    for split in SPLIT_FOLDERS:
        pairs = list_pairs(data_root, split)
        kept = [p for p in pairs if include_absent or p.masks[code] is not None]
        if len(kept) < len(pairs):
            notes.append(f"{split}: {len(pairs) - len(kept)} of {len(pairs)} images have no {code} mask and are left "
                         f"out (include_absent=false)")
        splits[split] = [SegSample(p.name, p.image, p.masks[code], None) for p in kept]
    notes.append("official split: a. Training Set / b. Testing Set")
    return SegSplits("IDRiD", splits["train"], splits["test"], target=code, fov_from_image=True,
                     root=_root(data_root), notes=notes)

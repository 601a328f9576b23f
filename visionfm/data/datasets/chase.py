"""CHASE_DB1 (Fraz et al., 2012): retinal vessels in 28 images (999x960) of 14 children, folder ``CHASE_DB1``.

Two layouts are accepted:

* the official flat archive: ``CHASE_DB1/Image_NNS.jpg`` with ``Image_NNS_1stHO.png`` (1st observer, the
  ground truth) and ``Image_NNS_2ndHO.png`` (S = L/R eye). The field's split is the first 20 images (patients
  1-10) for training and the last 8 (patients 11-14) for testing. There are no FOV masks: the FOV is computed
  from each image.
* a re-packaged variant with folders ``images/``, ``1st_label/`` and ``mask/`` (FOV), either directly in
  ``CHASE_DB1/`` (same 20/8 split by sorted name) or inside ``CHASE_DB1/training/`` and ``CHASE_DB1/test/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

from .generic_seg import DatasetNotFoundError, SegSample, SegSplits, list_images, match_by_stem
from .locate import dataset_folder

__all__ = ["FOLDER", "LAYOUT", "N_TRAIN", "load_chase"]

FOLDER = "CHASE_DB1"
N_TRAIN = 20
LAYOUT = ("CHASE_DB1/Image_NNS.jpg + CHASE_DB1/Image_NNS_1stHO.png (official flat layout, 28 images), or "
          "CHASE_DB1/[training|test/]{images,1st_label,mask}/")


def _flat(root: Path) -> List[SegSample]:
    images = sorted(p for p in root.glob("Image_*.jpg") if "HO" not in p.stem)
    samples = []
    for image in images:
        manual = root / f"{image.stem}_1stHO.png"
        if not manual.is_file():
            raise DatasetNotFoundError(f"{image}: its 1st-observer manual {manual} is missing")
        samples.append(SegSample(image.stem, image, manual, None))
    return samples


def _folders(folder: Path) -> List[SegSample]:
    labels_dir, fov_dir = folder / "1st_label", folder / "mask"
    if not labels_dir.is_dir():
        raise DatasetNotFoundError(f"dataset CHASE_DB1: {labels_dir} is missing; expected layout {LAYOUT}")
    labels = list_images(labels_dir)
    fovs = list_images(fov_dir) if fov_dir.is_dir() else []
    samples = []
    for image in list_images(folder / "images"):
        manual = match_by_stem(image, labels)
        if manual is None:
            raise DatasetNotFoundError(f"{image}: no manual segmentation for it in {labels_dir}")
        fov: Optional[Path] = match_by_stem(image, fovs) if fovs else None
        if fovs and fov is None:
            raise DatasetNotFoundError(f"{image}: no FOV mask for it in {fov_dir}")
        samples.append(SegSample(image.stem, image, manual, fov))
    return samples


def load_chase(data_root: "str | Path") -> SegSplits:
    """The CHASE_DB1 training (first 20) and test (last 8) images under ``<data_root>/CHASE_DB1``.

    Raises:
        DatasetNotFoundError: the folder is missing or in neither layout; the message gives both.
    """
    root = dataset_folder(data_root, FOLDER, lambda p: (p / "training").is_dir() or (p / "images").is_dir()
                          or any(f.suffix.lower() in (".jpg", ".png") for f in p.iterdir()))
    if not root.is_dir():
        raise DatasetNotFoundError(
            f"dataset CHASE_DB1 not found: {root} does not exist. Put it there (expected layout {LAYOUT}) or pass "
            f"--data-root DIR / set VISIONFM_DATA to the folder that holds CHASE_DB1/")
    if (root / "training" / "images").is_dir() and (root / "test" / "images").is_dir():
        train, test = _folders(root / "training"), _folders(root / "test")
        note = "training/ and test/ folders of the re-packaged layout"
    else:
        samples = _folders(root) if (root / "images").is_dir() else _flat(root)
        if not samples:
            raise DatasetNotFoundError(f"dataset CHASE_DB1: no images in {root}; expected layout {LAYOUT}")
        if len(samples) <= N_TRAIN:
            raise DatasetNotFoundError(f"dataset CHASE_DB1: {root} holds {len(samples)} images; the split needs the "
                                       f"full 28 (first {N_TRAIN} train, the rest test)")
        train, test = samples[:N_TRAIN], samples[N_TRAIN:]
        note = f"field convention: first {N_TRAIN} images (sorted by name) train, last {len(test)} test"
    return SegSplits("CHASE_DB1", train, test, target="vessel", fov_from_image=True, root=root, notes=[note])

"""DRIVE (Staal et al., 2004): retinal vessel segmentation, folder ``DRIVE`` under the data root.

Official layout (565x584 RGB)::

    DRIVE/training/images/NN_training.tif   DRIVE/training/1st_manual/NN_manual1.gif   DRIVE/training/mask/NN_training_mask.gif
    DRIVE/test/images/NN_test.tif           DRIVE/test/1st_manual/NN_manual1.gif       DRIVE/test/mask/NN_test_mask.gif

20 training images (21-40) and 20 test images (01-20). The 1st observer's manual is the ground truth (the
field's convention); the FOV masks delimit where metrics are computed.
"""

from __future__ import annotations

from pathlib import Path
from typing import List

from .generic_seg import DatasetNotFoundError, SegSample, SegSplits, list_images
from .locate import dataset_folder

__all__ = ["FOLDER", "LAYOUT", "load_drive"]

FOLDER = "DRIVE"
LAYOUT = ("DRIVE/training/{images/NN_training.tif, 1st_manual/NN_manual1.gif, mask/NN_training_mask.gif} and "
          "DRIVE/test/{images/NN_test.tif, 1st_manual/NN_manual1.gif, mask/NN_test_mask.gif}")


def _split(root: Path, split: str) -> List[SegSample]:
    folder = root / split
    for sub in ("images", "1st_manual", "mask"):
        if not (folder / sub).is_dir():
            raise DatasetNotFoundError(f"dataset DRIVE: {folder / sub} is missing; expected layout {LAYOUT}")
    images = list_images(folder / "images")
    if not images:
        raise DatasetNotFoundError(f"dataset DRIVE: no images in {folder / 'images'}; expected layout {LAYOUT}")
    samples = []
    for image in images:
        number = image.stem.split("_")[0]
        manual = next(iter(sorted((folder / "1st_manual").glob(f"{number}_manual1.*"))), None)
        fov = next(iter(sorted((folder / "mask").glob(f"{number}_*mask.*"))), None)
        if manual is None:
            raise DatasetNotFoundError(f"{image}: no manual segmentation {folder / '1st_manual'}/{number}_manual1.gif")
        if fov is None:
            raise DatasetNotFoundError(f"{image}: no FOV mask {folder / 'mask'}/{image.stem}_mask.gif")
        samples.append(SegSample(f"{number}_{split}", image, manual, fov))
    return samples


def load_drive(data_root: "str | Path") -> SegSplits:
    """The DRIVE training and test splits under ``<data_root>/DRIVE``.

    Raises:
        DatasetNotFoundError: the folder is missing or incomplete; the message gives the expected layout.
    """
    root = dataset_folder(data_root, FOLDER, lambda p: (p / "training").is_dir() and (p / "test").is_dir())
    if not root.is_dir():
        raise DatasetNotFoundError(
            f"dataset DRIVE not found: {root} does not exist. Put DRIVE there (expected layout {LAYOUT}) or pass "
            f"--data-root DIR / set VISIONFM_DATA to the folder that holds DRIVE/")
    return SegSplits("DRIVE", _split(root, "training"), _split(root, "test"), target="vessel",
                     fov_from_image=False, root=root, notes=["official split: 20 training / 20 test, 1st_manual"])

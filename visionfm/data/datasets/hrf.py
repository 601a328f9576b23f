"""HRF, High-Resolution Fundus (Budai et al., 2013): vessels in 45 images (3504x2336), folder ``HRF``.

Official layout: ``HRF/images/NN_C.jpg`` (C = h healthy, g glaucoma, dr diabetic retinopathy; some archives
use ``.JPG``), ``HRF/manual1/NN_C.tif`` and ``HRF/mask/NN_C_mask.tif`` (FOV). There is no official split; the
convention used here (as in Orlando et al., 2017) is images 01-05 of each category for training (15) and
06-15 for testing (30).
"""

from __future__ import annotations

from pathlib import Path

from .generic_seg import DatasetNotFoundError, SegSample, SegSplits, list_images, match_by_stem
from .locate import dataset_folder

__all__ = ["FOLDER", "LAYOUT", "load_hrf"]

FOLDER = "HRF"
LAYOUT = "HRF/images/NN_{h,g,dr}.jpg, HRF/manual1/NN_{h,g,dr}.tif, HRF/mask/NN_{h,g,dr}_mask.tif"


def load_hrf(data_root: "str | Path", n_train_per_category: int = 5) -> SegSplits:
    """The HRF training (01-05 of each category) and test (06-15) images under ``<data_root>/HRF``."""
    root = dataset_folder(data_root, FOLDER, lambda p: (p / "images").is_dir() and (p / "manual1").is_dir())
    if not root.is_dir():
        raise DatasetNotFoundError(
            f"dataset HRF not found: {root} does not exist. Put it there (expected layout {LAYOUT}) or pass "
            f"--data-root DIR / set VISIONFM_DATA to the folder that holds HRF/")
    for sub in ("images", "manual1", "mask"):
        if not (root / sub).is_dir():
            raise DatasetNotFoundError(f"dataset HRF: {root / sub} is missing; expected layout {LAYOUT}")
    manuals, fovs = list_images(root / "manual1"), list_images(root / "mask")
    train, test = [], []
    for image in list_images(root / "images"):
        manual = next((m for m in manuals if m.stem.lower() == image.stem.lower()), None)
        fov = match_by_stem(image, fovs)
        if manual is None or fov is None:
            missing = "manual1/" + image.stem + ".tif" if manual is None else "mask/" + image.stem + "_mask.tif"
            raise DatasetNotFoundError(f"{image}: {root / missing} is missing")
        number = image.stem.split("_")[0]
        if not number.isdigit():
            raise DatasetNotFoundError(f"{image}: HRF image names are NN_<h|g|dr>.jpg")
        (train if int(number) <= n_train_per_category else test).append(SegSample(image.stem, image, manual, fov))
    if not train or not test:
        raise DatasetNotFoundError(f"dataset HRF: {root / 'images'} does not hold both training (01-05) and test "
                                   f"(06-15) images; expected layout {LAYOUT}")
    return SegSplits("HRF", train, test, target="vessel", fov_from_image=False, root=root,
                     notes=[f"convention: images 01-{n_train_per_category:02d} of each category train, the rest test"])

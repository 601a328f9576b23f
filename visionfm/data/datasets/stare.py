"""STARE (Hoover et al., 2000): vessels in 20 labelled images (700x605), folder ``STARE``.

Official layout: ``STARE/stare-images/imNNNN.ppm`` (the archive's 397 images; only the 20 with manual labels
are used) and ``STARE/labels-ah/imNNNN.ah.ppm`` (Hoover's labels, the ground truth by convention;
``labels-vk`` is the second observer). The folder names ``images/`` and ``labels/`` are accepted too. Files
must be decompressed (the archives ship ``.ppm.gz``). There is no official split and no FOV mask: the first
10 labelled images train, the last 10 test, and the FOV is computed from each image.
"""

from __future__ import annotations

from pathlib import Path

from .generic_seg import DatasetNotFoundError, SegSample, SegSplits, list_images
from .locate import dataset_folder

__all__ = ["FOLDER", "LAYOUT", "load_stare"]

FOLDER = "STARE"
LAYOUT = "STARE/stare-images/imNNNN.ppm + STARE/labels-ah/imNNNN.ah.ppm (decompressed)"


def load_stare(data_root: "str | Path", n_train: int = 10) -> SegSplits:
    """The STARE training (first 10 labelled) and test (last 10) images under ``<data_root>/STARE``."""
    root = dataset_folder(data_root, FOLDER, lambda p: any((p / d).is_dir() for d in ("stare-images", "images")))
    if not root.is_dir():
        raise DatasetNotFoundError(
            f"dataset STARE not found: {root} does not exist. Put it there (expected layout {LAYOUT}) or pass "
            f"--data-root DIR / set VISIONFM_DATA to the folder that holds STARE/")
    images_dir = next((root / d for d in ("stare-images", "images") if (root / d).is_dir()), None)
    labels_dir = next((root / d for d in ("labels-ah", "labels") if (root / d).is_dir()), None)
    if images_dir is None or labels_dir is None:
        raise DatasetNotFoundError(f"dataset STARE: {root} lacks stare-images/ or labels-ah/; expected layout {LAYOUT}")
    if any(root.rglob("*.gz")):
        raise DatasetNotFoundError(f"dataset STARE: {root} holds .gz files; decompress them first (gunzip -r {root})")
    images = {p.stem.split(".")[0]: p for p in list_images(images_dir)}
    samples = []
    for label in list_images(labels_dir):
        key = label.stem.split(".")[0]
        if key not in images:
            raise DatasetNotFoundError(f"{label}: no image {images_dir}/{key}.ppm for this label")
        samples.append(SegSample(key, images[key], label, None))
    if len(samples) <= n_train:
        raise DatasetNotFoundError(f"dataset STARE: {labels_dir} holds {len(samples)} labels; the split needs the 20 "
                                   f"labelled images (first {n_train} train, the rest test)")
    return SegSplits("STARE", samples[:n_train], samples[n_train:], target="vessel", fov_from_image=True, root=root,
                     notes=[f"convention: first {n_train} labelled images train, the other {len(samples) - n_train} test"])

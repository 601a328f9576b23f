"""Binary segmentation datasets: the shared record type, mask/FOV reading, and the generic folder layout.

Every segmentation reader (``drive``, ``chase``, ``hrf``, ``stare``, ``idrid_seg`` and this module's
:func:`load_generic`) returns a :class:`SegSplits`: ``train`` and ``test`` lists of :class:`SegSample`
(image path, mask path, optional field-of-view mask path). Validation images are carved from ``train`` by the
training code; a reader never hands out test images for model selection.

Generic layout (``--dataset PATH`` where PATH holds ``images/``)::

    PATH/train/images/*.png|jpg|tif...   PATH/train/masks/<same stem>[suffix].*   [PATH/train/fov/...]
    PATH/test/images/...                 PATH/test/masks/...                        [PATH/test/fov/...]

or a flat ``PATH/images/`` + ``PATH/masks/`` (+ optional ``PATH/fov/``), whose test split is a deterministic
20 % of the images chosen by a hash of their names. A mask is matched to an image when its stem equals the
image's stem or starts with it followed by ``_`` or ``-`` (``01.png`` <- ``01_mask.png``). Masks are binary:
any value above half of the mask's maximum is foreground (0/1, 0/255 and palette masks all work).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..io import ImageReadError, is_image_file, read_image
from .locate import DatasetNotFoundError

__all__ = ["DatasetNotFoundError", "SegSample", "SegSplits", "read_mask", "fov_from_image", "list_images",
           "match_by_stem", "load_generic", "GENERIC_LAYOUT"]

GENERIC_LAYOUT = ("PATH/images/ + PATH/masks/ (+ optional PATH/fov/), or PATH/train/{images,masks}/ and "
                  "PATH/test/{images,masks}/; masks share the image's file stem (optionally with a _suffix)")


@dataclass(frozen=True)
class SegSample:
    """One image of a binary segmentation dataset.

    Attributes:
        name: Unique, file-name-safe identifier (used for overlays and the per-image CSV).
        image: The image file.
        mask: The ground-truth mask file, or ``None`` where the dataset defines the structure as absent
            (IDRiD lesions without a mask file): an all-background mask.
        fov: Field-of-view mask file, or ``None``: the FOV is then computed from the image (fundus
            datasets) or is the whole image (see :attr:`SegSplits.fov_from_image`).
    """

    name: str
    image: Path
    mask: Optional[Path]
    fov: Optional[Path] = None


@dataclass
class SegSplits:
    """A dataset's official splits.

    Attributes:
        dataset: Canonical dataset name (``DRIVE``...).
        train: Training images (validation is carved from these by the trainer).
        test: Test images.
        target: The segmented structure (``vessel``, ``OD``, ``MA``...).
        fov_from_image: Where a sample has no FOV file, threshold the image to find the circular FOV
            (fundus photographs); otherwise metrics use the whole image.
        root: The dataset folder.
        notes: What the reader decided (split convention, absent masks), for the log and metrics.json.
    """

    dataset: str
    train: List[SegSample]
    test: List[SegSample]
    target: str = "vessel"
    fov_from_image: bool = False
    root: Optional[Path] = None
    notes: List[str] = field(default_factory=list)

    def split(self, name: str) -> List[SegSample]:
        if name not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {name!r}")
        return self.train if name == "train" else self.test


def read_mask(path: "str | Path") -> np.ndarray:
    """Read a binary mask as a ``bool`` array ``(H, W)``.

    Palette images are read by index (DRIVE's 2nd observer and IDRiD masks store indices 0/1 whose palette
    colours are not black/white); other images are converted to grey. A pixel is foreground when its value is
    above half of the mask's maximum, so 0/1, 0/255 and lightly compressed masks all binarise correctly.

    Raises:
        ImageReadError: naming the file.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            if img.mode == "P":
                img.load()
                arr = np.asarray(img)
            else:
                arr = None
    except FileNotFoundError:
        raise ImageReadError(f"{path}: mask file not found") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise ImageReadError(f"{path}: cannot read mask ({err.__class__.__name__}: {err})") from None
    if arr is None:
        arr = read_image(path, channels=1)[:, :, 0]
    hi = int(arr.max(initial=0))
    return arr > (hi / 2.0 if hi > 1 else 0)


def fov_from_image(image: np.ndarray, threshold: float = 0.06) -> np.ndarray:
    """Estimate the circular field of view of a fundus photograph ``(H, W, 3)`` ``uint8``.

    The red channel is bright wherever the retina is imaged and near zero on the black surround: pixels above
    ``threshold`` of full scale form the FOV; holes (dark lesions, vessels on a dim red channel) are filled and
    the border is eroded by 1 pixel, as in the usual FOV masks of DRIVE/HRF.
    """
    from scipy import ndimage

    channel = image[:, :, 0] if image.ndim == 3 else image
    fov = channel.astype(np.float32) > threshold * 255.0
    fov = ndimage.binary_opening(fov, iterations=2)
    labels, count = ndimage.label(fov)
    if count > 1:  # keep the largest component: specks of noise in the surround are not retina
        sizes = ndimage.sum(fov, labels, index=np.arange(1, count + 1))
        fov = labels == (1 + int(np.argmax(sizes)))
    fov = ndimage.binary_fill_holes(fov)
    fov = ndimage.binary_erosion(fov, iterations=1)
    if not fov.any():  # a fully dark image: evaluate everywhere rather than nowhere
        fov = np.ones(channel.shape, bool)
    return fov


def list_images(folder: Path) -> List[Path]:
    """Image files directly in ``folder``, sorted by name (hidden files ignored)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p) and not p.name.startswith("."))


def match_by_stem(image: Path, candidates: Sequence[Path]) -> Optional[Path]:
    """The candidate whose stem equals the image's stem or extends it after ``_``/``-``; an ambiguous match is
    an error naming the files."""
    stem = image.stem.lower()
    exact = [c for c in candidates if c.stem.lower() == stem]
    if len(exact) == 1:
        return exact[0]
    found = exact or [c for c in candidates if c.stem.lower().startswith(stem) and c.stem[len(stem)] in "_-"]
    if len(found) > 1:
        raise ValueError(f"{image}: several files match it: {', '.join(str(f) for f in found)}")
    return found[0] if found else None


def _pairs(folder: Path, dataset: str) -> List[SegSample]:
    images_dir, masks_dir, fov_dir = folder / "images", folder / "masks", folder / "fov"
    if not masks_dir.is_dir():
        raise DatasetNotFoundError(f"dataset {dataset}: {images_dir} has no sibling masks/ folder; expected layout: "
                                   f"{GENERIC_LAYOUT}")
    images = list_images(images_dir)
    if not images:
        raise DatasetNotFoundError(f"dataset {dataset}: no image files in {images_dir}")
    masks = list_images(masks_dir)
    fovs = list_images(fov_dir) if fov_dir.is_dir() else []
    samples = []
    for image in images:
        mask = match_by_stem(image, masks)
        if mask is None:
            raise DatasetNotFoundError(f"{image}: no mask for it in {masks_dir} (expected {image.stem}.* or "
                                       f"{image.stem}_<suffix>.*)")
        fov = match_by_stem(image, fovs) if fovs else None
        if fovs and fov is None:
            raise DatasetNotFoundError(f"{image}: {fov_dir} exists but holds no FOV mask for it")
        samples.append(SegSample(image.stem, image, mask, fov))
    return samples


def _in_test(name: str, fraction: float) -> bool:
    digest = hashlib.sha256(name.encode("utf-8")).hexdigest()
    return int(digest[:8], 16) / 0xFFFFFFFF < fraction


def load_generic(path: "str | Path", test_fraction: float = 0.2, estimate_fov: bool = False) -> SegSplits:
    """Read a generic binary segmentation folder (see the module docstring for the layout).

    Args:
        path: The dataset folder.
        test_fraction: For a flat layout, the share of images (chosen by a hash of their names, so the split
            never changes when images are added) that form the test split.
        estimate_fov: Compute a fundus FOV from each image where no ``fov/`` folder is given (else metrics
            use the whole image).
    """
    root = Path(path)
    name = root.name or str(root)
    if (root / "train" / "images").is_dir() and (root / "test" / "images").is_dir():
        train, test = _pairs(root / "train", name), _pairs(root / "test", name)
        notes = ["official train/ and test/ folders"]
    elif (root / "images").is_dir():
        samples = _pairs(root, name)
        test = [s for s in samples if _in_test(s.name, test_fraction)]
        if not test and len(samples) > 1:
            test = [samples[-1]]
        train = [s for s in samples if s not in test]
        notes = [f"flat folder: {len(test)} of {len(samples)} images form the test split (name hash, "
                 f"fraction {test_fraction})"]
    else:
        raise DatasetNotFoundError(f"dataset folder {root} not found or not in a known layout; expected "
                                   f"{GENERIC_LAYOUT}")
    if not train:
        raise DatasetNotFoundError(f"dataset {name}: no training images in {root}")
    return SegSplits(name, train, test, target="foreground", fov_from_image=estimate_fov, root=root, notes=notes)

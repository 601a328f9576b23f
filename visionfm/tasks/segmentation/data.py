"""Segmentation data for training and evaluation: dataset lookup by name, images held in memory at the model's
working resolution, random training crops (patch-based training), and batched augmentation with kornia."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ...data.datasets.chase import load_chase
from ...data.datasets.drive import load_drive
from ...data.datasets.generic_seg import (GENERIC_LAYOUT, DatasetNotFoundError, SegSample, SegSplits,
                                          fov_from_image, load_generic, read_mask)
from ...data.datasets.hrf import load_hrf
from ...data.datasets.idrid_seg import TARGETS as IDRID_TARGETS
from ...data.datasets.idrid_seg import load_idrid_seg
from ...data.datasets.stare import load_stare
from ...data.io import read_image

__all__ = ["DATASETS", "load_dataset", "split_validation", "LoadedImage", "working_size", "load_image",
           "load_truth", "resize_array", "equalize_contrast", "model_input", "CropSampler", "SegAugmentation"]

#: Dataset names (case-insensitive) -> reader ``(data_root, target, include_absent) -> SegSplits``.
DATASETS: Dict[str, Callable[..., SegSplits]] = {
    "DRIVE": lambda root, target, absent: load_drive(root),
    "CHASE_DB1": lambda root, target, absent: load_chase(root),
    "HRF": lambda root, target, absent: load_hrf(root),
    "STARE": lambda root, target, absent: load_stare(root),
    "IDRiD": lambda root, target, absent: load_idrid_seg(root, target, include_absent=absent),
}
_ALIASES = {"chase": "CHASE_DB1", "chasedb1": "CHASE_DB1", "chase_db1": "CHASE_DB1", "drive": "DRIVE", "hrf": "HRF",
            "stare": "STARE", "idrid": "IDRiD"}


def load_dataset(name: str, data_root: "str | Path", target: Optional[str] = None,
                 include_absent: bool = False, test_fraction: float = 0.2) -> SegSplits:
    """Look a dataset up by name (``DRIVE``, ``CHASE_DB1``, ``HRF``, ``STARE``, ``IDRiD``) under ``data_root``, or
    read a generic ``images/`` + ``masks/`` folder given as a path (absolute, relative, or under ``data_root``).

    Raises:
        DatasetNotFoundError: the dataset is missing; the message says where to put it and its layout.
        ValueError: a target that the dataset does not have.
    """
    key = _ALIASES.get(str(name).lower().replace("-", "_"))
    if key is not None:
        if key != "IDRiD" and target not in (None, "", "vessel"):
            raise ValueError(f"dataset {key} has one target (vessels); --target {target} is for IDRiD "
                             f"({', '.join(IDRID_TARGETS)})")
        return DATASETS[key](Path(data_root), target, include_absent)
    for candidate in (Path(name), Path(data_root) / name):
        if candidate.is_dir():
            return load_generic(candidate, test_fraction=test_fraction)
    raise DatasetNotFoundError(
        f"dataset {name!r} not found: it is neither a known dataset ({', '.join(DATASETS)}) nor a folder (looked at "
        f"{Path(name)} and {Path(data_root) / name}); a generic folder needs {GENERIC_LAYOUT}")


def split_validation(train: Sequence[SegSample], fraction: float, seed: int,
                     count: Optional[int] = None) -> Tuple[List[SegSample], List[SegSample]]:
    """Carve a validation split from the training images (never from the test split).

    ``count`` (or ``round(fraction * n)``, at least 1) images are drawn with a seeded shuffle; at least one
    image is always left for training, so a single training image gives no validation split.
    """
    n = len(train)
    n_val = int(count) if count is not None else max(1, int(round(fraction * n)))
    n_val = max(0, min(n_val, n - 1))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:n_val])
    return [s for i, s in enumerate(train) if i not in val_idx], [s for i, s in enumerate(train) if i in val_idx]


def working_size(height: int, width: int, long_side: Optional[int]) -> Tuple[int, int]:
    """The model's working resolution: the original, or scaled so that the long side is ``long_side``."""
    if not long_side or max(height, width) == long_side:
        return height, width
    scale = long_side / max(height, width)
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


def resize_array(arr: np.ndarray, size: Tuple[int, int], mask: bool) -> np.ndarray:
    if arr.shape[:2] == size:
        return arr
    h, w = size
    if mask:  # area average, then majority: thin structures thin out rather than shift
        img = Image.fromarray(arr.astype(np.uint8) * 255).resize((w, h), Image.Resampling.BOX)
        return np.asarray(img) >= 128
    squeeze = arr.shape[2] == 1
    img = Image.fromarray(arr[:, :, 0] if squeeze else arr).resize((w, h), Image.Resampling.BILINEAR)
    out = np.asarray(img)
    return out[:, :, None] if squeeze else out


def equalize_contrast(image: np.ndarray, clip_limit: float = 2.0, grid: int = 8) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation (kornia's CLAHE) of the lightness of an RGB image.

    Why lightness (CIELAB L) rather than each channel: it lifts thin, faint structures such as capillaries out of
    uneven illumination without shifting the colours the encoder was pretrained on.

    Args:
        image: ``uint8 (H, W, 3)``.
        clip_limit: CLAHE clip limit (higher: stronger local contrast).
        grid: Tiles per side.

    Returns:
        ``uint8 (H, W, 3)``.
    """
    from kornia.color import lab_to_rgb, rgb_to_lab
    from kornia.enhance import equalize_clahe

    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"equalize_contrast expects an RGB image (H, W, 3), got shape {image.shape}")
    rgb = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1).float()[None] / 255.0
    lab = rgb_to_lab(rgb)
    lightness = equalize_clahe(lab[:, :1] / 100.0, clip_limit=float(clip_limit), grid_size=(int(grid), int(grid)))
    out = lab_to_rgb(torch.cat([lightness * 100.0, lab[:, 1:]], dim=1)).clamp(0, 1)
    return (out[0].permute(1, 2, 0) * 255.0).round().to(torch.uint8).numpy()


def model_input(image: np.ndarray, data_cfg: Dict, mask: bool = False) -> np.ndarray:
    """An original-resolution image as the model sees it: resized to the working resolution (``resize_long_side``)
    and, for images (not masks) with ``data.clahe`` set, contrast-equalised (:func:`equalize_contrast`).
    Training, validation, test and prediction all go through here, so they see the same input."""
    size = working_size(*image.shape[:2], data_cfg.get("resize_long_side"))
    out = resize_array(image, size, mask)
    clahe = data_cfg.get("clahe")
    if clahe and not mask:
        if not isinstance(clahe, dict):
            raise ValueError(f"data.clahe must be null or a mapping like {{clip_limit: 2.0, grid: 8}}, got {clahe!r}")
        unknown = set(clahe) - {"clip_limit", "grid"}
        if unknown:
            raise ValueError(f"data.clahe: unknown keys {sorted(unknown)} (expected clip_limit, grid)")
        out = equalize_contrast(out, float(clahe.get("clip_limit", 2.0)), int(clahe.get("grid", 8)))
    return out


@dataclass
class LoadedImage:
    """An image with its truth and FOV at the model's working resolution (``uint8 (H, W, 3)`` and ``bool``)."""

    sample: SegSample
    image: np.ndarray
    mask: np.ndarray
    fov: np.ndarray
    original_size: Tuple[int, int]


def _as_rgb(image: np.ndarray) -> np.ndarray:
    return np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image


def load_truth(sample: SegSample, image: np.ndarray, estimate_fov: bool) -> Tuple[np.ndarray, np.ndarray]:
    """Truth and FOV masks at the original resolution of ``image`` (checked against it)."""
    shape = image.shape[:2]
    mask = read_mask(sample.mask) if sample.mask is not None else np.zeros(shape, bool)
    if sample.fov is not None:
        fov = read_mask(sample.fov)
    elif estimate_fov:
        fov = fov_from_image(image)
    else:
        fov = np.ones(shape, bool)
    for what, arr, path in (("mask", mask, sample.mask), ("FOV mask", fov, sample.fov)):
        if arr.shape != shape:
            raise ValueError(f"{path}: {what} is {arr.shape[1]}x{arr.shape[0]} but its image {sample.image} is "
                             f"{shape[1]}x{shape[0]}")
    return mask, fov


def load_image(sample: SegSample, channels: int, data_cfg: Dict, estimate_fov: bool) -> LoadedImage:
    """Read an image (``channels`` of the modality, repeated to 3), its truth and FOV, as the model sees them
    (:func:`model_input`: working resolution, optional contrast equalisation)."""
    image = _as_rgb(read_image(sample.image, channels))
    mask, fov = load_truth(sample, image, estimate_fov)
    return LoadedImage(sample, model_input(image, data_cfg), model_input(mask, data_cfg, mask=True),
                       model_input(fov, data_cfg, mask=True), tuple(image.shape[:2]))


class CropSampler:
    """Random square crops from images held in memory (patch-based training).

    Args:
        images: The training images.
        crop_size: Crop side in pixels (a multiple of the patch size); images smaller than that are padded
            (image 0, label ``ignore_index``).
        positive_fraction: Share of crops centred (with jitter) on a random foreground pixel, for sparse targets
            (lesions); the others are uniform over the image.
        seed: Seed of the sampler's own generator.
    """

    def __init__(self, images: Sequence[LoadedImage], crop_size: int, positive_fraction: float = 0.0,
                 seed: int = 0, ignore_index: int = 255):
        if not images:
            raise ValueError("no training images to sample crops from")
        self.images = list(images)
        self.crop = int(crop_size)
        self.positive_fraction = float(positive_fraction)
        self.ignore_index = ignore_index
        self.rng = np.random.default_rng(seed)
        self._fg = [np.flatnonzero(im.mask) if positive_fraction > 0 else None for im in self.images]

    def _crop_at(self, im: LoadedImage, h: int, w: int, c: int, centre: Optional[Tuple[int, int]] = None):
        if centre is None:
            y0 = int(self.rng.integers(0, max(h - c, 0) + 1))
            x0 = int(self.rng.integers(0, max(w - c, 0) + 1))
        else:
            jitter = self.rng.integers(-c // 4, c // 4 + 1, size=2)
            y0 = int(np.clip(centre[0] + jitter[0] - c // 2, 0, max(h - c, 0)))
            x0 = int(np.clip(centre[1] + jitter[1] - c // 2, 0, max(w - c, 0)))
        image = np.zeros((c, c, 3), np.uint8)
        label = np.full((c, c), self.ignore_index, np.uint8)
        patch = im.image[y0:y0 + c, x0:x0 + c]
        image[:patch.shape[0], :patch.shape[1]] = patch
        label[:patch.shape[0], :patch.shape[1]] = im.mask[y0:y0 + c, x0:x0 + c]
        return image, label

    def sample(self, batch_size: int) -> Tuple[Tensor, Tensor]:
        """``(images uint8 (B, 3, c, c), labels int64 (B, 1, c, c))``; labels 0/1, padding ``ignore_index``."""
        images, labels = [], []
        for _ in range(batch_size):
            i = int(self.rng.integers(len(self.images)))
            im = self.images[i]
            h, w = im.mask.shape
            centre = None
            fg = self._fg[i]
            if fg is not None and fg.size and self.rng.random() < self.positive_fraction:
                flat = int(fg[self.rng.integers(fg.size)])
                centre = (flat // w, flat % w)
            image, label = self._crop_at(im, h, w, self.crop, centre)
            images.append(image)
            labels.append(label)
        images_t = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
        labels_t = torch.from_numpy(np.stack(labels)).long()[:, None]
        return images_t, labels_t


class SegAugmentation:
    """Batched augmentation of crops and labels (geometry shared, photometry on the image only), with kornia.

    Args:
        hflip, vflip: Random flips.
        rot90: Random multiples of 90 degrees.
        rotate_degrees: Additional random rotation in ``[-d, d]`` (labels resampled nearest; corners that come
            from outside the crop get image 0 and the ignore label).
        colour_jitter: Brightness/contrast/saturation jitter strength (0 disables).
        hue: Hue jitter.
    """

    def __init__(self, hflip: bool = True, vflip: bool = True, rot90: bool = True, rotate_degrees: float = 0.0,
                 colour_jitter: float = 0.2, hue: float = 0.0, ignore_index: int = 255):
        import kornia.augmentation as K

        self.hflip, self.vflip, self.rot90 = hflip, vflip, rot90
        self.ignore_index = ignore_index
        self.rotate = (K.AugmentationSequential(K.RandomRotation(degrees=float(rotate_degrees), p=1.0),
                                                data_keys=["input", "mask"]) if rotate_degrees else None)
        self.jitter = (K.ColorJitter(colour_jitter, colour_jitter, colour_jitter, hue, p=0.8)
                       if colour_jitter or hue else None)

    def __call__(self, images: Tensor, labels: Tensor) -> Tuple[Tensor, Tensor]:
        """``images`` uint8 ``(B, 3, H, W)``, ``labels`` int64 ``(B, 1, H, W)`` -> float images in [0, 255]
        and labels."""
        x = images.float() / 255.0
        y = labels.clone()
        b = x.shape[0]
        for i in range(b):
            dims_flip = []
            if self.hflip and torch.rand(()) < 0.5:
                dims_flip.append(-1)
            if self.vflip and torch.rand(()) < 0.5:
                dims_flip.append(-2)
            if dims_flip:
                x[i], y[i] = x[i].flip(dims_flip), y[i].flip(dims_flip)
            if self.rot90:
                k = int(torch.randint(0, 4, ()))
                if k:
                    x[i], y[i] = torch.rot90(x[i], k, (-2, -1)), torch.rot90(y[i], k, (-2, -1))
        if self.rotate is not None:
            # Shift labels by one so that 0 marks "outside the rotated crop" and becomes the ignore label.
            x, y_shift = self.rotate(x, (y + 1).float())
            y_shift = y_shift.round().long()
            y = torch.where(y_shift == 0, torch.full_like(y_shift, self.ignore_index), y_shift - 1)
        if self.jitter is not None:
            x = self.jitter(x)
        return x.clamp(0, 1) * 255.0, y

"""Segmentation data for training and evaluation: dataset lookup by name, images decoded (in DataLoader workers on a
GPU) and held at the model's working resolution (under ``torchrun``: decoded once per node, each rank its share,
and mapped by all from shared files), random training crops (patch-based training), and batched augmentation with
kornia on the training device."""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

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
           "load_truth", "resize_array", "equalize_contrast", "model_input", "decode_loader", "decode_images",
           "SharedImages", "CropSampler", "SegAugmentation"]

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


class _Decoded(torch.utils.data.Dataset):
    """Samples decoded by :func:`load_image` (in DataLoader workers, or in the main process)."""

    def __init__(self, samples: Sequence[SegSample], channels: int, data_cfg: Dict, estimate_fov: bool):
        self.samples, self.channels, self.data_cfg, self.estimate_fov = list(samples), channels, data_cfg, estimate_fov

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> LoadedImage:
        return load_image(self.samples[index], self.channels, self.data_cfg, self.estimate_fov)


def _as_is(item: LoadedImage) -> LoadedImage:
    return item


def decode_loader(samples: Sequence[SegSample], channels: int, data_cfg: Dict, estimate_fov: bool,
                  settings: Dict[str, Any]) -> "torch.utils.data.DataLoader":
    """A DataLoader that yields the :class:`LoadedImage` of each sample in order, decoded (read, resized, contrast
    equalised) in its worker processes: ``settings`` are :func:`visionfm.engine.loading.loader_settings` (workers
    and pinned memory on a GPU, the main process on the CPU). It leaves the global torch generator untouched."""
    # Its own generator: a DataLoader draws its workers' base seed when iterated, which from the global generator
    # would shift the crops' augmentation and drop path of the whole run (decoding draws nothing random).
    return torch.utils.data.DataLoader(_Decoded(samples, channels, data_cfg, estimate_fov), batch_size=None,
                                       shuffle=False, collate_fn=_as_is, generator=torch.Generator().manual_seed(0),
                                       **settings)


def decode_images(samples: Sequence[SegSample], channels: int, data_cfg: Dict, estimate_fov: bool,
                  settings: Optional[Dict[str, Any]] = None) -> List[LoadedImage]:
    """Every sample's :class:`LoadedImage`, in order (:func:`decode_loader`; ``settings=None``: the main process)."""
    if not samples:
        return []
    return list(decode_loader(samples, channels, data_cfg, estimate_fov, settings or {"num_workers": 0}))


class SharedImages:
    """Decoded training images in ``.npy`` files of one folder on a node, mapped read-only by every rank there
    (``np.load(mmap_mode="r")``): the node's page cache holds one copy, however many ranks train on it.

    Under ``torchrun`` each rank of a node decodes and writes its share of the images (:meth:`write`); after a
    barrier every rank maps them all (:meth:`read`); after another the folder can be removed (the mappings stay
    valid until the processes end). Files are written atomically; ``<index>.json`` (the original size) is written
    last and marks an image complete.
    """

    def __init__(self, folder: "str | Path"):
        self.folder = Path(folder)

    def _path(self, index: int, what: str) -> Path:
        return self.folder / f"{index}.{what}"

    def write(self, index: int, image: LoadedImage) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        suffix = f".{os.getpid()}.tmp"  # two nodes sharing one temporary folder write the same image alike
        for what in ("image", "mask", "fov"):
            final = self._path(index, f"{what}.npy")
            with open(final.with_name(final.name + suffix), "wb") as fh:
                np.save(fh, np.ascontiguousarray(getattr(image, what)))
            os.replace(final.with_name(final.name + suffix), final)
        meta = self._path(index, "json")
        meta.with_name(meta.name + suffix).write_text(json.dumps({"original_size": list(image.original_size)}))
        os.replace(meta.with_name(meta.name + suffix), meta)

    def indices(self) -> List[int]:
        """The complete images in the folder."""
        return sorted(int(p.name.split(".")[0]) for p in self.folder.glob("*.json"))

    def read(self, samples: Sequence[SegSample]) -> List[LoadedImage]:
        """Every image of ``samples`` (index ``i`` is ``samples[i]``), mapped read-only."""
        missing = [i for i in range(len(samples)) if not self._path(i, "json").is_file()]
        if missing:
            raise FileNotFoundError(f"{self.folder}: decoded images {missing} missing (a rank did not write its "
                                    "share)")
        out = []
        for i, sample in enumerate(samples):
            meta = json.loads(self._path(i, "json").read_text())
            arrays = [np.load(self._path(i, f"{what}.npy"), mmap_mode="r") for what in ("image", "mask", "fov")]
            out.append(LoadedImage(sample, *arrays, tuple(meta["original_size"])))
        return out


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

    def _crop_at(self, im: LoadedImage, h: int, w: int, c: int, centre: Optional[Tuple[int, int]] = None,
                 cut: bool = True):
        if centre is None:
            y0 = int(self.rng.integers(0, max(h - c, 0) + 1))
            x0 = int(self.rng.integers(0, max(w - c, 0) + 1))
        else:
            jitter = self.rng.integers(-c // 4, c // 4 + 1, size=2)
            y0 = int(np.clip(centre[0] + jitter[0] - c // 2, 0, max(h - c, 0)))
            x0 = int(np.clip(centre[1] + jitter[1] - c // 2, 0, max(w - c, 0)))
        if not cut:  # another rank's crop: drawn, not cut
            return None, None
        image = np.zeros((c, c, 3), np.uint8)
        label = np.full((c, c), self.ignore_index, np.uint8)
        patch = im.image[y0:y0 + c, x0:x0 + c]
        image[:patch.shape[0], :patch.shape[1]] = patch
        label[:patch.shape[0], :patch.shape[1]] = im.mask[y0:y0 + c, x0:x0 + c]
        return image, label

    def sample(self, batch_size: int, part: Optional[slice] = None) -> Tuple[Tensor, Tensor]:
        """``(images uint8 (B, 3, c, c), labels int64 (B, 1, c, c))``; labels 0/1, padding ``ignore_index``.

        With ``part`` (a rank's slice of a global batch of ``batch_size``, :meth:`RunContext.part`): every crop of
        the global batch is drawn (the generator advances as in one process) and only those of ``part`` are cut
        and returned."""
        wanted = range(batch_size)[part] if part is not None else range(batch_size)
        images, labels = [], []
        for j in range(batch_size):
            i = int(self.rng.integers(len(self.images)))
            im = self.images[i]
            h, w = im.mask.shape
            centre = None
            fg = self._fg[i]
            if fg is not None and fg.size and self.rng.random() < self.positive_fraction:
                flat = int(fg[self.rng.integers(fg.size)])
                centre = (flat // w, flat % w)
            image, label = self._crop_at(im, h, w, self.crop, centre, cut=j in wanted)
            if j in wanted:
                images.append(image)
                labels.append(label)
        c = self.crop
        images_t = torch.from_numpy(np.stack(images) if images else np.zeros((0, c, c, 3), np.uint8))
        labels_t = torch.from_numpy(np.stack(labels) if labels else np.zeros((0, c, c), np.uint8))
        return images_t.permute(0, 3, 1, 2).contiguous(), labels_t.long()[:, None]


class SegAugmentation:
    """Batched augmentation of crops and labels (geometry shared, photometry on the image only), with kornia, on
    whatever device the crops are on (the training device: call it after moving the batch there).

    The random draws stay on the CPU generator (a few numbers per crop: flips, quarter turns, kornia's rotation
    and jitter parameters), so a run draws the same augmentations on the CPU and on a GPU and its resume state
    needs the CPU generator only; the pixel work (conversion, flips, rotation, colour jitter) runs where the crops
    are, once per batch.

    Args:
        hflip, vflip: Random flips.
        rot90: Random multiples of 90 degrees.
        rotate_degrees: Additional random rotation in ``[-d, d]`` (labels resampled nearest; corners that come
            from outside the crop get image 0 and the ignore label).
        colour_jitter: Brightness/contrast/saturation jitter strength (0 disables).
        hue: Hue jitter.
    """

    #: kornia parameters that describe the whole batch rather than one crop each (not cut to a rank's part).
    _BATCH_KEYS = ("order", "forward_input_shape")

    def __init__(self, hflip: bool = True, vflip: bool = True, rot90: bool = True, rotate_degrees: float = 0.0,
                 colour_jitter: float = 0.2, hue: float = 0.0, ignore_index: int = 255):
        import kornia.augmentation as K

        self.hflip, self.vflip, self.rot90 = hflip, vflip, rot90
        self.ignore_index = ignore_index
        self.rotate = (K.AugmentationSequential(K.RandomRotation(degrees=float(rotate_degrees), p=1.0),
                                                data_keys=["input", "mask"]) if rotate_degrees else None)
        self.jitter = (K.ColorJitter(colour_jitter, colour_jitter, colour_jitter, hue, p=0.8)
                       if colour_jitter or hue else None)

    @classmethod
    def _cut(cls, params: Dict, part: slice, shape: Tuple[int, ...], device: torch.device) -> Dict:
        """kornia parameters drawn for a global batch, cut to the crops of ``part``, per-crop values moved to
        ``device``."""
        out = {}
        for key, value in params.items():
            if key == "forward_input_shape":
                out[key] = torch.tensor(shape, dtype=value.dtype)
            elif torch.is_tensor(value) and key not in cls._BATCH_KEYS:
                out[key] = value[part].to(device)
            else:
                out[key] = value
        return out

    def __call__(self, images: Tensor, labels: Tensor, part: Optional[slice] = None,
                 batch_size: Optional[int] = None) -> Tuple[Tensor, Tensor]:
        """``images`` uint8 ``(b, 3, H, W)``, ``labels`` int64 ``(b, 1, H, W)`` -> float images in [0, 255]
        and labels, on the device of ``images``.

        With ``part`` and ``batch_size``: the crops are a rank's ``part`` of a global batch of ``batch_size``; the
        random draws are those of the whole global batch (in the order one process draws them), applied to the
        crops of ``part``, so that the augmentation of a crop does not depend on the number of ranks."""
        b = images.shape[0]
        total = b if batch_size is None else int(batch_size)
        part = slice(0, total) if part is None else part
        own = range(total)[part]
        if len(own) != b:
            raise ValueError(f"augmentation: {b} crops for part {part} of a batch of {total}")
        # Per crop, in order: horizontal flip, vertical flip, quarter turns (the draws of every crop of the batch).
        plans: Dict[Tuple[Tuple[int, ...], int], List[int]] = {}
        for j in range(total):
            dims = []
            if self.hflip and torch.rand(()) < 0.5:
                dims.append(-1)
            if self.vflip and torch.rand(()) < 0.5:
                dims.append(-2)
            k = int(torch.randint(0, 4, ())) if self.rot90 else 0
            if j in own and (dims or k):
                plans.setdefault((tuple(dims), k), []).append(j - own.start)
        x = images.float() / 255.0
        y = labels.clone()
        for (dims, k), rows in plans.items():  # flips and turns are exact permutations: one call per kind
            xs, ys = x[rows], y[rows]
            if dims:
                xs, ys = xs.flip(dims), ys.flip(dims)
            if k:
                xs, ys = torch.rot90(xs, k, (-2, -1)), torch.rot90(ys, k, (-2, -1))
            x[rows], y[rows] = xs, ys
        whole = (total, *x.shape[1:])
        if self.rotate is not None:
            params = [type(item)(item.name, self._cut(item.data, part, tuple(x.shape), x.device))
                      for item in self.rotate.forward_parameters(whole)]
            # Shift labels by one so that 0 marks "outside the rotated crop" and becomes the ignore label.
            x, y_shift = self.rotate(x, (y + 1).float(), params=params)
            y_shift = y_shift.round().long()
            y = torch.where(y_shift == 0, torch.full_like(y_shift, self.ignore_index), y_shift - 1)
        if self.jitter is not None:
            params = self._cut(self.jitter.forward_parameters(whole), part, tuple(x.shape), x.device)
            x = self.jitter(x, params=params)
        return x.clamp(0, 1) * 255.0, y

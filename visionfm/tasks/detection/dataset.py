"""Detection records as mmdet inputs: images resized once (longest side ``max_size``, boxes scaled by the same
factors), optional flips and colour jitter for training, ``DetDataSample`` s whose metainfo lets mmdet map
predictions back to the original resolution (``ori_shape``, ``scale_factor``, ``rescale=True``).

Example:
    >>> ds = DetectionDataset(records, classes, max_size=512, train=True)  # doctest: +SKIP
    >>> batch = pseudo_collate([ds[0], ds[1]])  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from mmdet.structures import DetDataSample
from mmengine.structures import InstanceData
from PIL import Image

from ...data.io import read_image
from ...data.boxes import DetectionRecord, crop_boxes, flip_boxes, scale_boxes

__all__ = ["resize_longest", "DetectionDataset", "StepBatchSampler"]


def resize_longest(image: np.ndarray, max_size: int) -> Tuple[np.ndarray, Tuple[float, float]]:
    """Resize an ``(H, W, C)`` uint8 image so that its longer side is ``max_size`` (aspect kept).

    Returns:
        The resized image and the ``(sx, sy)`` factors that map original coordinates to resized ones (they
        differ slightly because sizes are rounded to whole pixels).
    """
    if max_size < 2:
        raise ValueError(f"max_size must be at least 2, got {max_size}")
    h, w = image.shape[:2]
    ratio = max_size / max(h, w)
    new_w, new_h = max(1, round(w * ratio)), max(1, round(h * ratio))
    if (new_w, new_h) != (w, h):
        pil = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
        resized = np.asarray(pil.resize((new_w, new_h), Image.BILINEAR))  # Pillow filters (antialiases) when shrinking
        image = resized.reshape(new_h, new_w, -1)
    return np.ascontiguousarray(image), (new_w / w, new_h / h)


class DetectionDataset(torch.utils.data.Dataset):
    """mmdet-ready samples from :class:`DetectionRecord` s.

    Args:
        records: The images and boxes (original resolution).
        classes: Class names (the labels index them).
        channels: Channels the image is read with (1 for grey modalities: repeated to 3 for the encoder).
        max_size: Longest side after resizing.
        train: Apply the training augmentation.
        hflip: Probability of a horizontal flip (training only).
        color_jitter: Strength of a random brightness/contrast change (training only; 0 disables it).
        cache: Keep resized images in memory (large fundus images are decoded once).
        crop_size: Train on square crops of this many pixels of the resized image (``None``: whole images), so
            that small objects (lesions) can be seen at a high ``max_size`` for the cost of a small input; the
            test and validation images stay whole (the encoder takes any size).
        crop_on_box: Probability that a training crop is placed to hold a random box (its centre, if the box is
            larger than the crop; else the crop is placed uniformly): with a few small objects per image, uniform
            crops are mostly background.
        min_visible: Fraction of a box's area that must lie inside a crop for the box to be kept.
    """

    def __init__(self, records: Sequence[DetectionRecord], classes: Sequence[str], channels: int = 3,
                 max_size: int = 512, train: bool = False, hflip: float = 0.5, color_jitter: float = 0.0,
                 cache: bool = True, seed: int = 0, crop_size: Optional[int] = None, crop_on_box: float = 0.5,
                 min_visible: float = 0.5):
        if crop_size is not None and int(crop_size) < 32:
            raise ValueError(f"crop_size must be at least 32 pixels, got {crop_size}")
        self.crop_size = None if crop_size is None else int(crop_size)
        self.crop_on_box = float(crop_on_box)
        self.min_visible = float(min_visible)
        self.records = list(records)
        self.classes = tuple(classes)
        self.channels = channels
        self.max_size = int(max_size)
        self.train = train
        self.hflip = float(hflip)
        self.color_jitter = float(color_jitter)
        self.cache = cache
        self._cache: Dict[int, Tuple[np.ndarray, Tuple[float, float]]] = {}
        self._rng = np.random.default_rng(seed)
        for rec in self.records:
            if len(rec.labels) and (rec.labels.min() < 0 or rec.labels.max() >= len(self.classes)):
                raise ValueError(f"{rec.source or rec.image}: labels {sorted(set(rec.labels.tolist()))} outside the "
                                 f"{len(self.classes)} classes {list(self.classes)}")

    def __len__(self) -> int:
        return len(self.records)

    def image(self, index: int) -> Tuple[np.ndarray, Tuple[float, float]]:
        """The resized ``(h, w, 3)`` uint8 image of record ``index`` and its ``(sx, sy)`` scale factors."""
        if index in self._cache:
            return self._cache[index]
        rec = self.records[index]
        image = read_image(rec.image, self.channels)
        if image.shape[:2] != (rec.height, rec.width):
            raise ValueError(f"{rec.image}: image is {image.shape[1]}x{image.shape[0]} but its annotations are for "
                             f"{rec.width}x{rec.height}")
        image, scale = resize_longest(image, self.max_size)
        if image.shape[2] == 1:
            image = np.repeat(image, 3, axis=2)
        if self.cache:
            self._cache[index] = (image, scale)
        return image, scale

    def __getitem__(self, item: Union[int, Tuple[int, int]]) -> dict:
        """Sample ``item``: an index, or ``(index, seed)`` as :class:`StepBatchSampler` yields, whose seed alone
        decides the training augmentation (so that it does not depend on the worker or on earlier draws); with a
        plain index, training augmentation draws from the dataset's own generator."""
        index, rng = (item[0], np.random.default_rng(item[1])) if isinstance(item, tuple) else (item, self._rng)
        rec = self.records[index]
        image, scale = self.image(index)
        h, w = image.shape[:2]
        boxes = scale_boxes(rec.boxes, scale)
        flipped = self.train and rng.random() < self.hflip
        if flipped:
            image = image[:, ::-1]
            boxes = flip_boxes(boxes, w)
        keep = ~rec.ignore
        labels = rec.labels
        if self.train and self.crop_size is not None:
            x0, y0 = self._crop_origin(boxes[keep], w, h, rng)
            window = (x0, y0, min(w, x0 + self.crop_size), min(h, y0 + self.crop_size))
            image = image[window[1]:window[3], window[0]:window[2]]
            boxes, inside = crop_boxes(boxes, window, self.min_visible)
            keep, labels = keep[inside], labels[inside]
            h, w = image.shape[:2]
        tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if self.train and self.color_jitter > 0:
            contrast = 1.0 + rng.uniform(-self.color_jitter, self.color_jitter)
            brightness = 255.0 * rng.uniform(-self.color_jitter, self.color_jitter) / 2
            mean = tensor.float().mean()
            tensor = ((tensor.float() - mean) * contrast + mean + brightness).clamp(0, 255).round().to(torch.uint8)
        sample = DetDataSample(metainfo=dict(
            img_id=index, img_path=str(rec.image), ori_shape=(rec.height, rec.width), img_shape=(h, w),
            scale_factor=scale, flip=bool(flipped), flip_direction="horizontal" if flipped else None,
            # original-resolution boxes for mmdet's CocoMetric (which builds its COCO ground truth from them)
            instances=[dict(bbox=b.tolist(), bbox_label=int(lab), ignore_flag=int(ign))
                       for b, lab, ign in zip(rec.boxes, rec.labels, rec.ignore)]))
        gt = InstanceData()
        gt.bboxes = torch.from_numpy(boxes[keep]).float().reshape(-1, 4)
        gt.labels = torch.from_numpy(labels[keep]).long()
        sample.gt_instances = gt
        ignored = InstanceData()
        ignored.bboxes = torch.from_numpy(boxes[~keep]).float().reshape(-1, 4)
        ignored.labels = torch.from_numpy(labels[~keep]).long()
        sample.ignored_instances = ignored
        return dict(inputs=tensor, data_samples=sample)

    def _crop_origin(self, boxes: np.ndarray, width: int, height: int, rng: np.random.Generator) -> Tuple[int, int]:
        """Top-left corner of a training crop: holding a random box (probability ``crop_on_box``, when there are
        boxes) or uniform over the image."""
        size = self.crop_size
        assert size is not None
        x_max, y_max = max(0, width - size), max(0, height - size)
        if len(boxes) and rng.random() < self.crop_on_box:
            box = boxes[rng.integers(len(boxes))]
            return tuple(self._origin_around(float(box[k]), float(box[k + 2]), size, limit, rng)  # type: ignore
                         for k, limit in ((0, x_max), (1, y_max)))
        return int(rng.integers(0, x_max + 1)), int(rng.integers(0, y_max + 1))

    @staticmethod
    def _origin_around(lo: float, hi: float, size: int, limit: int, rng: np.random.Generator) -> int:
        """A window start along one axis, uniform among those (in ``[0, limit]``) whose window of ``size`` holds the
        interval ``[lo, hi]``, or its centre when the interval is longer than the window."""
        if hi - lo <= size:
            first, last = int(np.ceil(hi)) - size, int(np.floor(lo))
        else:
            centre = (lo + hi) / 2
            first, last = int(np.ceil(centre)) - size + 1, int(np.floor(centre))
        first, last = min(limit, max(0, first)), min(limit, max(0, last))
        return int(rng.integers(first, max(first, last) + 1))

    def class_counts(self) -> List[int]:
        """Boxes per class over the dataset (for the log)."""
        counts = np.zeros(len(self.classes), dtype=np.int64)
        for rec in self.records:
            np.add.at(counts, rec.labels[~rec.ignore], 1)
        return counts.tolist()

    def point_truth(self) -> Optional[List[Tuple[float, float]]]:
        """True points of all records, or ``None`` when the dataset has none."""
        points = [rec.point for rec in self.records]
        return None if any(p is None for p in points) else points  # type: ignore[return-value]


class StepBatchSampler(torch.utils.data.Sampler):
    """Training batches as a function of the step number alone, from ``start`` to ``stop``.

    Step ``s`` takes batch ``s % per_epoch`` of epoch ``s // per_epoch``'s shuffle (drop-last), the shuffle seeded
    from ``(seed, epoch)``; each draw carries its own augmentation seed from ``(seed, s, slot)``. A run resumed at
    step ``s`` therefore sees exactly the batches, flips and jitter of an uninterrupted run, with any number of
    data-loader workers.

    Args:
        size: Number of training images.
        batch_size: Images per step (at most ``size``).
        seed: Run seed.
        start: First step to yield.
        stop: Step to stop before.
        part: The share of every batch to yield (a ``torchrun`` rank's, :meth:`visionfm.engine.loop.RunContext.part`):
            ranks cut the same global batch, so the data do not depend on the number of processes.
    """

    def __init__(self, size: int, batch_size: int, seed: int, start: int, stop: int, part: slice = slice(None)):
        if not 1 <= batch_size <= size:
            raise ValueError(f"batch size {batch_size} must be between 1 and the {size} training images")
        self.size, self.batch_size, self.seed = int(size), int(batch_size), int(seed)
        self.start, self.stop = int(start), int(stop)
        self.part = part
        self.per_epoch = self.size // self.batch_size

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        epoch, order = None, None
        for step in range(self.start, self.stop):
            if step // self.per_epoch != epoch:
                epoch = step // self.per_epoch
                order = torch.randperm(self.size, generator=torch.Generator().manual_seed(
                    int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0]))).tolist()
            first = (step % self.per_epoch) * self.batch_size
            seeds = np.random.SeedSequence([self.seed, step]).generate_state(self.batch_size)
            yield [(order[first + slot], int(seeds[slot])) for slot in range(self.batch_size)][self.part]

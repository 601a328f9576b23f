"""Labelled images for classification: samples, splits grouped by patient, few-shot sampling, and a torch
``Dataset`` that returns encoder-ready tensors.

A dataset family's reader (:mod:`.imagefolder`, :mod:`.csvfile`, or an adapter over :mod:`.oct_fundus`)
produces a :class:`LabeledSplits`; everything downstream works on that.

Example:
    >>> from pathlib import Path
    >>> samples = [LabeledSample(Path(f"{i}.png"), i % 2, group=f"p{i // 2}") for i in range(20)]
    >>> splits = grouped_split(samples, (0.6, 0.2, 0.2), seed=0)
    >>> sorted(splits)
    ['test', 'train', 'val']
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from ...modalities import Modality, get_modality
from ..io import ImageReadError, check_image, read_image
from ..unlabeled import DataError, square_and_resize

__all__ = ["SPLITS", "LABEL_KINDS", "LabeledSample", "LabeledSplits", "own_group", "grouped_split", "grouped_folds",
           "limit_samples", "sample_shots", "check_files", "label_tensor", "targets_tensor", "LabeledImages"]

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
LABEL_KINDS = ("multiclass", "multilabel", "ordinal")

Label = Union[int, Tuple[int, ...]]


@dataclass(frozen=True)
class LabeledSample:
    """One image and its label.

    Attributes:
        path: Image file.
        label: Class index (multi-class, ordinal grade), or a tuple of 0/1 per label (multi-label).
        group: Patient (or other unit) id; images of one group always share a split. ``None``: the image is
            its own group.
    """

    path: Path
    label: Label
    group: Optional[str] = None

    @property
    def group_key(self) -> str:
        return self.group if self.group is not None else f"image:{self.path}"


@dataclass
class LabeledSplits:
    """A classification dataset: its ``train``/``val``/``test`` samples, class names and label kind."""

    splits: Dict[str, List[LabeledSample]]
    class_names: List[str]
    kind: str
    description: str = ""
    notes: List[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.kind not in LABEL_KINDS:
            raise ValueError(f"label kind must be one of {', '.join(LABEL_KINDS)}, got {self.kind!r}")
        missing = [s for s in SPLITS if not self.splits.get(s)]
        if missing:
            raise DataError(f"{self.description or 'dataset'}: empty split(s): {', '.join(missing)}")
        if len(self.class_names) < 2 and self.kind != "multilabel":
            raise DataError(f"{self.description or 'dataset'}: needs at least 2 classes, got {self.class_names}")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def class_counts(self, split: str) -> List[int]:
        """Images per class (multi-label: positives per label) in a split."""
        counts = [0] * self.num_classes
        for s in self.splits[split]:
            if self.kind == "multilabel":
                for c, v in enumerate(s.label):
                    counts[c] += int(v)
            else:
                counts[int(s.label)] += 1
        return counts

    def summary(self) -> Dict[str, Dict[str, int]]:
        return {split: {"images": len(self.splits[split]),
                        "groups": len({s.group_key for s in self.splits[split]}),
                        **{name: n for name, n in zip(self.class_names, self.class_counts(split))}}
                for split in SPLITS}


def own_group(path: "str | Path", root: "str | Path") -> str:
    """The group of an image that is its own group, named by its path under the dataset's ``root``, so that a carve
    does not change with how the data root is spelled (``../shared/data`` or an absolute path)."""
    path, root = Path(path), Path(root)
    try:
        return f"image:{path.relative_to(root).as_posix()}"
    except ValueError:  # an absolute path outside the root (a CSV may name one): the path itself
        return f"image:{path.as_posix()}"


def _stratum(labels: Sequence[Label]) -> str:
    """The label a group is stratified by: its most common label (ties: the largest, i.e. the positive or
    the worse grade)."""
    counts = Counter(labels)
    best = max(counts.values())
    return str(max(lab for lab, n in counts.items() if n == best))


def _hash_order(keys: Sequence[str], seed: int) -> List[str]:
    # Sort by a seeded hash first so the result does not depend on the order the keys were given in.
    return sorted(keys, key=lambda k: hashlib.sha256(f"{seed}:{k}".encode()).hexdigest())


def grouped_split(samples: Sequence[LabeledSample], fractions: Sequence[float] = (0.6, 0.15, 0.25),
                  seed: int = 0) -> Dict[str, List[LabeledSample]]:
    """Split samples into ``train``/``val``/``test`` by group (patient), stratified by each group's label.

    Every group lands in exactly one split. Within each stratum the groups are shuffled (seeded) and the
    first ``round(fraction * n)`` go to test, the next to val, the rest to train; a stratum too small to feed
    every split keeps train first. Deterministic for a seed and independent of the input order.

    Raises:
        ValueError: fractions that are not three non-negative numbers summing to 1.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must be three non-negative numbers (train, val, test) summing to 1, "
                         f"got {list(fractions)}")
    by_group: Dict[str, List[LabeledSample]] = defaultdict(list)
    for s in samples:
        by_group[s.group_key].append(s)
    strata: Dict[str, List[str]] = defaultdict(list)
    for key, members in by_group.items():
        strata[_stratum([m.label for m in members])].append(key)
    assignment: Dict[str, str] = {}
    for stratum in sorted(strata):
        groups = _hash_order(strata[stratum], seed)
        random.Random(f"{seed}:{stratum}").shuffle(groups)
        n = len(groups)
        n_test = int(round(fractions[2] * n))
        n_val = int(round(fractions[1] * n))
        if fractions[0] > 0 and n_test + n_val >= n:  # keep at least one group for training
            n_val = max(0, min(n_val, n - n_test - 1))
            n_test = max(0, min(n_test, n - n_val - 1))
        for i, key in enumerate(groups):
            assignment[key] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    out: Dict[str, List[LabeledSample]] = {s: [] for s in SPLITS}
    for s in samples:
        out[assignment[s.group_key]].append(s)
    return out


def grouped_folds(samples: Sequence[LabeledSample], folds: int, seed: int = 0) -> Dict[str, int]:
    """Fold (``0 .. folds - 1``) of every group (patient) for k-fold cross-validation, stratified as
    :func:`grouped_split` is: the groups of each stratum (a group's most common label) are shuffled (seeded) and
    dealt round-robin, the deal going on from one stratum to the next so that fold sizes differ by at most one
    group. Deterministic for a seed and independent of the input order.

    Raises:
        ValueError: fewer than 2 folds, or fewer groups than folds.
    """
    by_group: Dict[str, List[Label]] = defaultdict(list)
    for s in samples:
        by_group[s.group_key].append(s.label)
    if folds < 2 or len(by_group) < folds:
        raise ValueError(f"{folds} folds need at least 2 folds and as many groups; got {len(by_group)} group(s)")
    strata: Dict[str, List[str]] = defaultdict(list)
    for key, labels in by_group.items():
        strata[_stratum(labels)].append(key)
    fold: Dict[str, int] = {}
    dealt = 0
    for stratum in sorted(strata):
        groups = _hash_order(strata[stratum], seed)
        random.Random(f"{seed}:{stratum}").shuffle(groups)
        for key in groups:
            fold[key] = dealt % folds
            dealt += 1
    return fold


def _class_of(sample: LabeledSample) -> str:
    return str(sample.label)


def limit_samples(samples: Sequence[LabeledSample], limit: Optional[int], seed: int = 0) -> List[LabeledSample]:
    """At most ``limit`` samples, taken round-robin over the classes (each class shuffled, seeded) so that a
    quick trial still sees every class. Order of the result follows the input order."""
    if not limit or limit >= len(samples):
        return list(samples)
    by_class: Dict[str, List[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        by_class[_class_of(s)].append(i)
    rng = random.Random(seed)
    queues = []
    for key in sorted(by_class):
        idx = list(by_class[key])
        rng.shuffle(idx)
        queues.append(idx)
    chosen: List[int] = []
    while len(chosen) < limit:
        for q in queues:
            if q and len(chosen) < limit:
                chosen.append(q.pop())
    return [samples[i] for i in sorted(chosen)]


def sample_shots(samples: Sequence[LabeledSample], shots: int, kind: str, num_classes: int,
                 seed: int = 0) -> List[LabeledSample]:
    """``shots`` training images per class (seeded), for data-efficiency curves.

    For multi-label data, ``shots`` images positive for each label are drawn (an image drawn for one label
    counts for all of its labels). A class with fewer images than ``shots`` contributes all it has; that is
    logged.
    """
    if shots <= 0:
        raise ValueError(f"--shots must be a positive number of images per class, got {shots}")
    rng = random.Random(seed)
    order = list(range(len(samples)))
    rng.shuffle(order)
    chosen: List[int] = []
    taken = set()
    for c in range(num_classes):
        if kind == "multilabel":
            have = sum(1 for i in taken if samples[i].label[c])
            pool = [i for i in order if samples[i].label[c] and i not in taken]
        else:
            have = 0
            pool = [i for i in order if int(samples[i].label) == c]
        need = max(0, shots - have)
        if len(pool) < need:
            log.warning("class %d has only %d training image(s) for %d shots; using all of them", c,
                        len(pool) + have, shots)
        for i in pool[:need]:
            chosen.append(i)
            taken.add(i)
    return [samples[i] for i in sorted(chosen)]


def label_tensor(label: Label) -> torch.Tensor:
    """A label as a training target: ``int64`` class index, or float 0/1 vector for multi-label."""
    if isinstance(label, tuple):
        return torch.tensor(label, dtype=torch.float32)
    return torch.tensor(int(label), dtype=torch.int64)


def targets_tensor(samples: Sequence[LabeledSample]) -> torch.Tensor:
    """All targets of some samples stacked: ``(N,)`` class indices or ``(N, L)`` multi-label 0/1."""
    return torch.stack([label_tensor(s.label) for s in samples])


class LabeledImages(Dataset):
    """Labelled images as encoder-ready tensors.

    Each image is read with the modality's channel count (grey modalities as one channel, repeated to 3),
    made square with the modality's rule (central square, or the whole frame stretched for B-scans), resized
    to ``size`` and normalised with the encoder's mean/std. Every file is checked when the dataset is built,
    so a bad file stops the run before any training, with its path in the message.

    Items are ``(image, target)``: ``image`` float ``(3, size, size)``; ``target`` an ``int64`` class index,
    or a float 0/1 vector for multi-label.

    Args:
        samples: The images and labels.
        modality: Modality name or object.
        size: Side length.
        mean, std: Normalisation (3 values each), normally ``EncoderInfo.mean``/``std``.
        cache: Decode each image once and keep it (as ``uint8``) in memory.
        mirror: Give every image flipped left-right (a probe's mirrored training copies); only for modalities
            that allow horizontal flips.
    """

    def __init__(self, samples: Sequence[LabeledSample], modality: "Modality | str", size: int,
                 mean: Sequence[float], std: Sequence[float], cache: bool = True, mirror: bool = False) -> None:
        if not samples:
            raise DataError("no labelled images given")
        self.samples = list(samples)
        self.modality = get_modality(modality)
        if mirror and not self.modality.augment.hflip:
            raise ValueError(f"modality {self.modality.name!r} does not allow horizontal flips; no mirrored images")
        self.mirror = bool(mirror)
        self.size = int(size)
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(3, 1, 1)
        if self.mean.numel() != 3 or self.std.numel() != 3:
            raise ValueError("mean and std must have 3 values each")
        for s in self.samples:
            check_image(s.path)
        self._cache: Optional[List[torch.Tensor]] = None
        if cache:
            self._cache = [self._load(i) for i in range(len(self.samples))]

    def _load(self, index: int) -> torch.Tensor:
        path = self.samples[index].path
        # JPEGs may decode at a reduced scale that still covers ``size`` (much faster for large photographs).
        image = read_image(path, channels=self.modality.channels, min_size=self.size)
        image = square_and_resize(image, self.size, self.modality.augment.square_crop)
        tensor = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).contiguous()
        if tensor.shape[0] == 1:
            tensor = tensor.expand(3, -1, -1).contiguous()
        return tensor

    def __len__(self) -> int:
        return len(self.samples)

    def target(self, index: int) -> torch.Tensor:
        return label_tensor(self.samples[index].label)

    def targets(self) -> torch.Tensor:
        """All targets stacked: ``(N,)`` class indices or ``(N, L)`` multi-label 0/1."""
        return targets_tensor(self.samples)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        image = self._cache[index] if self._cache is not None else self._load(index)
        image = (image.float() / 255.0 - self.mean) / self.std
        if self.mirror:
            image = image.flip(-1)
        return image, self.target(index)


def check_files(samples: Sequence[LabeledSample], where: "str | os.PathLike") -> None:
    """Fail early, naming the first missing image, if any sample's file does not exist."""
    for s in samples:
        if not Path(s.path).is_file():
            raise ImageReadError(f"{s.path}: file not found (listed in {where})")

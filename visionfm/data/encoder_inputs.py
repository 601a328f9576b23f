"""A user's images as encoder input: checked once, read with the one reader, batched with a progress bar.

Every command here reads images exactly as the encoder's training images were read (the modality's channel
count, its squaring rule, the encoder's size and normalisation), so features and predictions on new images are
comparable with those of training. Large photographs are decoded at a reduced JPEG scale where the output allows
and always resized to the encoder's input, so a 4288x2848 fundus photo or an 8000-pixel montage costs one
decoded image at a time, never a batch of full-resolution ones.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Iterator, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from ..modalities import Modality, get_modality
from .inputs import InputImage, check_min_side, collect_images, note_channels, warn_if_large
from .io import read_image
from .unlabeled import square_and_resize

__all__ = ["prepare_inputs", "encoder_batch", "iter_batches"]

log = logging.getLogger(__name__)


def prepare_inputs(source: "str | os.PathLike", modality: "str | Modality", patch_size: int, *,
                   limit: Optional[int] = None, recursive: bool = False, skip_corrupt: bool = False,
                   large: str = "resized to the encoder's input size") -> List[InputImage]:
    """Collect and check the images of a folder or CSV for a modality's encoder.

    Every file is decoded before anything is written; a grey image for a colour modality (or the reverse) is
    noted in the log and converted; an image smaller than one patch is refused; large images are logged with
    ``large`` (how the command handles them).

    Raises:
        visionfm.data.inputs.InputError: missing or empty source, an image smaller than one patch.
        visionfm.data.io.ImageReadError: an unreadable file (without ``skip_corrupt``), named in the message.
    """
    m = get_modality(modality)
    images = collect_images(source, limit=limit, recursive=recursive, skip_corrupt=skip_corrupt)
    note_channels(images, m.channels, m.name)
    check_min_side(images, int(patch_size), f"one {patch_size}-pixel patch of the encoder")
    warn_if_large(images, large)
    log.info("%d image(s) from %s", len(images), source)
    return images


def encoder_batch(images: Sequence[InputImage], modality: "str | Modality", size: int, mean: Sequence[float],
                  std: Sequence[float]) -> Tensor:
    """``(B, 3, size, size)`` normalised float32 input of some images, read as the encoder's training images
    were (``LabeledImages``: modality channels, squaring rule, antialiased resize)."""
    m = get_modality(modality)
    out = np.empty((len(images), int(size), int(size), 3), np.uint8)
    for i, im in enumerate(images):
        pixels = square_and_resize(read_image(im.path, channels=m.channels, min_size=int(size)), int(size),
                                   m.augment.square_crop)
        out[i] = np.repeat(pixels, 3, axis=2) if pixels.shape[2] == 1 else pixels
    batch = torch.from_numpy(out).permute(0, 3, 1, 2).float().div_(255.0)
    mean_t = torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1)
    return (batch - mean_t) / std_t


def iter_batches(images: Sequence[InputImage], batch_size: int, desc: str) -> Iterator[List[InputImage]]:
    """Consecutive chunks of ``batch_size`` images, with a progress bar (on stderr, off when it is not a
    terminal so that logs stay readable)."""
    from tqdm import tqdm  # noqa: PLC0415

    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    with tqdm(total=len(images), desc=desc, unit="img", disable=not sys.stderr.isatty()) as bar:
        for start in range(0, len(images), batch_size):
            chunk = list(images[start:start + batch_size])
            yield chunk
            bar.update(len(chunk))

"""Tiny segmentation inputs shared by the segmentation tests: a model small enough for a CPU test, its encoder file
and a generic dataset of bright lines on dark noise."""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import numpy as np
import torch
from PIL import Image

from visionfm.models.vit import create_encoder
from visionfm.weights.export import save_encoder

# One thread: runs compared bit for bit (resume, eval-only) must sum in the same order, which a thread count
# timed afresh by each run (train.threads=auto) does not guarantee.
TINY = ["--crop-size", "64", "--batch-size", "2", "--set", "model.pyramid_channels=32", "--set",
        "model.head_channels=16", "--set", "model.stem_channels=[8,16]", "--set", "model.blocks=[1,3,5,11]",
        "--precision", "fp32", "--set", "train.threads=1"]


def write_tiny_encoder(path: Path, seed: int = 0) -> Path:
    """A randomly initialised cfp ViT-Tiny/16 at 64 px, saved as the toolkit's encoder file."""
    torch.manual_seed(seed)
    save_encoder(create_encoder("vit_tiny", 16, 64).state_dict(), path,
                 {"modality": "cfp", "arch": "vit_tiny", "patch_size": 16, "img_size": 64,
                  "mean": [0.4, 0.3, 0.2], "std": [0.25, 0.2, 0.15]})
    return path


def write_line_dataset(root: Path, counts: Dict[str, int], seed: int = 0) -> Path:
    """``root/<split>/{images,masks}/<split><i>.png``: 72 x 80 noise with one bright row and column as the truth."""
    rng = np.random.default_rng(seed)
    for split, n in counts.items():
        for i in range(n):
            image = rng.integers(0, 120, (72, 80, 3), dtype=np.uint8)
            truth = np.zeros((72, 80), bool)
            truth[:, int(rng.integers(5, 75))] = truth[int(rng.integers(5, 67))] = True
            image[truth] = (220, 200, 120)
            for sub, arr in (("images", image), ("masks", truth.astype(np.uint8) * 255)):
                (root / split / sub).mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).save(root / split / sub / f"{split}{i}.png")
    return root

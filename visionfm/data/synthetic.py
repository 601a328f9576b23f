"""Procedural stand-in images for the built-in demo and for tests (no download, no real patient data).

- ``cfp`` and fundus-like modalities: a circular field of view with an illumination fall-off, a bright
  optic disc, vessels branching from it, a darker macula and a few lesions.
- ``oct`` and B-scan-like modalities: curved bright/dark retinal layers with speckle and a foveal pit.
"""

from __future__ import annotations

from typing import List

import numpy as np
import torch
from torch.utils.data import Dataset

from ..modalities import Modality, get_modality

__all__ = ["synthetic_fundus", "synthetic_bscan", "synthetic_image", "SyntheticImages"]


def _draw_disc(img: np.ndarray, cy: float, cx: float, r: float, colour, yy, xx) -> None:
    mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r ** 2
    img[mask] = colour


def synthetic_fundus(size: int, rng: np.random.Generator) -> np.ndarray:
    """A colour fundus-like image, ``uint8 (size, size, 3)``."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    c = (size - 1) / 2
    r = np.sqrt((yy - c) ** 2 + (xx - c) ** 2) / (size / 2)
    base = np.array([0.75, 0.35, 0.15]) * rng.uniform(0.8, 1.1)
    img = base[None, None, :] * (1.0 - 0.45 * r[..., None] ** 2)
    side = rng.choice([-1, 1])
    dy, dx = c + rng.normal(0, size * 0.03), c + side * size * rng.uniform(0.18, 0.28)
    my, mx = c + rng.normal(0, size * 0.02), c - side * size * 0.05
    macula = np.exp(-(((yy - my) ** 2 + (xx - mx) ** 2) / (2 * (size * 0.07) ** 2)))
    img *= (1.0 - 0.35 * macula)[..., None]
    # vessels: random walks leaving the disc, darker red, branching
    vessel = np.zeros((size, size), np.float32)
    for _ in range(int(rng.integers(6, 10))):
        y, x = dy, dx
        angle = rng.uniform(0, 2 * np.pi)
        width = size * rng.uniform(0.006, 0.012)
        for _step in range(int(size * 0.8)):
            angle += rng.normal(0, 0.12)
            y, x = y + np.sin(angle), x + np.cos(angle)
            if not (0 <= y < size and 0 <= x < size):
                break
            y0, y1 = int(max(0, y - width)), int(min(size, y + width + 1))
            x0, x1 = int(max(0, x - width)), int(min(size, x + width + 1))
            vessel[y0:y1, x0:x1] = 1.0
            width = max(size * 0.003, width * 0.997)
    img = img * (1.0 - 0.45 * vessel[..., None]) + vessel[..., None] * np.array([0.05, 0.0, 0.0])
    _draw_disc(img, dy, dx, size * 0.07, np.array([0.98, 0.85, 0.6]), yy, xx)
    for _ in range(int(rng.integers(0, 6))):  # lesions: exudates (yellow) or haemorrhages (dark red)
        ly, lx = rng.uniform(0.25, 0.75, size=2) * size
        colour = np.array([0.95, 0.85, 0.3]) if rng.random() < 0.5 else np.array([0.35, 0.05, 0.02])
        _draw_disc(img, ly, lx, size * rng.uniform(0.005, 0.015), colour, yy, xx)
    img += rng.normal(0, 0.015, img.shape)
    img[r > 0.97] = 0.0
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def synthetic_bscan(size: int, rng: np.random.Generator) -> np.ndarray:
    """A grey OCT-like B-scan, ``uint8 (size, size, 1)``."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    curve = 0.08 * (xx - 0.5) ** 2 * rng.uniform(0.5, 2) + rng.uniform(0.3, 0.45)
    pit = 0.06 * np.exp(-((xx - rng.uniform(0.4, 0.6)) ** 2) / 0.004)
    depth = yy - curve - pit * (rng.random() < 0.8)
    img = np.zeros_like(yy)
    thickness = rng.uniform(0.8, 1.2)
    layers = [(0.0, 0.02, 0.9), (0.02, 0.08, 0.35), (0.08, 0.12, 0.55), (0.12, 0.18, 0.25),
              (0.18, 0.21, 0.7), (0.21, 0.24, 0.95), (0.24, 0.30, 0.5)]
    for top, bottom, value in layers:
        img[(depth >= top * thickness) & (depth < bottom * thickness)] = value
    if rng.random() < 0.4:  # intraretinal fluid: dark cysts
        cy, cx = curve.mean() + 0.08, rng.uniform(0.35, 0.65)
        img[((yy - cy) / 0.03) ** 2 + ((xx - cx) / 0.05) ** 2 < 1] = 0.05
    img = img * rng.gamma(4.0, 0.25, img.shape)  # multiplicative speckle
    img += rng.normal(0.04, 0.02, img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)[..., None]


def synthetic_image(modality: "Modality | str", size: int, rng: np.random.Generator) -> np.ndarray:
    """A stand-in image for any modality, with the modality's channel count."""
    m = get_modality(modality)
    if m.augment.square_crop == "stretch" or m.name in ("oct", "ubm", "bscan"):
        img = synthetic_bscan(size, rng)
    else:
        img = synthetic_fundus(size, rng)
    if m.channels == 1 and img.shape[2] == 3:
        img = img.mean(axis=2, keepdims=True).astype(np.uint8)
    elif m.channels == 3 and img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    return img


class SyntheticImages(Dataset):
    """``count`` procedural images of a modality, ``uint8 (C, size, size)``, deterministic for a seed."""

    def __init__(self, modality: "Modality | str", count: int = 64, size: int = 128, seed: int = 0) -> None:
        self.modality = get_modality(modality)
        rng = np.random.default_rng(seed)
        self.images: List[torch.Tensor] = [
            torch.from_numpy(synthetic_image(self.modality, size, rng)).permute(2, 0, 1).contiguous()
            for _ in range(count)]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]

    def describe(self) -> str:
        return f"{len(self.images)} synthetic {self.modality.name} images (procedural, built in)"

"""Overlay PNGs for a visual check: image | truth | prediction | errors, side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

__all__ = ["ERROR_COLOURS", "error_map", "save_overlay", "save_mask"]

#: Colours of the error panel: true positive white, false positive red, false negative blue, true negative black;
#: outside the FOV everything is dark grey.
ERROR_COLOURS = {"tp": (255, 255, 255), "fp": (230, 40, 40), "fn": (40, 110, 255), "tn": (0, 0, 0),
                 "outside": (45, 45, 45)}


def error_map(pred: np.ndarray, truth: np.ndarray, region: Optional[np.ndarray] = None) -> np.ndarray:
    """RGB ``uint8`` map of TP/FP/FN/TN (see :data:`ERROR_COLOURS`)."""
    out = np.zeros(pred.shape + (3,), np.uint8)
    for key, sel in (("tp", pred & truth), ("fp", pred & ~truth), ("fn", ~pred & truth), ("tn", ~pred & ~truth)):
        out[sel] = ERROR_COLOURS[key]
    if region is not None:
        out[~region] = ERROR_COLOURS["outside"]
    return out


def _grey(mask: np.ndarray) -> np.ndarray:
    return np.repeat((mask.astype(np.uint8) * 255)[:, :, None], 3, axis=2)


def save_overlay(path: "str | Path", image: np.ndarray, truth: np.ndarray, prob: np.ndarray,
                 region: Optional[np.ndarray] = None, threshold: float = 0.5, max_side: int = 1024) -> Path:
    """Write ``image | truth | prediction | errors`` as one PNG, each panel at most ``max_side`` pixels."""
    pred = prob > threshold
    panels = [image if image.shape[2] == 3 else np.repeat(image, 3, axis=2), _grey(truth), _grey(pred),
              error_map(pred, truth, region)]
    h, w = truth.shape
    scale = min(1.0, max_side / max(h, w))
    size = (max(1, int(round(w * scale))), max(1, int(round(h * scale))))
    resized = [np.asarray(Image.fromarray(p).resize(size, Image.Resampling.BILINEAR)) if scale < 1 else p
               for p in panels]
    gap = np.full((size[1], 4, 3), 128, np.uint8)
    row = np.concatenate([x for p in resized for x in (p, gap)][:-1], axis=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(row).save(path)
    return path


def save_mask(path: "str | Path", prob: np.ndarray, threshold: float = 0.5, probability: bool = False) -> Path:
    """Write a predicted mask as a 0/255 PNG, or the probability map scaled to 0..255."""
    if probability:
        arr = (np.clip(prob, 0, 1) * 255 + 0.5).astype(np.uint8)
    else:
        arr = (prob > threshold).astype(np.uint8) * 255
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path

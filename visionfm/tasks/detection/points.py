"""Point localisation scored the way the IDRiD localisation challenge does: Euclidean distance between the
predicted and the true centre at the original image resolution, and the fraction of images where that
distance is within 1/8 of the optic-disc diameter.

A detector predicts boxes; the predicted point is the centre of the highest-scoring box of the class. An
image with no box of the class counts with the image diagonal as its distance (the worst possible) and as
outside the radius, so that a detector cannot improve its score by abstaining.

Example:
    >>> m = point_metrics([(10.0, 0.0), None], [(0.0, 0.0), (5.0, 5.0)], [100.0, 100.0], [(100, 100), (30, 40)])
    >>> m["mean_distance_px"], m["within_1_8_dd"], m["n_missing"]
    (30.0, 0.5, 1)
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["top_box_centre", "point_metrics"]

Point = Tuple[float, float]


def top_box_centre(bboxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, label: int) -> Optional[Point]:
    """Centre of the highest-scoring box of class ``label``; ``None`` when there is none."""
    bboxes = np.asarray(bboxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    idx = np.flatnonzero(labels == label)
    if idx.size == 0:
        return None
    best = idx[np.argmax(scores[idx])]
    x1, y1, x2, y2 = bboxes[best]
    return (float(x1 + x2) / 2.0, float(y1 + y2) / 2.0)


def point_metrics(predicted: Sequence[Optional[Point]], truth: Sequence[Point], disc_diameters: Sequence[float],
                  image_sizes: Sequence[Tuple[int, int]], fraction: float = 1.0 / 8.0) -> Dict[str, float]:
    """Distances over a whole split.

    Args:
        predicted: Predicted point per image (``None``: no prediction).
        truth: True point per image.
        disc_diameters: Optic-disc diameter per image, in pixels.
        image_sizes: ``(width, height)`` per image, for the penalty of a missing prediction.
        fraction: Radius as a fraction of the disc diameter (1/8 in IDRiD).

    Returns:
        ``mean_distance_px``, ``median_distance_px``, ``within_1_8_dd`` (fraction of images), ``n_images``,
        ``n_missing``.
    """
    n = len(truth)
    if not (len(predicted) == n == len(disc_diameters) == len(image_sizes)):
        raise ValueError(f"point_metrics: {len(predicted)} predictions, {n} true points, {len(disc_diameters)} disc "
                         f"diameters and {len(image_sizes)} image sizes must all match")
    if n == 0:
        raise ValueError("point_metrics: no images to score")
    distances: List[float] = []
    hits = 0
    missing = 0
    for pred, true, dd, (w, h) in zip(predicted, truth, disc_diameters, image_sizes):
        if not dd or dd <= 0:
            raise ValueError(f"point_metrics: disc diameter must be positive, got {dd}")
        if pred is None:
            missing += 1
            distances.append(math.hypot(w, h))
            continue
        d = math.hypot(pred[0] - true[0], pred[1] - true[1])
        distances.append(d)
        hits += d <= fraction * dd
    return {"mean_distance_px": float(np.mean(distances)), "median_distance_px": float(np.median(distances)),
            "within_1_8_dd": hits / n, "n_images": n, "n_missing": missing}

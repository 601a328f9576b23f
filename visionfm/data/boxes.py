"""Boxes for detection: the record every detection dataset yields, boxes derived from masks and points, checks.

Boxes are ``(N, 4)`` float arrays ``x1, y1, x2, y2`` in pixel-edge coordinates of the original image (a box
covering pixel columns 10..19 is ``x1=10, x2=20``), as COCO and mmdet use them.

Lesion boxes from a binary mask (the rule, also stated in ``configs/det/README.md``):

1. 8-connected components of the mask (``scipy.ndimage.label``), one box per component;
2. boxes closer than ``merge_gap`` pixels (Chebyshev gap between the boxes, 0 when they touch or overlap;
   ``merge_gap=0`` merges nothing) are merged into their union, single-linkage, repeated until no two boxes are that close, so that a lesion
   drawn as a cloud of fragments becomes one box;
3. merged boxes whose longer side is below ``min_size`` pixels are dropped (they are invisible at the
   resolution the detector sees; they are counted, never silently: see :class:`ComponentBoxes`).

Example:
    >>> import numpy as np
    >>> m = np.zeros((40, 60), bool); m[5:10, 5:10] = True; m[5:10, 12:15] = True; m[30:32, 50:52] = True
    >>> component_boxes(m, merge_gap=3, min_size=4).boxes.tolist()
    [[5.0, 5.0, 15.0, 10.0]]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from ..errors import VisionFMError

__all__ = ["DetectionRecord", "EmptyMaskError", "BoxError", "ComponentBoxes", "mask_box", "component_boxes",
           "merge_close_boxes", "point_box", "check_boxes", "scale_boxes", "flip_boxes"]


class EmptyMaskError(VisionFMError, ValueError):
    """A mask that must show a structure (the optic disc) has no foreground pixel."""


class BoxError(VisionFMError, ValueError):
    """A box that is degenerate or lies outside its image; the message names the source."""


@dataclass
class DetectionRecord:
    """One image with its boxes, at the original resolution.

    Attributes:
        name: Image identifier (unique within the dataset).
        image: Image file.
        width, height: Original image size in pixels.
        boxes: ``(N, 4)`` float32 ``x1, y1, x2, y2``.
        labels: ``(N,)`` int64 class indices into the dataset's class list.
        ignore: ``(N,)`` bool; ignored boxes (COCO ``iscrowd``) neither count as misses nor as targets.
        point: The true point ``(x, y)`` for the point-localisation metric (optic-disc / fovea centre), if any.
        disc_diameter: Optic-disc diameter in pixels for the 1/8-disc-diameter criterion, if known.
        source: Where the annotations come from (for error messages).
    """

    name: str
    image: Path
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    ignore: np.ndarray = field(default=None)  # type: ignore[assignment]
    point: Optional[Tuple[float, float]] = None
    disc_diameter: Optional[float] = None
    source: str = ""

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if self.ignore is None:
            self.ignore = np.zeros(len(self.labels), dtype=bool)
        self.ignore = np.asarray(self.ignore, dtype=bool).reshape(-1)
        if not (len(self.boxes) == len(self.labels) == len(self.ignore)):
            raise ValueError(f"{self.source or self.name}: {len(self.boxes)} boxes, {len(self.labels)} labels and "
                             f"{len(self.ignore)} ignore flags do not match")


@dataclass
class ComponentBoxes:
    """Boxes derived from one mask, with what was merged and dropped (for the log and the tests)."""

    boxes: np.ndarray
    components: int  # connected components before merging
    merged: int  # boxes after merging, before the size filter
    dropped: int  # merged boxes below the minimum size


def mask_box(mask: np.ndarray, source: str = "mask") -> np.ndarray:
    """The box around all foreground pixels of a binary mask (one structure, e.g. the optic disc).

    Raises:
        EmptyMaskError: the mask has no foreground pixel.
    """
    mask = np.asarray(mask).astype(bool, copy=False)
    if mask.ndim != 2:
        raise ValueError(f"{source}: expected a 2-D mask, got shape {mask.shape}")
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise EmptyMaskError(f"{source}: mask is empty (no foreground pixel); the structure must be drawn")
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.float32)


def _gaps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Chebyshev gap between every box of ``a`` and every box of ``b`` (0 when they touch or overlap)."""
    gx = np.maximum(a[:, None, 0], b[None, :, 0]) - np.minimum(a[:, None, 2], b[None, :, 2])
    gy = np.maximum(a[:, None, 1], b[None, :, 1]) - np.minimum(a[:, None, 3], b[None, :, 3])
    return np.maximum(np.maximum(gx, gy), 0.0)


def merge_close_boxes(boxes: np.ndarray, merge_gap: float, chunk: int = 1024) -> np.ndarray:
    """Single-linkage merge of boxes closer than ``merge_gap`` pixels into their unions, until stable."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if merge_gap < 0:
        raise ValueError(f"merge_gap must be >= 0, got {merge_gap}")
    while merge_gap > 0 and len(boxes) > 1:
        rows, cols = [], []
        for start in range(0, len(boxes), chunk):  # chunks bound the memory of the pairwise gaps
            close = _gaps(boxes[start:start + chunk], boxes) < merge_gap
            r, c = np.nonzero(close)
            rows.append(r + start)
            cols.append(c)
        r, c = np.concatenate(rows), np.concatenate(cols)
        graph = coo_matrix((np.ones(len(r), dtype=np.int8), (r, c)), shape=(len(boxes), len(boxes)))
        count, cluster = connected_components(graph, directed=False)
        if count == len(boxes):
            break
        merged = np.empty((count, 4))
        merged[:, :2] = np.inf
        merged[:, 2:] = -np.inf
        np.minimum.at(merged[:, 0], cluster, boxes[:, 0])
        np.minimum.at(merged[:, 1], cluster, boxes[:, 1])
        np.maximum.at(merged[:, 2], cluster, boxes[:, 2])
        np.maximum.at(merged[:, 3], cluster, boxes[:, 3])
        boxes = merged
    return boxes.astype(np.float32)


def component_boxes(mask: np.ndarray, merge_gap: float = 0.0, min_size: float = 0.0) -> ComponentBoxes:
    """Boxes of the 8-connected components of a binary mask, merged and filtered as the module doc states.

    An empty mask gives no boxes (a lesion type that is absent from the image).
    """
    mask = np.asarray(mask).astype(bool, copy=False)
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {mask.shape}")
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    slices = ndimage.find_objects(labels)
    boxes = np.array([[s[1].start, s[0].start, s[1].stop, s[0].stop] for s in slices if s is not None],
                     dtype=np.float32).reshape(-1, 4)
    merged = merge_close_boxes(boxes, merge_gap)
    longer = np.maximum(merged[:, 2] - merged[:, 0], merged[:, 3] - merged[:, 1])
    keep = longer >= min_size
    order = np.lexsort((merged[keep, 0], merged[keep, 1]))  # deterministic order: top to bottom, left to right
    return ComponentBoxes(merged[keep][order], int(count), int(len(merged)), int((~keep).sum()))


def point_box(x: float, y: float, size: float, width: int, height: int, source: str = "point") -> np.ndarray:
    """A ``size`` x ``size`` box centred on a point, clipped to the image.

    Raises:
        BoxError: the point is outside the image or ``size`` is not positive.
    """
    if size <= 0:
        raise BoxError(f"{source}: box size must be positive, got {size}")
    if not (0 <= x <= width and 0 <= y <= height):
        raise BoxError(f"{source}: point ({x}, {y}) lies outside the {width}x{height} image")
    half = size / 2.0
    return np.array([max(0.0, x - half), max(0.0, y - half), min(float(width), x + half),
                     min(float(height), y + half)], dtype=np.float32)


def check_boxes(boxes: np.ndarray, width: int, height: int, source: str, tolerance: float = 1.0) -> np.ndarray:
    """Validate boxes against their image: clip coordinates that overshoot by at most ``tolerance`` pixels
    (rounding in annotation tools), and reject anything else.

    Raises:
        BoxError: a box with ``x2 <= x1`` or ``y2 <= y1``, a non-finite coordinate, or a box reaching more
            than ``tolerance`` pixels outside the image; the message names the source and the box.
    """
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    for i, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
        if not np.all(np.isfinite([x1, y1, x2, y2])):
            raise BoxError(f"{source}: box {i} {[x1, y1, x2, y2]} has a non-finite coordinate")
        if x2 <= x1 or y2 <= y1:
            raise BoxError(f"{source}: box {i} {[x1, y1, x2, y2]} is empty (x2 <= x1 or y2 <= y1)")
        if x1 < -tolerance or y1 < -tolerance or x2 > width + tolerance or y2 > height + tolerance:
            raise BoxError(f"{source}: box {i} {[x1, y1, x2, y2]} lies outside the {width}x{height} image")
    out = boxes.copy()
    out[:, 0::2] = out[:, 0::2].clip(0, width)
    out[:, 1::2] = out[:, 1::2].clip(0, height)
    return out


def scale_boxes(boxes: np.ndarray, scale: Sequence[float]) -> np.ndarray:
    """Scale boxes by ``(sx, sy)`` (resizing an image by those factors)."""
    sx, sy = scale
    return (np.asarray(boxes, dtype=np.float32).reshape(-1, 4) * np.array([sx, sy, sx, sy], np.float32))


def flip_boxes(boxes: np.ndarray, width: float) -> np.ndarray:
    """Mirror boxes horizontally in an image ``width`` pixels wide."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    out = boxes.copy()
    out[:, 0] = width - boxes[:, 2]
    out[:, 2] = width - boxes[:, 0]
    return out


def crop_boxes(boxes: np.ndarray, window: Sequence[float], min_visible: float = 0.5) -> Tuple[np.ndarray, np.ndarray]:
    """Boxes in the coordinates of a crop ``window = (x0, y0, x1, y1)``.

    Each box is shifted to the window's origin and clipped to it; a box keeps at least ``min_visible`` of its
    area inside the window or is dropped (a sliver of a lesion at the crop's edge is not a lesion to find).

    Returns:
        The kept boxes ``(M, 4)`` and the boolean mask ``(N,)`` of which input boxes they are.
    """
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    x0, y0, x1, y1 = (float(v) for v in window)
    clipped = boxes - np.array([x0, y0, x0, y0], np.float32)
    clipped[:, 0::2] = clipped[:, 0::2].clip(0, x1 - x0)
    clipped[:, 1::2] = clipped[:, 1::2].clip(0, y1 - y0)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    inside = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
    keep = (inside > 0) & (inside >= min_visible * area)
    return clipped[keep], keep

"""Any COCO-format detection set: an annotation json (``images``, ``annotations``, ``categories``) and a folder
of images.

Categories become classes ``0..K-1`` in the order of their ids; boxes (``[x, y, w, h]``) become ``x1, y1, x2,
y2``; ``iscrowd`` boxes are kept as ignored boxes. Every listed image must exist, every annotation must name a
listed image and category, and a box reaching more than one pixel outside its image is an error (naming the
json, the annotation id and the image), never clipped away silently. Images without annotations are kept as
negatives.

Example:
    >>> records, classes = load_coco("train.json", "images/")  # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from ...errors import VisionFMError
from ..boxes import DetectionRecord, check_boxes
from ..io import check_image

__all__ = ["CocoFormatError", "load_coco"]


class CocoFormatError(VisionFMError, ValueError):
    """An annotation file that is not usable COCO; the message names the file and the entry."""


def _require(cond: bool, path: Path, message: str) -> None:
    if not cond:
        raise CocoFormatError(f"{path}: {message}")


def load_coco(ann_file: "str | Path", image_dir: "str | Path", limit: Optional[int] = None,
              classes: Optional[Tuple[str, ...]] = None) -> Tuple[List[DetectionRecord], Tuple[str, ...]]:
    """Read a COCO json into :class:`DetectionRecord` s (original resolution) and the class names.

    Args:
        ann_file: The annotation json.
        image_dir: Folder the images' ``file_name`` s are relative to.
        limit: At most this many images (in the json's order).
        classes: Expected class names (e.g. those of the training json when reading a validation json); a
            different category list is an error.

    Raises:
        FileNotFoundError: the json, the image folder or a listed image is missing.
        CocoFormatError / BoxError: malformed entries, naming the file and the entry.
    """
    ann_file, image_dir = Path(ann_file), Path(image_dir)
    if not ann_file.is_file():
        raise FileNotFoundError(f"COCO annotation file not found: {ann_file}")
    if not image_dir.is_dir():
        raise FileNotFoundError(f"COCO image folder not found: {image_dir} (for {ann_file})")
    try:
        data = json.loads(ann_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CocoFormatError(f"{ann_file}: not valid JSON: {err}") from None
    _require(isinstance(data, dict) and all(k in data for k in ("images", "annotations", "categories")),
             ann_file, "needs top-level 'images', 'annotations' and 'categories'")
    cats = sorted(data["categories"], key=lambda c: c.get("id", -1) if isinstance(c, dict) else -1)
    _require(len(cats) > 0, ann_file, "no categories")
    for c in cats:
        _require(isinstance(c, dict) and "id" in c and "name" in c, ann_file, f"category {c!r} needs 'id' and 'name'")
    names = tuple(str(c["name"]) for c in cats)
    _require(len(set(c["id"] for c in cats)) == len(cats), ann_file, "duplicate category ids")
    if classes is not None and tuple(classes) != names:
        raise CocoFormatError(f"{ann_file}: categories {list(names)} differ from the training set's {list(classes)}")
    cat_index = {c["id"]: i for i, c in enumerate(cats)}

    images: Dict[int, dict] = {}
    for img in data["images"]:
        _require(isinstance(img, dict) and all(k in img for k in ("id", "file_name")), ann_file,
                 f"image entry {img!r} needs 'id' and 'file_name'")
        _require(img["id"] not in images, ann_file, f"duplicate image id {img['id']}")
        images[img["id"]] = img
    per_image: Dict[int, list] = {i: [] for i in images}
    for ann in data["annotations"]:
        _require(isinstance(ann, dict) and all(k in ann for k in ("image_id", "category_id", "bbox")), ann_file,
                 f"annotation {ann.get('id') if isinstance(ann, dict) else ann!r} needs image_id, category_id, bbox")
        _require(ann["image_id"] in images, ann_file, f"annotation {ann.get('id')} refers to unknown image "
                                                      f"{ann['image_id']}")
        _require(ann["category_id"] in cat_index, ann_file, f"annotation {ann.get('id')} has unknown category "
                                                            f"{ann['category_id']}")
        _require(isinstance(ann["bbox"], (list, tuple)) and len(ann["bbox"]) == 4, ann_file,
                 f"annotation {ann.get('id')}: bbox must be [x, y, w, h], got {ann['bbox']!r}")
        per_image[ann["image_id"]].append(ann)

    records: List[DetectionRecord] = []
    for image_id, img in list(images.items())[:limit]:
        path = image_dir / img["file_name"]
        if not path.is_file():
            raise FileNotFoundError(f"{ann_file}: image {img['file_name']!r} (id {image_id}) not found: {path}")
        width, height = check_image(path)
        if ("width" in img and int(img["width"]) != width) or ("height" in img and int(img["height"]) != height):
            raise CocoFormatError(f"{ann_file}: image {img['file_name']!r} is {width}x{height} but the json says "
                                  f"{img.get('width')}x{img.get('height')}")
        anns = per_image[image_id]
        boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                          for a in anns], dtype=np.float32).reshape(-1, 4)
        for i, (a, box) in enumerate(zip(anns, boxes)):
            boxes[i] = check_boxes(box[None], width, height,
                                   source=f"{ann_file}: annotation {a.get('id')} of {path.name}")[0]
        records.append(DetectionRecord(
            str(img["file_name"]), path, width, height, boxes,
            np.array([cat_index[a["category_id"]] for a in anns], np.int64),
            np.array([bool(a.get("iscrowd", 0)) for a in anns], bool), source=f"{ann_file} ({img['file_name']})"))
    _require(len(records) > 0, ann_file, "no images")
    return records, names

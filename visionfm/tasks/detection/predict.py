"""``downstream/det.py predict``: boxes with scores for every image of a folder, with a trained ``best.pth``.

Each image is resized as the validation images were in training (longer side ``data.max_size``); the boxes are
mapped back to the image's own resolution by mmdet (``rescale=True``). Outputs: ``boxes.csv`` (one row per box),
``boxes.json`` (per image), and ``<name>.png`` per image with the boxes drawn on the resized image.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from ...inference import StagedOutput, load_task_checkpoint, prepare_inputs, write_csv
from ...inference.checkpoints import WrongCheckpointError
from ...modalities import get_modality
from ...data.boxes import DetectionRecord

__all__ = ["predict_folder"]

log = logging.getLogger("visionfm.det")


def _load(checkpoint: Path) -> Dict[str, Any]:
    ckpt = load_task_checkpoint(checkpoint, "detection")
    if not isinstance(ckpt.get("config"), dict) or not ckpt.get("classes"):
        raise WrongCheckpointError(f"{checkpoint}: a detection checkpoint without its config or class names; use "
                                   f"the best.pth that downstream/det.py writes")
    return ckpt


def predict_folder(checkpoint: "str | os.PathLike", images_source: "str | os.PathLike", output: "str | os.PathLike",
                   device: "torch.device | str" = "cpu", limit: Optional[int] = None, skip_corrupt: bool = False,
                   recursive: bool = False, score_thr: Optional[float] = None, batch_size: int = 2) -> Dict[str, Any]:
    """Detect objects in every image of a folder or CSV and write ``boxes.csv``, ``boxes.json`` and PNGs.

    Args:
        score_thr: Boxes kept in the files and drawn (default: the checkpoint's ``eval.draw_score_thr``). For a
            point target (optic disc, fovea) the top box of each image is always kept.

    Returns:
        A summary: images, boxes kept, output folder.
    """
    checkpoint = Path(checkpoint)
    ckpt = _load(checkpoint)  # a wrong file is refused before mmdet is even imported
    from .dataset import DetectionDataset  # noqa: PLC0415
    from .evaluation import draw_predictions, predict  # noqa: PLC0415
    from .cli import upgrade_legacy_config  # noqa: PLC0415
    from .runner import build_detector  # noqa: PLC0415

    cfg = upgrade_legacy_config(ckpt["config"])  # checkpoints of earlier versions have model.modality, dataset.name
    classes = tuple(ckpt["classes"])
    modality = get_modality(cfg["modality"])
    max_size = int(cfg["data"]["max_size"])
    crop = cfg["data"].get("crop_size")
    images = prepare_inputs(images_source, modality.name, 16, limit=limit, recursive=recursive,
                            skip_corrupt=skip_corrupt,
                            large=f"resized to a longer side of {max_size} px as in training; boxes are mapped back to "
                                  f"the full resolution")
    threshold = float(cfg["eval"].get("draw_score_thr", 0.3) if score_thr is None else score_thr)
    point_target = str(cfg.get("dataset", "")).lower() == "idrid" and cfg.get("target") in ("od", "fovea")
    # Built as in training (same input size for the position embedding), then the trained weights replace all.
    model, info, _ = build_detector(cfg, classes, img_size=min(max_size, int(crop or max_size)) // 16 * 16)
    state = ckpt["model"]
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    shapes = [k for k in set(state) & set(expected) if state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        raise WrongCheckpointError(f"{checkpoint}: its weights do not fit the detector its config describes "
                                   f"({cfg['model'].get('detector')} on a {info.arch} encoder): missing "
                                   f"{missing[:4] or 'none'}, unexpected {unexpected[:4] or 'none'}, shapes "
                                   f"{sorted(shapes)[:4] or 'none'}")
    model.load_state_dict(state, strict=True)
    model.to(device).eval()
    records = [DetectionRecord(name=im.name, image=im.path, width=im.width, height=im.height,
                               boxes=np.zeros((0, 4), np.float32), labels=np.zeros(0, np.int64), source=str(im.path))
               for im in images]
    dataset = DetectionDataset(records, classes, modality.channels, max_size, train=False, cache=False)
    predictions = predict(model, dataset, batch_size)
    rows: List[list] = []
    per_image: List[Dict[str, Any]] = []
    kept_total = 0
    with StagedOutput(output) as out:
        for index, (im, pred) in enumerate(zip(images, predictions)):
            scores = pred["scores"]
            keep = scores >= threshold
            if point_target and len(scores):
                keep[int(np.argmax(scores))] = True
            order = np.argsort(-scores[keep], kind="stable")
            boxes, kept_scores, labels = pred["bboxes"][keep][order], scores[keep][order], pred["labels"][keep][order]
            kept_total += len(kept_scores)
            entry = {"path": str(im.path), "name": im.name, "width": im.width, "height": im.height, "boxes": []}
            for box, score, label in zip(boxes, kept_scores, labels):
                x1, y1, x2, y2 = (float(v) for v in box)
                rows.append([str(im.path), im.name, classes[int(label)], float(score), x1, y1, x2, y2])
                entry["boxes"].append({"class": classes[int(label)], "score": round(float(score), 6),
                                       "box": [round(v, 2) for v in (x1, y1, x2, y2)]})
            per_image.append(entry)
            draw_predictions(dataset, index, pred, out.path(f"{im.name}.png"), threshold, always_top=point_target)
        write_csv(out.path("boxes.csv"), ["path", "name", "class", "score", "x1", "y1", "x2", "y2"], rows)
        out.path("boxes.json").write_text(json.dumps({"checkpoint": str(checkpoint), "classes": list(classes),
                                                      "score_thr": threshold, "images": per_image}, indent=2))
    log.info("%d image(s): %d box(es) with score >= %.2f%s", len(images), kept_total, threshold,
             " (and the top box of each image)" if point_target else "")
    return {"images": len(images), "boxes": kept_total, "output": str(output)}

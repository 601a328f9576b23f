"""Whole-split evaluation: predictions at the original resolution, COCO mAP / AP50 / AP75 through mmdet's
``CocoMetric`` (ground truth converted in memory from the records), the point-localisation metric, and PNGs
of predicted and true boxes.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from mmdet.evaluation import CocoMetric
from mmengine.dataset import pseudo_collate
from PIL import Image, ImageDraw

from ...engine.precision import autocast
from .dataset import DetectionDataset
from .points import point_metrics, top_box_centre

__all__ = ["Prediction", "predict", "coco_metrics", "evaluate", "draw_predictions"]

log = logging.getLogger(__name__)


class Prediction(dict):
    """``bboxes`` ``(N, 4)`` at the original resolution, ``scores`` ``(N,)``, ``labels`` ``(N,)`` (numpy)."""


@torch.no_grad()
def predict(model: torch.nn.Module, dataset: DetectionDataset, batch_size: int = 4,
            amp_dtype: Optional[torch.dtype] = None) -> List[Prediction]:
    """Run the detector over a dataset (no augmentation) and return one :class:`Prediction` per record."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: List[Prediction] = []
    try:
        for start in range(0, len(dataset), batch_size):
            batch = pseudo_collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            with autocast(device, amp_dtype):
                data = model.data_preprocessor(batch, training=False)
                results = model(**data, mode="predict")  # rescale=True: boxes at ori_shape
            for res in results:
                pred = res.pred_instances
                out.append(Prediction(bboxes=pred.bboxes.float().cpu().numpy().reshape(-1, 4),
                                      scores=pred.scores.float().cpu().numpy().reshape(-1),
                                      labels=pred.labels.cpu().numpy().reshape(-1)))
    finally:
        model.train(was_training)
    return out


def coco_metrics(dataset: DetectionDataset, predictions: Sequence[Prediction], classwise: bool = False) -> Dict[str, float]:
    """COCO box metrics of predictions against the dataset's boxes, with mmdet's ``CocoMetric``.

    Returns ``map``, ``ap50``, ``ap75``, ``map_s``, ``map_m``, ``map_l`` (and ``ap_<class>`` with
    ``classwise``). A split without any prediction scores 0 (pycocotools cannot load an empty result list).
    """
    if len(predictions) != len(dataset):
        raise ValueError(f"{len(predictions)} predictions for {len(dataset)} images")
    metric = CocoMetric(metric="bbox", classwise=classwise)  # a fresh one: CocoMetric caches its ground truth
    metric.dataset_meta = dict(classes=dataset.classes)
    samples = []
    for index, (rec, pred) in enumerate(zip(dataset.records, predictions)):
        samples.append(dict(
            img_id=index, ori_shape=(rec.height, rec.width),
            instances=[dict(bbox=b.tolist(), bbox_label=int(lab), ignore_flag=int(ign))
                       for b, lab, ign in zip(rec.boxes, rec.labels, rec.ignore)],
            pred_instances=dict(bboxes=torch.as_tensor(pred["bboxes"]), scores=torch.as_tensor(pred["scores"]),
                                labels=torch.as_tensor(pred["labels"]))))
    metric.process({}, samples)
    names = {"map": "bbox_mAP", "ap50": "bbox_mAP_50", "ap75": "bbox_mAP_75", "map_s": "bbox_mAP_s",
             "map_m": "bbox_mAP_m", "map_l": "bbox_mAP_l"}
    if sum(len(p["scores"]) for p in predictions) == 0:
        out = {key: 0.0 for key in names}
        out.update({f"ap_{c}": 0.0 for c in dataset.classes} if classwise else {})
        return out
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # pycocotools prints its summary table
        raw = metric.compute_metrics(metric.results)
    log.debug("COCO evaluation:\n%s", printed.getvalue())
    out = {key: float(raw[name]) for key, name in names.items()}
    if classwise:
        for c in dataset.classes:
            out[f"ap_{c}"] = float(raw[f"{c}_precision"])  # mmdet's per-class key (the classwise mAP)
    return out


def evaluate(model: torch.nn.Module, dataset: DetectionDataset, batch_size: int = 4,
             amp_dtype: Optional[torch.dtype] = None, classwise: bool = False,
             point_label: Optional[int] = None) -> tuple:
    """Predict and score a split. Returns ``(metrics, predictions)``; the point metrics (for datasets whose
    records carry true points) use the top box of class ``point_label`` (default 0)."""
    predictions = predict(model, dataset, batch_size, amp_dtype)
    metrics = coco_metrics(dataset, predictions, classwise)
    truth = dataset.point_truth()
    if truth is not None:
        label = 0 if point_label is None else point_label
        centres = [top_box_centre(p["bboxes"], p["scores"], p["labels"], label) for p in predictions]
        metrics.update(point_metrics(centres, truth, [r.disc_diameter for r in dataset.records],
                                     [(r.width, r.height) for r in dataset.records]))
    return metrics, predictions


def draw_predictions(dataset: DetectionDataset, index: int, prediction: Prediction, path: "str | Path",
                     score_thr: float = 0.3, always_top: bool = False) -> None:
    """Write a PNG of the (resized) image with true boxes in green and predicted boxes (score >= ``score_thr``,
    plus the top one with ``always_top``) in red, scores written next to them."""
    image, (sx, sy) = dataset.image(index)
    rec = dataset.records[index]
    canvas = Image.fromarray(image).convert("RGB")
    draw = ImageDraw.Draw(canvas)
    scale = np.array([sx, sy, sx, sy])
    width = max(1, round(max(canvas.size) / 256))
    for box, label in zip(rec.boxes, rec.labels):
        draw.rectangle((box * scale).tolist(), outline=(0, 255, 0), width=width)
    scores = prediction["scores"]
    keep = scores >= score_thr
    if always_top and len(scores):
        keep[int(np.argmax(scores))] = True
    for box, score, label in zip(prediction["bboxes"][keep], scores[keep], prediction["labels"][keep]):
        x1, y1, x2, y2 = (box * scale).tolist()
        draw.rectangle((x1, y1, x2, y2), outline=(255, 0, 0), width=width)
        draw.text((x1 + 2, max(0.0, y1 - 11)), f"{dataset.classes[int(label)][:12]} {score:.2f}", fill=(255, 0, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)

"""Zero-shot classification and retrieval evaluation over whole splits.

- :func:`zero_shot_metrics`: accuracy, balanced accuracy, AUROC (macro one-vs-rest; for two classes the positive
  class's, which is the same number) from :mod:`visionfm.metrics`, over every image of a split at once.
- :func:`recall_at_k` / :func:`chance_recall_at_k`: Recall@K of a similarity matrix against a relevance matrix, and
  its expectation under a random ranking.
- :func:`image_text_retrieval`: image->text and text->image Recall@K with texts built from the classes' prompts (a
  retrieved item is relevant when it has the query's class) or, for captioned data, the captions themselves.
- :func:`cross_modal_retrieval`: OCT<->fundus Recall@K where the relevant images are those of the same eye (and,
  separately, of the same patient).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from ...data.unlabeled import DataError
from ...metrics import classification_metrics, to_jsonable
from ...models.clip import CLIPModel
from .data import CaptionedImage, csv_records, oct_dme_records, stratified_limit
from ...data.knowledge import KnowledgeBase

__all__ = ["EVAL_DATASETS", "evaluation_records", "zero_shot_metrics", "recall_at_k", "chance_recall_at_k",
           "image_text_retrieval", "cross_modal_retrieval", "DEFAULT_KS", "write_metrics"]

DEFAULT_KS = (1, 5, 10)
#: Built-in evaluation datasets: the label each image gets and the number of classes.
EVAL_DATASETS = {"OCT_DME": "DME yes/no (0 = no DME, 1 = DME) of the OCT/fundus set; 2 classes",
                 "OCT_DR": "DR grade (0 = none, 1 = NPDR, 2 = PDR) of the graded OCT/fundus images; 3 classes",
                 "CSV": "a .csv file with columns path and label (a class name given in --classes, or its index)"}


def evaluation_records(dataset: str, modality: str, split: str, data_root: "str | os.PathLike",
                       classes: Sequence[str], limit: Optional[int] = None, seed: int = 0) -> List[CaptionedImage]:
    """Labelled records of an evaluation dataset (see :data:`EVAL_DATASETS`) whose ``label`` indexes ``classes``.

    Raises:
        DataError: unknown dataset, wrong number of classes, labels that are not among the classes.
    """
    from dataclasses import replace  # noqa: PLC0415

    name = dataset.upper()
    if name in ("OCT_DME", "OCT_DR"):
        need = 2 if name == "OCT_DME" else 3
        if len(classes) != need:
            raise DataError(f"{name} has {need} classes ({EVAL_DATASETS[name]}); --classes gave {len(classes)}: "
                            f"{list(classes)}")
        records = oct_dme_records(data_root, modality, split, labels=("dme", "dr"), seed=seed)
        if name == "OCT_DR":
            from .data import DR_CATEGORIES  # noqa: PLC0415

            order = {v: k for k, v in DR_CATEGORIES.items()}
            records = [replace(r, label=next(order[c] for c in r.categories if c in order))
                       for r in records if any(c in order for c in r.categories)]
    elif dataset.lower().endswith(".csv"):
        kb = KnowledgeBase({"default": ["[CLS]"]}, {}, "<csv labels>")
        raw = csv_records(dataset, modality, split, kb, default_split=split)
        names = [c.lower() for c in classes]
        records = []
        for r in raw:
            label_text = (r.categories[0] if r.categories else r.caption or "").strip()
            if label_text.isdigit() and int(label_text) < len(classes):
                label = int(label_text)
            elif label_text.lower() in names:
                label = names.index(label_text.lower())
            else:
                raise DataError(f"{dataset}: label {label_text!r} of {r.path} is neither one of --classes {list(classes)} "
                                "nor a class index")
            records.append(replace(r, label=label))
    else:
        raise DataError(f"unknown dataset {dataset!r}: use OCT_DME, OCT_DR or a .csv file")
    if not records:
        raise DataError(f"{dataset}: no labelled {modality} images in split {split!r}")
    return stratified_limit(records, limit)


def zero_shot_metrics(model: CLIPModel, images: Any, labels: Sequence[int], class_texts: Sequence[Any],
                      batch_size: int = 32, expand: bool = True) -> Dict[str, Any]:
    """Zero-shot predictions of a whole split and their metrics (JSON-ready; undefined values are ``None``)."""
    probs, _ = model.zero_shot(images, class_texts, batch_size=batch_size, expand=expand)
    y = np.asarray(labels, dtype=np.int64)
    metrics = classification_metrics(y, probs.numpy().astype(np.float64), "multiclass", per_class=True)
    per_class_auroc = [c["auroc"] for c in metrics["per_class"]]
    finite = [a for a in per_class_auroc if not math.isnan(a)]
    metrics["macro_auroc"] = float(np.mean(finite)) if finite else math.nan
    metrics["chance_accuracy"] = float(np.bincount(y, minlength=probs.shape[1]).max() / len(y))
    for c, entry in enumerate(metrics["per_class"]):
        entry["name"] = class_texts[c] if isinstance(class_texts[c], str) else f"class {c}"
    out = to_jsonable(metrics)
    out["probs"] = probs.numpy().round(6).tolist()
    return out


def recall_at_k(similarity: Tensor, relevant: Tensor, ks: Sequence[int] = DEFAULT_KS) -> Dict[str, Optional[float]]:
    """Fraction of queries (rows with at least one relevant item) that have a relevant item among their ``k`` most
    similar gallery items. Ties are broken by gallery order (stable sort)."""
    if similarity.shape != relevant.shape:
        raise ValueError(f"similarity {tuple(similarity.shape)} and relevance {tuple(relevant.shape)} differ in shape")
    rows = relevant.any(1)
    if not rows.any():
        return {f"R@{k}": None for k in ks}
    order = torch.sort(similarity[rows].float(), dim=1, descending=True, stable=True).indices
    hits = torch.gather(relevant[rows], 1, order)
    first = torch.where(hits.any(1), hits.float().argmax(1), torch.full((hits.shape[0],), hits.shape[1]))
    return {f"R@{k}": float((first < k).float().mean()) for k in ks}


def chance_recall_at_k(relevant: Tensor, ks: Sequence[int] = DEFAULT_KS) -> Dict[str, Optional[float]]:
    """Expected :func:`recall_at_k` of a random ranking: per query ``1 - C(G - r, k) / C(G, k)``."""
    rows = relevant[relevant.any(1)]
    if rows.shape[0] == 0:
        return {f"R@{k}": None for k in ks}
    g = rows.shape[1]
    counts = rows.sum(1).tolist()
    out = {}
    for k in ks:
        kk = min(k, g)
        out[f"R@{k}"] = float(np.mean([1.0 - math.comb(g - r, kk) / math.comb(g, kk) for r in counts]))
    return out


def _retrieval_block(sim: Tensor, relevant: Tensor, ks: Sequence[int]) -> Dict[str, Any]:
    return {"recall": recall_at_k(sim, relevant, ks), "chance": chance_recall_at_k(relevant, ks),
            "queries": int(relevant.any(1).sum()), "gallery": int(relevant.shape[1])}


def image_text_retrieval(model: CLIPModel, images: Any, records: Sequence[CaptionedImage],
                         class_texts: Optional[Sequence[str]] = None, ks: Sequence[int] = DEFAULT_KS,
                         batch_size: int = 32) -> Dict[str, Any]:
    """Image->text and text->image Recall@K.

    With ``class_texts`` (one per label index) the text gallery is every prompt of every class present (templates x
    names x descriptions, as zero-shot uses them) and an item is relevant when its class is the query's. Otherwise
    the records' captions are the texts and an image's relevant texts are its own caption (identical captions count).
    """
    image_emb = model.embed_images(images, batch_size)
    if class_texts is not None:
        labels = [r.label for r in records]
        if any(label is None for label in labels):
            raise DataError("class-level retrieval needs a label on every image")
        prompts = model.class_prompts(list(class_texts))
        texts, text_labels = [], []
        for c, group in enumerate(prompts):
            if c in labels:
                texts += group
                text_labels += [c] * len(group)
        relevant = torch.tensor(labels)[:, None] == torch.tensor(text_labels)[None, :]
        mode = "class"
    else:
        captions = [r.caption for r in records]
        if any(c is None for c in captions):
            raise DataError("caption retrieval needs a caption on every image (or pass the class names)")
        texts = list(dict.fromkeys(captions))
        relevant = torch.tensor([[c == t for t in texts] for c in captions])
        mode = "caption"
    text_emb = model.embed_texts(texts)
    sim = image_emb @ text_emb.t()
    return {"mode": mode, "texts": len(texts), "image_to_text": _retrieval_block(sim, relevant, ks),
            "text_to_image": _retrieval_block(sim.t(), relevant.t(), ks)}


def cross_modal_retrieval(model_a: CLIPModel, images_a: Any, records_a: Sequence[CaptionedImage],
                          model_b: CLIPModel, images_b: Any, records_b: Sequence[CaptionedImage],
                          ks: Sequence[int] = DEFAULT_KS, batch_size: int = 32) -> Dict[str, Any]:
    """Recall@K between two modalities' images (both directions); relevant = same eye (``pair_key``) and, as a second
    criterion, same patient. Only queries with at least one relevant image in the other modality count."""
    emb_a = model_a.embed_images(images_a, batch_size)
    emb_b = model_b.embed_images(images_b, batch_size)
    sim = emb_a @ emb_b.t()
    a, b = model_a.modality.name, model_b.modality.name
    out: Dict[str, Any] = {}
    for criterion, key in (("same_eye", "pair_key"), ("same_patient", "patient")):
        ka = [getattr(r, key) for r in records_a]
        kb = [getattr(r, key) for r in records_b]
        relevant = torch.tensor([[x is not None and x == y for y in kb] for x in ka])
        out[criterion] = {f"{a}->{b}": _retrieval_block(sim, relevant, ks),
                          f"{b}->{a}": _retrieval_block(sim.t(), relevant.t(), ks)}
    joint = model_a.metadata.get("paired_modality") == b and model_b.metadata.get("paired_modality") == a
    shared = all(torch.equal(x, y) for x, y in zip(model_a.text_proj.state_dict().values(),
                                                    model_b.text_proj.state_dict().values()))
    out["jointly_trained"] = bool(joint and shared)
    return out


def write_metrics(metrics: Dict[str, Any], output: "str | os.PathLike") -> Path:
    """``<output>/metrics.json`` (atomically)."""
    import json  # noqa: PLC0415

    path = Path(output) / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(to_jsonable(metrics), indent=2) + "\n")
    os.replace(tmp, path)
    return path


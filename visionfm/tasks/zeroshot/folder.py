"""Zero-shot classification of an unlabelled folder with free-text class prompts.

Each class given on the command line is expanded into a prompt ensemble: the modality's templates filled with
the class text and, where the text names a category of the knowledge base (``configs/knowledge``), with all its
names and descriptions. Which classes were expanded from the knowledge base is logged.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from ...inference import StagedOutput, iter_batches, prepare_inputs, write_csv
from .data import load_pixels

__all__ = ["zeroshot_folder"]

log = logging.getLogger("visionfm.clip")


def zeroshot_folder(model, images_source: "str | os.PathLike", classes: Sequence[str], output: "str | os.PathLike",
                    expand: bool = True, batch_size: int = 32, limit: Optional[int] = None,
                    skip_corrupt: bool = False, recursive: bool = False) -> Dict[str, Any]:
    """Write ``<output>/predictions.csv`` (path, name, prediction, ``p_<class>``) for every image of a folder or
    CSV, with a loaded :class:`~visionfm.models.clip.CLIPModel`. Returns a summary."""
    info = model.image_info
    images = prepare_inputs(images_source, model.modality.name, info.patch_size, limit=limit, recursive=recursive,
                            skip_corrupt=skip_corrupt,
                            large=f"squared and resized to {info.img_size} px like the CLIP training images")
    knowledge = model._knowledge() if expand else None
    for name in classes:
        category = knowledge.find(name) if knowledge is not None else None
        if category is not None:
            log.info("class %r: prompts from the knowledge-base category %r (%d prompts)", name, category.key,
                     len(knowledge.class_prompts(name, model.modality.name)))
        else:
            log.info("class %r: %s", name, "templates with the text as given (not a knowledge-base category)"
                     if expand else "the text as the only prompt (--no-expand)")
    prototypes = model.class_prototypes(list(classes), expand)
    scale = float(model.logit_scale_value.item())
    probs: List[np.ndarray] = []
    for chunk in iter_batches(images, batch_size, "zero-shot"):
        # Decoded and resized one image at a time, so a batch of large photographs never sits in memory.
        pixels = load_pixels([im.path for im in chunk], model.modality.name, info.img_size)
        embeddings = model.embed_images(pixels, batch_size)
        with torch.no_grad():
            probs.append((scale * embeddings @ prototypes.t()).softmax(-1).numpy())
    table = np.concatenate(probs)
    predicted = [classes[int(i)] for i in table.argmax(axis=1)]
    labelled = any(im.label for im in images)
    header = ["path", "name"] + (["label"] if labelled else []) + ["prediction"] + [f"p_{c}" for c in classes]
    rows = [[str(im.path), im.name] + ([im.label or ""] if labelled else []) + [p] + [float(v) for v in row]
            for im, p, row in zip(images, predicted, table)]
    with StagedOutput(output) as out:
        write_csv(out.path("predictions.csv"), header, rows)
    counts = {c: predicted.count(c) for c in classes}
    log.info("zero-shot on %d image(s): %s", len(images), counts)
    return {"images": len(images), "classes": list(classes), "predicted": counts,
            "predictions": str(Path(output) / "predictions.csv")}

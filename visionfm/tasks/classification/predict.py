"""Apply a trained classifier (``model.pt`` of fine-tuning, or ``head.pt`` of a linear/MLP probe) to new images:
per-class probabilities and the predicted class of each image, and ``--eval-only`` on a dataset's test split.

The checkpoint carries everything needed: class names and label kind, the encoder's shape (read from the
fine-tuned weights themselves) or its weights file (probes), input size, pooling and normalisation, so a
checkpoint of another task or of an encoder architecture other than its own is refused with the file named.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from ...inference import StagedOutput, encoder_batch, iter_batches, load_task_checkpoint, prepare_inputs, write_csv
from ...inference.checkpoints import WrongCheckpointError
from ...modalities import get_modality
from ...weights.formats import build_encoder, infer_spec
from .features import pooled_features
from .finetune import EncoderClassifier
from .heads import Standardize, build_head
from .task import ClassificationTask

__all__ = ["LoadedClassifier", "load_classifier", "predict_probabilities", "predict_folder"]

log = logging.getLogger(__name__)


class _ProbeClassifier(nn.Module):
    """A frozen encoder's pooled features (of the last ``last_blocks`` blocks) through a probe head; with
    ``mirror_eval`` (a probe trained with ``eval.mirror``) the features are the mean of each image's and
    its left-right mirror's, as the probe was validated and tested."""

    def __init__(self, encoder: nn.Module, head: nn.Module, pool: str, last_blocks: int,
                 mirror_eval: bool = False) -> None:
        super().__init__()
        self.encoder, self.head, self.pool, self.last_blocks = encoder, head, pool, last_blocks
        self.mirror_eval = mirror_eval

    def forward(self, images: Tensor) -> Tensor:
        features = pooled_features(self.encoder, images, self.pool, self.last_blocks)
        if self.mirror_eval:
            features = (features + pooled_features(self.encoder, images.flip(-1), self.pool, self.last_blocks)) / 2
        return self.head(features)


class LoadedClassifier:
    """A classifier read from a checkpoint, with what its inputs must look like.

    Attributes:
        model: Normalised ``(B, 3, size, size)`` images to logits (eval mode).
        task: Label kind and class names.
        modality, img_size, mean, std: How images are read for it.
        source: The checkpoint file.
    """

    def __init__(self, model: nn.Module, task: ClassificationTask, modality: str, img_size: int,
                 mean: Sequence[float], std: Sequence[float], patch_size: int, source: Path) -> None:
        self.model, self.task, self.modality = model.eval(), task, modality
        self.img_size, self.mean, self.std, self.patch_size, self.source = img_size, mean, std, patch_size, source


def _head_layout(state: Dict[str, Tensor], where: str) -> Tuple[str, int, bool]:
    """``(head type, hidden width, has a Standardize first)`` read from a head's ``state_dict`` keys (``0.mean``:
    standardisation; two weight matrices: an MLP)."""
    standardize = "0.mean" in state
    matrices = sorted({int(m.group(1)) for k, v in state.items()
                       if (m := re.match(r"^(\d+)\.(?:linear\.)?weight$", k)) and v.ndim == 2})
    if not matrices:
        raise WrongCheckpointError(f"{where}: the classifier head holds no weight matrix (keys {sorted(state)[:6]})")
    if len(matrices) == 1:
        return "linear", 0, standardize
    return "mlp", int(state[f"{matrices[0]}.weight"].shape[0]), standardize


def _build_head(state: Dict[str, Tensor], task: ClassificationTask, in_dim: int, where: str,
                ckpt: Dict[str, Any]) -> nn.Module:
    kind, hidden, standardize = _head_layout(state, where)
    norm = Standardize(torch.zeros(in_dim), torch.ones(in_dim)) if standardize else None
    head = build_head(ckpt.get("head_type") or kind, in_dim, task, hidden or int(ckpt.get("hidden_dim") or 512),
                      float(ckpt.get("dropout") or 0.0), norm)
    _load_exactly(head, state, where, "classifier head")
    return head


def _load_exactly(module: nn.Module, state: Dict[str, Tensor], where: str, what: str) -> None:
    """Strict load with a one-line message naming the file when keys or shapes differ (another architecture)."""
    expected = module.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in sorted(set(state) & set(expected))
              if state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        raise WrongCheckpointError(f"{where}: the {what} does not match the architecture it was saved with: missing "
                                   f"{missing[:5] or 'none'}, unexpected {unexpected[:5] or 'none'}, shapes "
                                   f"{shapes[:3] or 'none'}")
    module.load_state_dict(state, strict=True)


def load_classifier(path: "str | os.PathLike", device: "torch.device | str" = "cpu") -> LoadedClassifier:
    """Rebuild the classifier of a ``model.pt`` (fine-tuning) or ``head.pt`` (probe) written by
    ``downstream/cls.py``.

    Raises:
        WrongCheckpointError: another task's checkpoint, a k-NN run, or weights that do not fit their own
            recorded architecture.
        UnsafeCheckpointError: a file that needs unpickling beyond tensors and plain containers.
    """
    path = Path(path)
    ckpt = load_task_checkpoint(path, "classification")
    task = ClassificationTask(str(ckpt["kind"]), tuple(ckpt["class_names"]))
    modality = get_modality(ckpt["modality"]).name
    pool = str(ckpt.get("pool", "cls"))
    mean = list(ckpt.get("mean") or get_modality(modality).mean)
    std = list(ckpt.get("std") or get_modality(modality).std)
    if "model" in ckpt:  # fine-tuned: the encoder's shape comes from its own weights
        state = ckpt["model"]
        enc_state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
        head_state = {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")}
        if not enc_state or not head_state:
            raise WrongCheckpointError(f"{path}: 'model' holds no encoder.* and head.* weights of a fine-tuned "
                                       f"classifier (keys {sorted(state)[:6]})")
        spec = infer_spec(enc_state, {"num_heads": ckpt.get("num_heads")} if ckpt.get("num_heads") else {},
                          where=str(path))
        encoder = build_encoder(spec)
        _load_exactly(encoder, {k: v.float() for k, v in enc_state.items()}, str(path), f"{spec.arch} encoder")
        width = encoder.embed_dim * (2 if pool == "cls+mean" else 1)
        model: nn.Module = EncoderClassifier(encoder, _build_head(head_state, task, width, str(path), ckpt), pool,
                                             mirror_eval=bool(ckpt.get("mirror_eval", False)))
        img_size, patch = int(ckpt.get("img_size") or spec.img_size), spec.patch_size
        log.info("%s: fine-tuned %s %s classifier, classes %s", path, modality, spec.arch, list(task.class_names))
    elif "head" in ckpt:  # probe: the frozen encoder is the weights file it was trained on
        from ...weights.loader import load_encoder  # noqa: PLC0415

        source = ckpt.get("encoder_source")
        if not source:
            raise WrongCheckpointError(f"{path}: a probe on a randomly initialised encoder cannot be applied to new "
                                       f"images (the encoder's weights were not kept); fine-tune instead")
        encoder, info = load_encoder(modality, weights=source, img_size=ckpt.get("img_size"))
        last_blocks = int(ckpt.get("last_blocks", 1))
        width = int(ckpt.get("feature_dim") or encoder.embed_dim * last_blocks * (2 if pool == "cls+mean" else 1))
        model = _ProbeClassifier(encoder, _build_head(ckpt["head"], task, width, str(path), ckpt), pool, last_blocks,
                                 bool(ckpt.get("mirror_eval", False)))
        img_size, patch = int(ckpt.get("img_size") or info.img_size), info.patch_size
        log.info("%s: probe on %s (%s), classes %s", path, source, info.arch, list(task.class_names))
    else:
        raise WrongCheckpointError(f"{path}: holds neither a fine-tuned model nor a probe head (a k-NN run keeps no "
                                   f"model: apply k-NN with downstream/cls.py --mode knn)")
    return LoadedClassifier(model.to(device), task, modality, img_size, mean, std, patch, path)


@torch.no_grad()
def predict_probabilities(classifier: LoadedClassifier, images, batch_size: int = 32,
                          device: "torch.device | str" = "cpu") -> np.ndarray:
    """``(N, C)`` class probabilities of checked input images (:class:`~visionfm.data.inputs.InputImage`)."""
    out: List[np.ndarray] = []
    for chunk in iter_batches(images, batch_size, "predict"):
        pixels = encoder_batch(chunk, classifier.modality, classifier.img_size, classifier.mean, classifier.std)
        logits = classifier.model(pixels.to(device)).float().cpu()
        out.append(classifier.task.probabilities(logits).numpy())
    return np.concatenate(out)


def predicted_names(task: ClassificationTask, probs: np.ndarray) -> List[str]:
    """The predicted class name of each row (multi-label: the predicted labels joined by ``;``)."""
    preds = task.predict(torch.from_numpy(probs)).numpy()
    if task.kind == "multilabel":
        return [";".join(n for n, on in zip(task.class_names, row) if on) for row in preds]
    return [task.class_names[int(p)] for p in preds]


def predict_folder(checkpoint: "str | os.PathLike", images_source: "str | os.PathLike", output: "str | os.PathLike",
                   device: "torch.device | str" = "cpu", limit: Optional[int] = None, skip_corrupt: bool = False,
                   recursive: bool = False, batch_size: int = 32) -> Path:
    """Write ``<output>/predictions.csv`` (path, name, prediction, ``p_<class>`` per class) for every image of a
    folder or CSV (with a ``label`` column, it is copied next to the prediction). Returns the CSV's path."""
    classifier = load_classifier(checkpoint, device)
    images = prepare_inputs(images_source, classifier.modality, classifier.patch_size, limit=limit,
                            recursive=recursive, skip_corrupt=skip_corrupt,
                            large=f"squared and resized to {classifier.img_size} px like the training images")
    probs = predict_probabilities(classifier, images, batch_size, device)
    names = predicted_names(classifier.task, probs)
    labelled = any(im.label for im in images)
    header = ["path", "name"] + (["label"] if labelled else []) + ["prediction"] + \
             [f"p_{c}" for c in classifier.task.class_names]
    rows = [[str(im.path), im.name] + ([im.label or ""] if labelled else []) + [name] + [float(v) for v in row]
            for im, name, row in zip(images, names, probs)]
    with StagedOutput(output) as out:
        write_csv(out.path("predictions.csv"), header, rows)
    counts = {c: names.count(c) for c in dict.fromkeys(names)}
    log.info("%d image(s): predicted %s", len(images), counts)
    return Path(output) / "predictions.csv"

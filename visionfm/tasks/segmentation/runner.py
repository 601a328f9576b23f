"""Train, evaluate and predict with an mmseg segmentor on a modality encoder.

Training is a compact loop over random crops (mmseg's model computes the losses; we own the optimiser with
layer-wise learning-rate decay, the schedule, bf16 autocast, TensorBoard and checkpoints). The best checkpoint
is chosen on a validation split carved from the training images, never on the test split, and written
atomically; the test split is then evaluated with it, with mmseg's sliding-window inference, at the images'
original resolution inside their FOV masks.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from mmengine.structures import PixelData
from mmseg.structures import SegDataSample
from timm.optim import param_groups_layer_decay
from torch import nn

from ...errors import NonFiniteLossError
from ...config import check_resumable, write_run_config
from ...data.datasets.generic_seg import SegSample, SegSplits
from ...data.inputs import check_min_side, collect_images, note_channels, warn_if_large
from ...data.io import read_image
from ...engine.checkpoint import atomic_save, restart_from_checkpoint, safe_load
from ...engine.loading import loader_settings
from ...engine.loop import RunContext, TrainLoop, cosine_schedule
from ...engine.precision import autocast, backward_and_step, resolve_precision
from ...engine.threads import ThreadChooser
from ...modalities import get_modality
from .data import (CropSampler, LoadedImage, SegAugmentation, SharedImages, decode_images, load_dataset, load_truth,
                   model_input, split_validation)
from .metrics import METRIC_NAMES, BinarySegMetrics
from .model import build_segmentor, encoder_record
from .overlay import save_mask, save_overlay

__all__ = ["CHECKPOINT_FORMAT", "NonFiniteLossError", "prepare_splits", "param_groups", "lr_multipliers",
           "tta_views", "predict_probability", "evaluate", "train", "evaluate_checkpoint", "predict_folder",
           "load_checkpoint"]

log = logging.getLogger("visionfm.seg")

CHECKPOINT_FORMAT = "visionfm-seg-1"
#: The training state written at every validation and on SIGTERM/SIGINT; a rerun into the same folder resumes it.
RESUME_NAME = "last.pth"


# ----------------------------------------------------------------------------------------------------- data

def prepare_splits(cfg: Dict[str, Any], data_root: "str | Path") -> Tuple[SegSplits, List[SegSample], List[SegSample]]:
    """The dataset's splits, ``--limit`` applied, and the (train, validation) carve of its training split."""
    data = cfg["data"]
    splits = load_dataset(cfg["dataset"], data_root, target=cfg.get("target"),
                          include_absent=bool(data.get("include_absent", False)))
    if data.get("estimate_fov") is not None:  # images without an FOV file: threshold the image, or use all of it
        splits.fov_from_image = bool(data["estimate_fov"])
    limit = data.get("limit")
    if limit:
        splits.train, splits.test = splits.train[: int(limit)], splits.test[: int(limit)]
    train, val = split_validation(splits.train, float(data.get("val_fraction", 0.2)), int(cfg["train"]["seed"]),
                                  data.get("val_count"))
    return splits, train, val


def _load_all(samples: Sequence[SegSample], cfg: Dict[str, Any], fov_from_image: bool,
              settings: Optional[Dict[str, Any]] = None) -> List[LoadedImage]:
    """``samples`` decoded as the model sees them; ``settings``: DataLoader keywords (decoding in worker
    processes), ``None``: in this process."""
    return decode_images(samples, get_modality(cfg["modality"]).channels, cfg["data"], fov_from_image, settings)


def _node_part(ctx: RunContext, count: int) -> range:
    """The images of ``count`` that this rank decodes for its node: its local rank's contiguous share."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size)) or 1
    local = ctx.dist.local_rank
    return range(local * count // local_world, (local + 1) * count // local_world)


def _decode_share(ctx: RunContext, samples: Sequence[SegSample], cfg: Dict[str, Any], fov_from_image: bool,
                  store: SharedImages, settings: Optional[Dict[str, Any]] = None) -> List[int]:
    """Decode this rank's share of ``samples`` (:func:`_node_part`) into ``store``; returns the indices written."""
    own = list(_node_part(ctx, len(samples)))
    for index, image in zip(own, _load_all([samples[i] for i in own], cfg, fov_from_image, settings)):
        store.write(index, image)
    return own


def _training_images(ctx: RunContext, samples: Sequence[SegSample], cfg: Dict[str, Any], fov_from_image: bool,
                     settings: Optional[Dict[str, Any]] = None) -> List[LoadedImage]:
    """The training images every rank crops from. One process: decoded in memory. Under ``torchrun``: each rank
    decodes its share into a node-local folder (:class:`SharedImages`) and maps all of them read-only, so a node
    holds one decoded copy (in its page cache) instead of one per rank, and every rank can still cut any crop of
    the global batch (the crops of a step do not depend on the number of ranks)."""
    if ctx.world_size == 1:
        return _load_all(samples, cfg, fov_from_image, settings)
    token = ctx.broadcast(uuid.uuid4().hex if ctx.is_main else None)
    store = SharedImages(Path(tempfile.gettempdir()) / f"visionfm-seg-{token}")
    try:
        _decode_share(ctx, samples, cfg, fov_from_image, store, settings)
        ctx.barrier()
        images = store.read(samples)
        ctx.barrier()  # every rank has mapped the files: the folder can go (the mappings stay)
    finally:
        if ctx.dist.local_rank == 0:
            shutil.rmtree(store.folder, ignore_errors=True)
    return images


# ------------------------------------------------------------------------------------------------ optimiser

#: Encoder parameters of the bottom layer (0) in layer-wise lr decay: the embeddings and tokens.
_STEM = r"^backbone\.encoder\.(?:cls_token|reg_token|pos_embed|patch_embed|norm_pre)"


class _LayerDecayView:
    """A segmentor seen by timm's ``param_groups_layer_decay``: its parameters, and a ``group_matcher`` that
    counts layers as classification fine-tuning does (:meth:`EncoderClassifier.group_matcher`): the embeddings are
    layer 0, encoder block ``i`` is layer ``i + 1``, and everything else (the encoder's final norm, the neck and the
    heads) is the top layer ``depth + 1`` at the full rate. (mmseg's ``EncoderDecoder`` has no ``group_matcher``,
    and timm would otherwise put unmatched parameters one layer above the top.)"""

    def __init__(self, model: nn.Module):
        self.model = model

    def named_parameters(self, *args: Any, **kwargs: Any):
        return self.model.named_parameters(*args, **kwargs)

    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        top = (len(self.model.backbone.encoder.blocks),)
        return {"stem": _STEM, "blocks": [(r"^backbone\.encoder\.blocks\.(\d+)\.", None), (r"^", top)]}


def param_groups(model: nn.Module, lr: float, weight_decay: float, layer_decay: float) -> List[Dict[str, Any]]:
    """AdamW groups with layer-wise lr decay over the encoder (BEiT style, timm's ``param_groups_layer_decay``, as
    classification fine-tuning does: ``optim.layer_decay`` means the same in both tasks) and no weight decay on
    1-D parameters (biases, norms) and the encoder's ``no_weight_decay()`` tokens (position embedding, class and
    register tokens).

    Encoder block ``i`` of ``depth`` gets ``lr * layer_decay ** (depth - i)``; patch embedding and tokens get
    ``lr * layer_decay ** (depth + 1)``; the encoder's final norm, neck and heads get ``lr``. Each group carries
    its ``lr_scale`` and its starting ``lr``.
    """
    encoder = model.backbone.encoder
    skip = [f"backbone.encoder.{name}" for name in (encoder.no_weight_decay()
                                                    if hasattr(encoder, "no_weight_decay") else ())]
    groups = param_groups_layer_decay(_LayerDecayView(model), weight_decay=weight_decay, no_weight_decay_list=skip,
                                      layer_decay=layer_decay)
    for group in groups:
        group["lr"] = lr * group["lr_scale"]
    return groups


def lr_multipliers(total: int, warmup: int, min_ratio: float) -> np.ndarray:
    """Per-step lr multipliers: linear warm-up, then cosine decay to ``min_ratio`` (the engine's one schedule)."""
    return cosine_schedule(1.0, min_ratio, total, warmup)


# ------------------------------------------------------------------------------------------------ inference

def tta_views(flip: bool, rot90: bool) -> List[Tuple[int, Tuple[int, ...]]]:
    """Test-time views as ``(quarter turns, flipped axes)``: the image alone; with ``flip`` its horizontal and
    vertical mirrors; with ``rot90`` its four quarter turns; with both, the eight symmetries of the square."""
    if flip and rot90:
        return [(k, dims) for k in range(4) for dims in ((), (1,))]
    if rot90:
        return [(k, ()) for k in range(4)]
    return [(0, ()), (0, (1,)), (0, (0,))] if flip else [(0, ())]


def predict_probability(model: nn.Module, image: np.ndarray, original_size: Tuple[int, int], device: torch.device,
                        amp_dtype: Optional[torch.dtype], flip: bool = False, rot90: bool = False) -> np.ndarray:
    """Foreground probability ``float32 (H0, W0)`` of one working-resolution image ``uint8 (H, W, 3)``, through
    mmseg's data preprocessor (normalisation, padding) and ``predict`` (whole or sliding-window inference,
    padding removed, logits resized to ``original_size``). With ``flip`` and/or ``rot90``, probabilities are
    averaged over mirrored and/or rotated views (test-time augmentation, :func:`tta_views`)."""
    views = tta_views(flip, rot90)
    total = None
    for turns, dims in views:
        view = np.flip(image, axis=dims) if dims else image
        view = np.rot90(view, turns) if turns else view
        h, w = view.shape[:2]
        ori = tuple(original_size) if turns % 2 == 0 else tuple(original_size)[::-1]
        tensor = torch.from_numpy(np.array(view, copy=True)).permute(2, 0, 1).contiguous()
        sample = SegDataSample(metainfo=dict(img_shape=(h, w), ori_shape=ori, pad_shape=(h, w)))
        data = model.data_preprocessor(dict(inputs=[tensor.to(device)], data_samples=[sample]), training=False)
        with torch.no_grad(), autocast(device, amp_dtype):
            result = model.predict(data["inputs"], data["data_samples"])[0]
        logits = result.seg_logits.data.float()
        prob = torch.softmax(logits, dim=0)[1] if logits.shape[0] > 1 else logits[0]  # 1 channel: already sigmoid
        prob = torch.rot90(prob, -turns) if turns else prob
        prob = prob.flip(dims) if dims else prob
        total = prob if total is None else total + prob
    return (total / len(views)).cpu().numpy().astype(np.float32)


def _tta(cfg: Dict[str, Any]) -> Dict[str, bool]:
    """The ``test.flip`` / ``test.rot90`` settings as keyword arguments of :func:`predict_probability`."""
    return {"flip": bool(cfg["test"].get("flip", False)), "rot90": bool(cfg["test"].get("rot90", False))}


def threshold_setting(cfg: Dict[str, Any]) -> Optional[float]:
    """``test.threshold`` as a probability, or ``None`` for ``val``: the threshold that maximises the pooled Dice
    of the validation split, chosen for the best checkpoint (:func:`choose_threshold`)."""
    value = cfg["test"].get("threshold", 0.5)
    if str(value).lower() == "val":
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"test.threshold must be a probability in (0, 1) or 'val', got {value!r}") from None
    if not 0.0 < value < 1.0:
        raise ValueError(f"test.threshold must be a probability in (0, 1) or 'val', got {value}")
    return value


def choose_threshold(model: nn.Module, images: Sequence[LoadedImage], cfg: Dict[str, Any], device: torch.device,
                     amp_dtype: Optional[torch.dtype]) -> Tuple[float, float]:
    """``(threshold, pooled Dice)``: the threshold in 0.05..0.95 (steps of 0.01) that maximises the pooled Dice of
    the validation images, predicted as the test split is (same test-time augmentation), inside their FOV.

    Why: cross-entropy + Dice training leaves the Dice-optimal cut of the probabilities near, not at, 0.5, and the
    field picks it on held-out data; choosing it on the test split would overstate the result."""
    if not images:
        raise ValueError("test.threshold 'val' needs validation images (data.val_fraction or data.val_count > 0)")
    metrics = _score_loaded(model, images, 0.5, device, amp_dtype, **_tta(cfg))
    threshold, dice = metrics.best_dice_threshold()
    log.info("threshold chosen on %d validation images: %.2f (pooled validation Dice %.4f; at 0.5: %.4f)",
             len(images), threshold, dice, metrics.pooled()["dice"])
    return threshold, dice


def evaluate(model: nn.Module, samples: Sequence[SegSample], cfg: Dict[str, Any], fov_from_image: bool,
             device: torch.device, amp_dtype: Optional[torch.dtype], threshold: float = 0.5,
             overlays: Optional[Path] = None, masks: Optional[Path] = None) -> BinarySegMetrics:
    """Metrics of ``samples`` at their original resolution inside their FOV, foreground where the probability
    exceeds ``threshold``; optional overlays and mask PNGs."""
    channels = get_modality(cfg["modality"]).channels
    metrics = BinarySegMetrics(threshold)
    model.eval()
    for sample in samples:
        image = read_image(sample.image, channels)
        image = np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image
        truth, fov = load_truth(sample, image, fov_from_image)
        prob = predict_probability(model, model_input(image, cfg["data"]), image.shape[:2], device, amp_dtype,
                                   **_tta(cfg))
        m = metrics.update(sample.name, prob, truth, fov)
        log.info("  %s: dice %.4f auc %.4f", sample.name, m["dice"], m["auc"])
        if overlays is not None:
            save_overlay(overlays / f"{sample.name}.png", image, truth, prob, fov, threshold)
        if masks is not None:
            save_mask(masks / f"{sample.name}.png", prob, threshold)
    return metrics


def _score_loaded(model: nn.Module, images: Sequence[LoadedImage], threshold: float, device: torch.device,
                  amp_dtype: Optional[torch.dtype], flip: bool = False, rot90: bool = False,
                  bins: int = 1 << 20) -> BinarySegMetrics:
    """Metrics of already loaded (validation) images at the working resolution, inside their FOV."""
    metrics = BinarySegMetrics(threshold, bins=bins)
    model.eval()
    for im in images:
        prob = predict_probability(model, im.image, im.mask.shape, device, amp_dtype, flip=flip, rot90=rot90)
        metrics.update(im.sample.name, prob, im.mask, im.fov)
    return metrics


# ------------------------------------------------------------------------------------------------- outputs

def _clean(value: Any) -> Any:
    """JSON-safe: NaN -> None, numpy scalars -> Python."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if math.isnan(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_clean(obj), indent=2))
    os.replace(tmp, path)


def _region(splits: SegSplits) -> str:
    """Where the test metrics are computed, in words, for metrics.json."""
    with_file = sum(s.fov is not None for s in splits.test)
    if with_file == len(splits.test):
        return "inside the FOV mask"
    if splits.fov_from_image:
        return "inside the FOV (" + ("mask files, else " if with_file else "") + "estimated from each image)"
    return "whole image" if not with_file else "inside the FOV mask where given, else the whole image"


def write_metrics(output: Path, summary: Dict[str, Any], extra: Dict[str, Any]) -> Dict[str, Any]:
    """``metrics.json`` (pooled, mean, per image, run facts) and ``metrics.csv`` (one row per image, then the
    mean and pooled rows)."""
    result = {**extra, **summary}
    _write_json(output / "metrics.json", result)
    columns = ["name", *METRIC_NAMES, "tp", "fp", "fn", "tn"]
    tmp = output / "metrics.csv.tmp"
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in summary["per_image"]:
            writer.writerow(_clean(row))
        writer.writerow(_clean({"name": "mean", **summary["mean"]}))
        writer.writerow(_clean({"name": "pooled", **summary["pooled"]}))
    os.replace(tmp, output / "metrics.csv")
    return result


# ---------------------------------------------------------------------------------------------- checkpoints

def load_checkpoint(path: "str | Path", cfg: Dict[str, Any], device: torch.device) -> Tuple[nn.Module, Dict[str, Any]]:
    """Rebuild the model of a segmentation checkpoint (safe load, strict keys) for the run config ``cfg``;
    the checkpoint's model, crop/resolution and test settings replace those of ``cfg``.

    Returns:
        ``(model, checkpoint)``.
    """
    ckpt = safe_load(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a VisionFM segmentation checkpoint (no format '{CHECKPOINT_FORMAT}'); pass "
                         f"the best.pth written by downstream/seg.py")
    stored = ckpt["config"]
    cfg["modality"] = stored["modality"]
    cfg["model"] = stored["model"]
    cfg["data"]["crop_size"] = stored["data"]["crop_size"]
    cfg["data"]["resize_long_side"] = stored["data"].get("resize_long_side")
    cfg["data"]["clahe"] = stored["data"].get("clahe")  # the model was trained on that input
    # Window and stride come with the model; threshold and test-time augmentation stay the caller's choice.
    cfg["test"] = {**stored["test"], **{k: v for k, v in cfg["test"].items() if k in ("threshold", "flip", "rot90")}}
    model, _ = build_segmentor(cfg, encoder=ckpt["encoder"])
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as err:  # torch lists the missing and unexpected keys
        raise ValueError(f"{path}: checkpoint does not match the model it describes: {err}") from None
    return model.to(device), ckpt


def _save_best(path: Path, model: nn.Module, cfg: Dict[str, Any], step: int, val: Dict[str, float]) -> None:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_save({"format": CHECKPOINT_FORMAT, "model": state, "step": int(step), "val": _clean(val),
                 "config": cfg, "encoder": encoder_record(model.backbone.info)}, path)


def _store_threshold(path: Path, threshold: float) -> None:
    """Record the threshold chosen on validation in ``best.pth`` (atomic rewrite), for ``--eval-only`` and
    ``predict``."""
    ckpt = safe_load(path)
    ckpt["threshold"] = float(threshold)
    atomic_save(ckpt, path)


def _save_resume_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                       scaler: Optional["torch.amp.GradScaler"], sampler: CropSampler, cfg: Dict[str, Any], step: int,
                       best: Dict[str, Any], seen_loss: List[float], seconds: float) -> None:
    """Everything the loop needs to continue at ``step`` as if it had not stopped (atomic write)."""
    device = next(model.parameters()).device
    atomic_save({"format": CHECKPOINT_FORMAT + "-train", "model": model.state_dict(),
                 "optimizer": optimizer.state_dict(),
                 "scaler": scaler.state_dict() if scaler is not None else None, "step": int(step),
                 "best": {"step": best["step"], "value": float(best["value"]), "val": _clean(best["val"])},
                 "loss_tail": [float(v) for v in seen_loss[-20:]], "sampler_rng": sampler.rng.bit_generator.state,
                 "rng_torch": torch.get_rng_state(),
                 # drop path draws on the training device: a GPU's generator is part of the state too
                 "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                 "train_seconds": float(seconds), "config": cfg}, path)


def _resume(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: Optional["torch.amp.GradScaler"],
            sampler: CropSampler, cfg: Dict[str, Any]) -> Tuple[int, Dict[str, Any], List[float], float]:
    """Restore the state written by :func:`_save_resume_state`; returns ``(step, best record, recent losses,
    training seconds so far)``."""
    ckpt = safe_load(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT + "-train":
        raise ValueError(f"{path}: not a VisionFM segmentation training state; move it away or use a new --output")
    changes = check_resumable(ckpt.get("config") or {}, cfg, path, bool(cfg["train"].get("resume_with_changes")))
    if changes:
        log.warning("resuming under a changed config: %s", changes)
    restart_from_checkpoint(ckpt, model=model, optimizer=optimizer)
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    sampler.rng.bit_generator.state = ckpt["sampler_rng"]
    torch.set_rng_state(ckpt["rng_torch"])
    device = next(model.parameters()).device
    if device.type == "cuda" and ckpt.get("rng_cuda") is not None:
        torch.cuda.set_rng_state(ckpt["rng_cuda"], device)
    best = dict(ckpt["best"])
    log.info("resuming %s at step %d (best validation so far: step %s)", path, ckpt["step"], best["step"])
    return int(ckpt["step"]), best, list(ckpt["loss_tail"]), float(ckpt.get("train_seconds", 0.0))


# -------------------------------------------------------------------------------------------------- train

def _batch(images: torch.Tensor, labels: torch.Tensor) -> Dict[str, Any]:
    samples = []
    for label in labels:
        shape = tuple(label.shape[-2:])
        s = SegDataSample(metainfo=dict(img_shape=shape, ori_shape=shape, pad_shape=shape))
        s.gt_sem_seg = PixelData(data=label)
        samples.append(s)
    return dict(inputs=list(images), data_samples=samples)


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(cfg: Dict[str, Any], output: "str | Path", data_root: "str | Path", device: torch.device) -> Dict[str, Any]:
    """Train on the training split (minus validation), keep the best validation checkpoint, evaluate it on the
    test split. Writes ``config.yaml``, ``best.pth``, ``tensorboard/``, ``metrics.json``, ``metrics.csv`` and
    ``overlays/`` under ``output``; returns the metrics dict.

    Under ``torchrun`` each rank trains on its share of every global batch of ``optim.batch_size`` crops per rank,
    validates its share of the validation images (pooled across ranks), and rank 0 alone writes files and runs the
    test evaluation (its result is returned on every rank)."""
    t_cfg = cfg["train"]
    _seed(int(t_cfg["seed"]))
    test_threshold = threshold_setting(cfg)  # checked before any work; None: chosen on validation after training
    amp_dtype, needs_scaler = resolve_precision(t_cfg.get("precision", "auto"), device)
    ctx = RunContext.start(device, output)
    # The thread count this run chooses is put back when it ends: a later run in this process starts afresh.
    with ThreadChooser(t_cfg.get("threads"), device, amp_dtype) as threads:
        return _train(cfg, ctx, data_root, threads, test_threshold, amp_dtype, needs_scaler)


def _pooled_validation(model: nn.Module, images: Sequence[LoadedImage], threshold: Optional[float],
                       ctx: RunContext, amp_dtype: Optional[torch.dtype]) -> Dict[str, float]:
    """Pooled metrics of the validation images at the working resolution (cheap; for model selection): each rank
    scores its share ``images`` (``ctx.shard`` of the validation split, the only ones it decodes) and the shares'
    histograms are pooled, so every rank gets the one-process numbers.

    ``threshold`` ``None`` (``test.threshold: val``): the threshold metrics are those at the threshold that
    maximises the pooled Dice (``threshold`` in the result), the way the test split will be cut. Why: early in
    training (a short budget) the foreground probabilities can rank the vessels well (validation AUC 0.95 at step
    200 of DRIVE) and still all lie under 0.5, so Dice at 0.5 is 0 for every checkpoint and picks the first."""
    metrics = _score_loaded(model, images, 0.5 if threshold is None else threshold, ctx.device, amp_dtype,
                            bins=1 << 16)
    pooled = BinarySegMetrics(metrics.threshold, bins=1 << 16)
    for part in ctx.gather_objects(metrics):
        pooled.merge(part)
    result = {**pooled.pooled(), "threshold": pooled.threshold}
    if threshold is None:
        result.update(pooled.pooled_at(pooled.best_dice_threshold()[0]))
    return result


def _train(cfg: Dict[str, Any], ctx: RunContext, data_root: "str | Path", threads: ThreadChooser,
           test_threshold: Optional[float], amp_dtype: Optional[torch.dtype], needs_scaler: bool) -> Dict[str, Any]:
    """The body of :func:`train`, run while ``threads`` holds the thread count: the data and model, the trainer's
    step and validation on :class:`~visionfm.engine.loop.TrainLoop`, then the test evaluation."""
    output, device = Path(ctx.output), ctx.device
    t_cfg, o_cfg = cfg["train"], cfg["optim"]
    splits, train_samples, val_samples = prepare_splits(cfg, data_root)
    if not splits.test:
        raise ValueError(f"dataset {splits.dataset}: the test split is empty")
    for note in splits.notes:
        log.info("%s: %s", splits.dataset, note)
    log.info("%s (%s): %d train, %d validation (carved from train), %d test images", splits.dataset, splits.target,
             len(train_samples), len(val_samples), len(splits.test))
    if ctx.is_main:
        write_run_config(cfg, output)
        for partial in output.glob(".partial-*.tmp"):  # a save cut short by a SIGKILL: never a complete file
            partial.unlink()
            log.info("removed %s, left by an interrupted save", partial)

    model, mm_cfg = build_segmentor(cfg)
    model.to(device)
    info = model.backbone.info
    log.info("encoder: %s %s from %s (%s), blocks %s; head %s", info.modality, info.arch,
             info.source or "random initialisation", "frozen" if cfg["model"]["freeze_encoder"] else "fine-tuned",
             list(model.backbone.out_indices), mm_cfg["decode_head"]["type"])
    scaler = torch.amp.GradScaler(device.type) if needs_scaler else None  # fp16 on GPUs without bf16

    t0 = time.time()
    data = cfg["data"]
    settings = loader_settings(data, device, ctx.world_size)
    train_images = _training_images(ctx, train_samples, cfg, splits.fov_from_image, settings)
    val_images = _load_all(ctx.shard(list(val_samples)), cfg, splits.fov_from_image, settings)  # this rank's share
    log.info("loaded %d training and %d validation images in %.1f s (%d decoding workers)", len(train_images),
             len(val_images), time.time() - t0, settings["num_workers"])
    sampler = CropSampler(train_images, int(data["crop_size"]), float(data.get("positive_fraction", 0.0)),
                          seed=int(t_cfg["seed"]))
    aug_cfg = cfg.get("augment", {})
    augment = SegAugmentation(hflip=bool(aug_cfg.get("hflip", True)), vflip=bool(aug_cfg.get("vflip", True)),
                              rot90=bool(aug_cfg.get("rot90", True)),
                              rotate_degrees=float(aug_cfg.get("rotate_degrees", 0.0)),
                              colour_jitter=float(aug_cfg.get("colour_jitter", 0.2)),
                              hue=float(aug_cfg.get("hue", 0.0)))

    # --max-steps stops the run early on the full recipe's schedule, so that rerunning without it resumes the
    # same run rather than a differently scheduled one.
    total = planned = int(o_cfg["steps"])
    if t_cfg.get("max_steps"):
        total = min(total, int(t_cfg["max_steps"]))
    lr = float(o_cfg["lr"])
    groups = param_groups(model, lr, float(o_cfg.get("weight_decay", 0.05)), float(o_cfg.get("layer_decay", 1.0)))
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))
    schedule = lr_multipliers(planned, int(o_cfg.get("warmup_steps", 0)), float(o_cfg.get("min_lr_ratio", 0.01)))
    batch_size = int(o_cfg["batch_size"])
    global_batch = batch_size * ctx.world_size
    select = str(t_cfg.get("select_metric", "dice"))
    best_path, resume_path = output / "best.pth", output / RESUME_NAME
    best: Dict[str, Any] = {"step": None, "value": -math.inf, "val": {}}
    clip = float(o_cfg.get("clip_grad", 0.0) or 0.0)
    log.info("training %d steps, batch %d crops of %d px (%d per rank x %d), lr %.2e (layer decay %s), %s on %s",
             total, global_batch, int(data["crop_size"]), batch_size, ctx.world_size, lr,
             o_cfg.get("layer_decay", 1.0), amp_dtype or "fp32", device)

    start, seen_loss, seconds_before = 0, [], 0.0
    if resume_path.is_file():
        start, best, seen_loss, seconds_before = _resume(resume_path, model, optimizer, scaler, sampler, cfg)
    # Gradients are averaged across ranks in backward; BatchNorm layers of the heads see the rank's crops only.
    net = ctx.wrap(model)
    params = [p for g in groups for p in g["params"]]
    writer = ctx.writer()
    loop = TrainLoop(ctx, total, "seg train", writer, items_per_step=global_batch,
                     log_every=int(t_cfg.get("log_every", 20)), val_every=max(1, int(t_cfg.get("val_every", 200))),
                     save_every=int(t_cfg.get("checkpoint_every_steps") or 0),
                     hint=f"lower optim.lr or use train.precision=fp32; {best_path} (if any) holds the best model")

    def step(index: int) -> Dict[str, Any]:
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"] * float(schedule[index])  # a Python float: safe to torch.load
        # Every rank draws the crops and augmentations of the whole global batch (the same random streams on all
        # ranks) and cuts and augments its slice only, so the data of a step do not depend on the number of ranks.
        # The crops go to the device as uint8; conversion and augmentation run there, one batched call.
        part = ctx.part(global_batch)
        images, labels = sampler.sample(global_batch, part)
        if device.type == "cuda":
            images, labels = images.pin_memory(), labels.pin_memory()
        images, labels = augment(images.to(device, non_blocking=True), labels.to(device, non_blocking=True),
                                 part=part, batch_size=global_batch)
        batch = model.data_preprocessor(_batch(images, labels), training=True)
        with autocast(device, amp_dtype):
            losses = net(**batch, mode="loss")
        loss, log_vars = model.parse_losses(losses)
        if torch.isfinite(loss):  # a NaN loss is reported by the loop before anything is saved
            backward_and_step(loss, optimizer, scaler, params, clip or None)
        seen_loss.append(float(loss.item()))
        return {**{k: float(v.detach() if torch.is_tensor(v) else v) for k, v in log_vars.items()},
                "lr": lr * float(schedule[index])}

    def validate(done: int) -> None:
        nonlocal best
        if val_samples:  # every rank pools, whether or not its share of the split is empty
            val = _pooled_validation(model, val_images, test_threshold, ctx, amp_dtype)
            for key in METRIC_NAMES:
                if not math.isnan(val[key]):
                    writer.add_scalar(f"val/{key}", val[key], done)
            value = val[select]
            log.info("step %d validation: dice %.4f (threshold %.2f) auc %.4f%s", done, val["dice"],
                     val["threshold"], val["auc"], " (best)" if value > best["value"] else "")
        else:
            val, value = {}, float(done)  # nothing to validate on: keep the last model
        if best["step"] is None or value > best["value"]:
            best = {"step": done, "value": value, "val": val}
            if ctx.is_main:
                _save_best(best_path, model, cfg, done, val)
        threads.recheck()

    def save(done: int) -> None:
        if ctx.is_main:
            _save_resume_state(resume_path, model, optimizer, scaler, sampler, cfg, done, best, seen_loss,
                               seconds_before + time.perf_counter() - t_loop)

    t_loop = time.perf_counter()
    try:
        loop.run(step, validate, save, start)
    finally:
        writer.close()
    train_seconds = seconds_before + loop.seconds
    ctx.barrier()  # best.pth is complete before any rank goes on

    result = None
    if ctx.is_main:  # the test evaluation writes overlays and metrics: rank 0 alone
        # under torchrun this rank holds only its share of the validation images: _test decodes them all if needed
        all_val = val_images if ctx.world_size == 1 else None
        result = _test(cfg, output, splits, val_samples, all_val, best, best_path, select, test_threshold,
                       amp_dtype, device, info, {"steps": total, "seconds": round(train_seconds, 1),
                                                  "batch_size": global_batch, "crop_size": int(data["crop_size"]),
                                                  "final_loss": seen_loss[-1] if seen_loss else None,
                                                  "precision": str(amp_dtype or "fp32"), "device": str(device),
                                                  "processes": ctx.world_size})
    return ctx.broadcast(result)


def _test(cfg: Dict[str, Any], output: Path, splits: SegSplits, val_samples: Sequence[SegSample],
          val_images: Optional[Sequence[LoadedImage]], best: Dict[str, Any], best_path: Path, select: str,
          test_threshold: Optional[float], amp_dtype: Optional[torch.dtype], device: torch.device, info: Any,
          train_record: Dict[str, Any]) -> Dict[str, Any]:
    """The best checkpoint on the test split: threshold (from the config, or chosen on validation), metrics,
    overlays, ``metrics.json`` and ``metrics.csv``."""
    log.info("best validation %s %.4f at step %s; evaluating %s on %d test images", select, best["value"],
             best["step"], best_path, len(splits.test))
    model, _ = load_checkpoint(best_path, cfg, device)
    t_eval = time.time()
    threshold_source = "config"
    if test_threshold is None:
        if val_images is None:
            val_images = _load_all(val_samples, cfg, splits.fov_from_image)
        test_threshold, _ = choose_threshold(model, val_images, cfg, device, amp_dtype)
        _store_threshold(best_path, test_threshold)
        threshold_source = "validation (max pooled Dice)"
    metrics = evaluate(model, splits.test, cfg, splits.fov_from_image, device, amp_dtype, test_threshold,
                       overlays=output / "overlays")
    extra = {
        "dataset": splits.dataset, "target": splits.target, "split": "test",
        "region": _region(splits),
        "resolution": "original", "checkpoint": str(best_path), "best_step": best["step"],
        "validation": {"images": [s.name for s in val_samples], "selected_on": select, **best["val"]},
        "threshold_source": threshold_source, "pooled_at_0.5": metrics.pooled_at(0.5),
        "encoder": encoder_record(info), "notes": splits.notes, "train": train_record,
        "eval_seconds": round(time.time() - t_eval, 1),
    }
    result = write_metrics(output, metrics.summary(), extra)
    pooled = metrics.pooled()
    log.info("test (%d images, pooled): dice %.4f iou %.4f auc %.4f sens %.4f spec %.4f acc %.4f", len(splits.test),
             *(pooled[k] for k in ("dice", "iou", "auc", "sensitivity", "specificity", "accuracy")))
    return result

# ------------------------------------------------------------------------------------------ eval / predict

def evaluate_checkpoint(cfg: Dict[str, Any], checkpoint: "str | Path", output: "str | Path",
                        data_root: "str | Path", device: torch.device) -> Dict[str, Any]:
    """``--eval-only``: evaluate a checkpoint on the dataset's test split (metrics, CSV, overlays)."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    amp_dtype, _ = resolve_precision(cfg["train"].get("precision", "auto"), device)
    with ThreadChooser(cfg["train"].get("threads"), device, amp_dtype):  # put back at the end
        test_threshold = threshold_setting(cfg)
        model, ckpt = load_checkpoint(checkpoint, cfg, device)
        splits, _, val_samples = prepare_splits(cfg, data_root)
        write_run_config(cfg, output)
        threshold_source = "config"
        if test_threshold is None and ckpt.get("threshold") is not None:
            test_threshold, threshold_source = float(ckpt["threshold"]), f"{checkpoint} (chosen on validation)"
        elif test_threshold is None:
            val_images = _load_all(val_samples, cfg, splits.fov_from_image)
            test_threshold, _ = choose_threshold(model, val_images, cfg, device, amp_dtype)
            threshold_source = "validation (max pooled Dice)"
        t0 = time.time()
        metrics = evaluate(model, splits.test, cfg, splits.fov_from_image, device, amp_dtype, test_threshold,
                           overlays=output / "overlays")
        extra = {"dataset": splits.dataset, "target": splits.target, "split": "test", "region": _region(splits),
                 "resolution": "original",
                 "checkpoint": str(checkpoint), "best_step": ckpt.get("step"), "encoder": ckpt.get("encoder"),
                 "threshold_source": threshold_source, "pooled_at_0.5": metrics.pooled_at(0.5),
                 "notes": splits.notes, "eval_seconds": round(time.time() - t0, 1)}
        return write_metrics(output, metrics.summary(), extra)


#: ``predict`` works at most at this many pixels on the long side: an 8000-px montage at full resolution needs
#: gigabytes of logits; the mask is predicted at this size and resized back to the image's own.
PREDICT_MAX_SIDE = 4096


def predict_folder(checkpoint: "str | Path", images: "str | Path", output: "str | Path", cfg: Dict[str, Any],
                   device: torch.device, limit: Optional[int] = None, probabilities: bool = False,
                   skip_corrupt: bool = False, max_side: int = PREDICT_MAX_SIDE) -> List[Path]:
    """Write ``<output>/<name>.png`` masks (0/255; with ``probabilities`` also ``<name>_prob.png``) for every image
    of a folder or CSV (:func:`visionfm.data.inputs.collect_images`: every file is checked before the first mask
    is written, and two inputs never share an output name).

    Images larger than ``max_side`` on the long side are predicted at that size and the mask resized back."""
    from tqdm import tqdm  # noqa: PLC0415

    inputs = collect_images(images, limit=limit, skip_corrupt=skip_corrupt)
    amp_dtype, _ = resolve_precision(cfg["train"].get("precision", "auto"), device)
    with ThreadChooser(cfg["train"].get("threads"), device, amp_dtype):  # put back at the end
        threshold = threshold_setting(cfg)
        model, ckpt = load_checkpoint(checkpoint, cfg, device)
        model.eval()
        modality = get_modality(cfg["modality"])
        note_channels(inputs, modality.channels, modality.name)
        check_min_side(inputs, int(model.backbone.info.patch_size), "one encoder patch")
        data_cfg = dict(cfg["data"])
        warn_if_large([im for im in inputs if max(im.width, im.height) > max_side],
                      f"predicted at {max_side} px on the long side, the mask resized back to the image's size")
        if threshold is None:  # 'val': the one chosen on validation when the checkpoint was trained
            threshold = float(ckpt.get("threshold", 0.5))
            log.info("threshold %.2f (%s)", threshold, "chosen on validation, stored in the checkpoint"
                     if ckpt.get("threshold") is not None else "the checkpoint stores none chosen on validation")
        output = Path(output)
        written = []
        for im in tqdm(inputs, desc="predict", unit="img", mininterval=10.0, disable=len(inputs) < 2):
            image = read_image(im.path, modality.channels)
            image = np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image
            long_side = data_cfg.get("resize_long_side")
            capped = max(image.shape[:2]) > max_side and (not long_side or int(long_side) > max_side)
            view_cfg = {**data_cfg, "resize_long_side": max_side} if capped else data_cfg
            working = model_input(image, view_cfg)
            prob = predict_probability(model, working, working.shape[:2] if capped else image.shape[:2], device,
                                       amp_dtype, **_tta(cfg))
            if capped:  # bounded memory: probabilities stay at the working size, 8-bit when resized back
                prob = _resize_probability(prob, image.shape[:2])
            del image, working
            written.append(save_mask(output / f"{im.name}.png", prob, threshold))
            if probabilities:
                save_mask(output / f"{im.name}_prob.png", prob, probability=True)
            log.info("%s -> %s (%.2f%% foreground)", im.path, written[-1], 100.0 * float((prob > threshold).mean()))
        return written


def _resize_probability(prob: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """A working-size probability map resized (bilinear, through 8 bits) to ``size`` = ``(height, width)``."""
    from PIL import Image  # noqa: PLC0415

    small = Image.fromarray((np.clip(prob, 0, 1) * 255 + 0.5).astype(np.uint8))
    return np.asarray(small.resize((size[1], size[0]), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0

"""Full fine-tuning of an encoder with a classification head.

BEiT/MAE-style recipe: AdamW with layer-wise learning-rate decay (timm's ``param_groups_layer_decay``: the
head and last block learn at the full rate, each block below at ``layer_decay`` times the one above),
stochastic depth (set when the encoder is loaded), optional mixup/cutmix (timm's ``Mixup``), a cosine
schedule with warm-up precomputed per step, and light geometric augmentation that respects the modality
(no vertical flips of B-scans). After every epoch the model is scored on the validation split and the best
epoch's weights are kept; the test split is not touched here.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import kornia.augmentation as K
import numpy as np
import torch
from timm.data import Mixup
from timm.optim import param_groups_layer_decay
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler, Subset

from ...engine.checkpoint import atomic_save, safe_load
from ...engine.loop import NullWriter, RunContext, TrainLoop, cosine_schedule
from ...engine.precision import autocast, backward_and_step
from ...modalities import Modality, get_modality
from .features import pooled_features
from .selection import Selector, resolve_select_metric, split_metrics
from .task import ClassificationTask

__all__ = ["HEAD_INITS", "FinetuneConfig", "EncoderClassifier", "train_augmentation", "predict_logits",
           "finetune_param_groups", "finetune", "interpolate_weights"]

log = logging.getLogger(__name__)

#: How the head starts: ``random`` (truncated normal of ``head_init_std``, MAE/RETFound's near-zero start) or
#: ``probe`` (a linear probe on the frozen encoder's features first: LP-FT).
HEAD_INITS = ("random", "probe")


@dataclass
class FinetuneConfig:
    """Settings of fine-tuning (the ``finetune`` section of ``configs/cls/default.yaml``)."""

    epochs: int = 30
    batch_size: int = 16
    lr: float = 5e-4              # for a batch of 256; scaled linearly with the batch size
    min_lr: float = 1e-6
    warmup_epochs: int = 3
    weight_decay: float = 0.05
    layer_decay: float = 0.65
    mixup: float = 0.0            # mixup alpha (0: off)
    cutmix: float = 0.0           # cutmix alpha (0: off)
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    clip_grad: Optional[float] = None
    augment: bool = True
    crop_scale: Sequence[float] = (0.6, 1.0)
    max_steps: Optional[int] = None
    num_workers: int = 0
    checkpoint_every_steps: int = 25


class EncoderClassifier(nn.Module):
    """Encoder + pooling + head: ``(B, 3, H, W)`` normalised images to ``(B, task.out_dim)`` logits. With
    ``mirror_eval`` (``eval.mirror``), in eval mode, the logits are the mean of each image's and its left-right
    mirror's (test-time augmentation; training steps see one view)."""

    def __init__(self, encoder: nn.Module, head: nn.Module, pool: str = "cls", mirror_eval: bool = False) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.pool = pool
        self.mirror_eval = mirror_eval

    def forward(self, images: Tensor) -> Tensor:
        logits = self.head(pooled_features(self.encoder, images, self.pool, 1))
        if self.mirror_eval and not self.training:
            logits = (logits + self.head(pooled_features(self.encoder, images.flip(-1), self.pool, 1))) / 2
        return logits

    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Layers for timm's layer-wise lr decay, as BEiT/MAE count them: the embeddings are layer 0, block
        ``i`` is layer ``i + 1``, and the final norm and the head form the top layer ``depth + 1`` (full rate),
        so the last block already learns at ``layer_decay`` times the head's rate."""
        top = (len(self.encoder.blocks),)
        return {"stem": r"^encoder\.(?:cls_token|reg_token|pos_embed|patch_embed|norm_pre)",
                "blocks": [(r"^encoder\.blocks\.(\d+)", None), (r"^encoder\.(?:norm|fc_norm)\.|^head\.", top)]}


def train_augmentation(modality: "Modality | str", size: int, crop_scale: Sequence[float] = (0.6, 1.0)) -> nn.Module:
    """Random resized crop and the flips the modality allows, on batches of normalised images."""
    recipe = get_modality(modality).augment
    ops = [K.RandomResizedCrop((size, size), scale=tuple(crop_scale))]
    if recipe.hflip:
        ops.append(K.RandomHorizontalFlip())
    if recipe.vflip:
        ops.append(K.RandomVerticalFlip())
    return K.AugmentationSequential(*ops)


@torch.no_grad()
def predict_logits(model: nn.Module, dataset: Dataset, batch_size: int, device: torch.device,
                   amp_dtype: Optional[torch.dtype] = None,
                   ctx: Optional[RunContext] = None) -> Tuple[Tensor, Tensor]:
    """Logits (float32, CPU) and targets of a whole dataset, in order, with the model in eval mode. Under
    ``torchrun`` (``ctx``) each rank predicts its contiguous share and every rank gets all of them."""
    was_training = model.training
    model.eval()
    own = range(len(dataset))[ctx.part(len(dataset))] if ctx is not None else range(len(dataset))
    logits, targets = [torch.empty(0)], [torch.empty(0, dtype=torch.long)]
    for images, target in DataLoader(Subset(dataset, list(own)), batch_size=batch_size, shuffle=False):
        with autocast(device, amp_dtype):
            logits.append(model(images.to(device)).float().cpu())
        targets.append(target)
    model.train(was_training)
    logits = [x for x in logits if x.numel()] or logits[:1]
    targets = [t for t in targets if t.numel()] or targets[:1]
    logits, targets = torch.cat(logits), torch.cat(targets)
    if ctx is not None:
        logits, targets = ctx.gather_rows(logits), ctx.gather_rows(targets)
    return logits, targets


def finetune_param_groups(model: EncoderClassifier, weight_decay: float, layer_decay: float):
    """Layer-decayed parameter groups (timm's ``param_groups_layer_decay`` over
    :meth:`EncoderClassifier.group_matcher`); no weight decay on 1-D parameters, the position embedding and
    the class token. Each group carries its ``lr_scale``."""
    skip = [f"encoder.{name}" for name in (model.encoder.no_weight_decay()
                                           if hasattr(model.encoder, "no_weight_decay") else ())]
    return param_groups_layer_decay(model, weight_decay=weight_decay, no_weight_decay_list=skip,
                                    layer_decay=layer_decay)


def _mixer(cfg: FinetuneConfig, task: ClassificationTask) -> Optional[Mixup]:
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None
    smoothing = task.label_smoothing if task.kind == "multiclass" else 0.0
    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                 switch_prob=cfg.mixup_switch_prob, label_smoothing=smoothing, num_classes=task.num_classes,
                 multi_label=task.kind == "multilabel")


class _RankBatches(Sampler):
    """The batches of ``batches`` cut to one rank's share (:meth:`RunContext.part`). Every rank draws the same
    global batches from the same generator, so the data of a step do not depend on the number of processes. Under
    ``torchrun`` a last global batch smaller than the number of ranks is left out (a rank without images cannot
    take part in the gradient average)."""

    def __init__(self, batches: BatchSampler, ctx: RunContext) -> None:
        self.batches, self.ctx = batches, ctx

    def __iter__(self):
        for batch in self.batches:
            if len(batch) >= self.ctx.world_size:
                yield batch[self.ctx.part(len(batch))]

    def __len__(self) -> int:
        n, size = len(self.batches.sampler), self.batches.batch_size
        full = n // size
        tail = n - full * size
        return full + (1 if tail and not self.batches.drop_last and tail >= self.ctx.world_size else 0)


def finetune(model: EncoderClassifier, train_set: Dataset, val_set: Dataset, task: ClassificationTask,
             cfg: FinetuneConfig, modality: "Modality | str", img_size: int, device: torch.device,
             amp_dtype: Optional[torch.dtype] = None, use_scaler: bool = False, select_metric: str = "auto",
             seed: int = 0, writer=None, resume_path: "Optional[str | Path]" = None,
             ctx: Optional[RunContext] = None,
             extra: Optional[Dict[str, Any]] = None) -> Tuple[EncoderClassifier, Dict[str, Any]]:
    """Fine-tune ``model`` on :class:`~visionfm.engine.loop.TrainLoop` and return it with the weights of the best
    validation epoch loaded.

    With ``resume_path`` the whole training state (model, optimiser, scaler, best candidate, history, data order
    and random streams) is written there atomically every ``cfg.checkpoint_every_steps`` steps and after every
    epoch, and a run that finds the file continues from it with the result it would have had uninterrupted.

    Under ``torchrun`` (``ctx``) each rank trains on its share of global batches of ``cfg.batch_size`` images per
    rank (the learning rate scales with the global batch), validates its share of the validation split (the logits
    are gathered), and rank 0 alone writes the state.

    ``extra`` records what the caller did to ``model`` before fine-tuning (LP-FT's probe selection): it is written
    into the resume state and merged into the returned selection; a resumed run returns the stored record.

    Returns:
        ``(model, selection)`` with the chosen epoch, step, validation metric and loss, and the per-epoch
        validation history.
    """
    ctx = ctx or RunContext(device)
    metric = resolve_select_metric(task, select_metric)
    model.to(device)
    n = len(train_set)
    mixer = _mixer(cfg, task)
    batch = min(cfg.batch_size * ctx.world_size, n)  # the global batch
    if mixer is not None:
        batch -= batch % (2 * ctx.world_size)  # timm's Mixup pairs each image with its mirror in a rank's batch
        if batch < 2:
            raise ValueError("mixup/cutmix need at least 2 training images")
    gen = torch.Generator().manual_seed(seed)
    # What DataLoader(shuffle=True, generator=gen) builds, cut to this rank's share of every batch.
    batches = _RankBatches(BatchSampler(RandomSampler(train_set, generator=gen), batch, drop_last=mixer is not None),
                           ctx)
    # generator=gen: the iterator draws its base seed from it, as DataLoader(shuffle=True, generator=gen) did, so
    # the shuffle and the global random stream (augmentation, dropout) are those of a plain loader
    loader = DataLoader(train_set, batch_sampler=batches, num_workers=cfg.num_workers, generator=gen)
    steps_per_epoch = len(batches)
    total = cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    epochs = math.ceil(total / steps_per_epoch)
    base_lr = cfg.lr * batch / 256.0
    lrs = cosine_schedule(base_lr, cfg.min_lr, total, cfg.warmup_epochs * steps_per_epoch)
    optimizer = torch.optim.AdamW(finetune_param_groups(model, cfg.weight_decay, cfg.layer_decay), lr=base_lr)
    scaler = torch.amp.GradScaler(device.type) if use_scaler else None
    augment = train_augmentation(modality, img_size, cfg.crop_scale).to(device) if cfg.augment else None
    selector = Selector(metric)
    net = ctx.wrap(model)
    # The loop's counters: the epoch's batch iterator and the generator state its shuffle was drawn from, the
    # running training loss of the epoch and the per-epoch validation history.
    run: Dict[str, Any] = {"history": [], "running": 0.0, "seen": 0, "batches": None, "epoch_generator": None}
    start = 0
    torch.manual_seed(seed)
    resume_path = Path(resume_path) if resume_path is not None else None
    if resume_path is not None and resume_path.is_file():
        resumed = _restore(resume_path, model, optimizer, scaler, selector, gen)
        start, done_in_epoch = resumed["step"], resumed["batches_done"]
        run.update(history=resumed["history"], running=resumed["running"], seen=resumed["seen"])
        extra = resumed.get("extra", extra)
        log.info("resuming fine-tuning from %s at step %d (epoch %d, batch %d)", resume_path, start,
                 resumed["epoch"] + 1, done_in_epoch)
        if done_in_epoch:  # the same order as before the interruption, minus what was trained
            run["epoch_generator"] = gen.get_state()
            run["batches"] = iter(loader)
            for _ in range(done_in_epoch):
                next(run["batches"])
        torch.set_rng_state(resumed["rng_torch"])
        np.random.set_state(tuple(resumed["rng_numpy"]))  # timm's Mixup draws from numpy

    def step(index: int) -> Dict[str, Any]:
        model.train()  # validation leaves it in eval mode
        if index % steps_per_epoch == 0 or run["batches"] is None:
            run["epoch_generator"] = gen.get_state()  # the epoch's shuffle is drawn from it as its iterator starts
            run["batches"] = iter(loader)
            run.update(running=0.0, seen=0)
        images, targets = next(run["batches"])
        images, targets = images.to(device, non_blocking=True), targets.to(device)
        if augment is not None:
            images = augment(images)
        if mixer is not None:
            images, targets = mixer(images, targets)
        for group in optimizer.param_groups:
            group["lr"] = float(lrs[index]) * group.get("lr_scale", 1.0)
        with autocast(device, amp_dtype):
            logits = net(images)
        loss = task.loss(logits, targets)
        if torch.isfinite(loss):  # a NaN is reported by the loop before anything is saved
            # A rank's share of an uneven last batch weighs in by its size: the average is the global batch's mean.
            weight = ctx.loss_weight(images.shape[0], min(batch, n - (index % steps_per_epoch) * batch))
            backward_and_step(loss * weight if weight != 1.0 else loss, optimizer, scaler, model.parameters(),
                              cfg.clip_grad)
        run["running"] += float(loss.detach()) * images.shape[0]
        run["seen"] += images.shape[0]
        return {"loss": float(loss.detach()), "lr": float(lrs[index])}

    def validate(done: int) -> None:
        epoch = (done - 1) // steps_per_epoch
        logits, val_targets = predict_logits(model, val_set, batch, device, amp_dtype, ctx)
        val_loss = float(task.loss(logits, val_targets))
        val = split_metrics(task, task.probabilities(logits), val_targets)
        info = {"epoch": epoch + 1, "step": done}
        train_loss = run["running"] / max(run["seen"], 1)
        run["history"].append({**info, "train_loss": train_loss, "val_loss": val_loss,
                               "val_" + metric: val.get(metric) if metric != "loss" else val_loss})
        selector.offer(val, val_loss, info,
                       state_fn=lambda: {k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
        log.info("epoch %d/%d step %d: train loss %.4f, val loss %.4f, val %s %s", epoch + 1, epochs, done,
                 train_loss, val_loss, metric, val.get(metric))
        if writer is not None:
            writer.add_scalar("finetune/val_loss", val_loss, epoch + 1)
            if metric != "loss" and val.get(metric) is not None:
                writer.add_scalar(f"finetune/val_{metric}", val[metric], epoch + 1)

    def save(done: int) -> None:
        if resume_path is None or not ctx.is_main:
            return
        end_of_epoch = done % steps_per_epoch == 0 or done == total
        epoch, batches_done = divmod(done, steps_per_epoch) if not end_of_epoch else (math.ceil(done / steps_per_epoch), 0)
        atomic_save({"format": "visionfm-cls-finetune-state/1", "model": model.state_dict(),
                     "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                     "selector": {"best_key": list(selector.best_key) if selector.best_key else None,
                                  "best": _plain(selector.best), "state": selector.state},
                     "history": _plain(run["history"]), "step": done, "epoch": epoch, "batches_done": batches_done,
                     "running": run["running"], "seen": run["seen"],
                     "epoch_generator": gen.get_state() if end_of_epoch else run["epoch_generator"],
                     "rng_torch": torch.get_rng_state(), "rng_numpy": _numpy_state(),
                     "extra": _plain(extra)}, resume_path)

    every = int(cfg.checkpoint_every_steps or 0)
    loop = TrainLoop(ctx, total, "finetune", writer if writer is not None else NullWriter(), items_per_step=batch,
                     log_every=1, val_every=steps_per_epoch, save_every=every,
                     hint="lower finetune.lr or use --precision fp32")
    loop.run(step, validate, save, start)
    model.load_state_dict(selector.state)
    model.eval()
    selection = {"select_metric": metric, **selector.best, "history": run["history"], "steps": total,
                 "base_lr": base_lr, "batch_size": batch, **(extra or {})}
    return model, selection


def interpolate_weights(start: Dict[str, Tensor], end: Dict[str, Tensor], alpha: float) -> Dict[str, Tensor]:
    """WiSE-FT (Wortsman et al., CVPR 2022): the weights ``(1 - alpha) * start + alpha * end`` of two states of one
    model (before and after fine-tuning). ``alpha`` 1 is the fine-tuned model, 0 the one it started from.

    Raises:
        ValueError: ``alpha`` outside [0, 1], or the two states do not hold the same tensors.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"the interpolation weight must lie in [0, 1], got {alpha}")
    if start.keys() != end.keys():
        raise ValueError(f"the two states differ: only before fine-tuning {sorted(start.keys() - end.keys())}, "
                         f"only after {sorted(end.keys() - start.keys())}")
    out = {}
    for name, after in end.items():
        before = start[name]
        if before.shape != after.shape:
            raise ValueError(f"{name}: shape {tuple(before.shape)} before fine-tuning, {tuple(after.shape)} after")
        # integer buffers (counters) are not weights: they are taken from the fine-tuned state
        out[name] = torch.lerp(before.to(after), after, alpha) if after.is_floating_point() else after.clone()
    return out


def _plain(value: Any) -> Any:
    """``value`` with numpy scalars as Python numbers, so that ``weights_only=True`` loading accepts it."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _numpy_state() -> list:
    """numpy's global random state as plain lists and numbers (loadable with ``weights_only=True``)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, np.asarray(keys).tolist(), int(pos), int(has_gauss), float(cached)]


def _restore(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
             scaler: Optional["torch.amp.GradScaler"], selector: Selector, generator: torch.Generator) -> Dict[str, Any]:
    """Load a state written by :func:`finetune` into the given parts; returns the loop's counters."""
    state = safe_load(path)
    if not isinstance(state, dict) or state.get("format") != "visionfm-cls-finetune-state/1":
        raise ValueError(f"{path}: not a fine-tuning state written by downstream/cls.py; move it away or use a new "
                         "--output")
    model.load_state_dict(state["model"])  # strict: the same model, or a clear error listing the keys
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    chosen = state["selector"]
    selector.best_key = tuple(chosen["best_key"]) if chosen["best_key"] is not None else None
    selector.best, selector.state = dict(chosen["best"]), chosen["state"]
    generator.set_state(state["epoch_generator"])
    rng = state["rng_numpy"]
    state["rng_numpy"] = (rng[0], np.asarray(rng[1], dtype=np.uint32), rng[2], rng[3], rng[4])
    return state

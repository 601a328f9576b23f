"""Linear (or small MLP) probes trained on cached frozen features.

For every weight decay of a grid, a head is trained with AdamW and a cosine learning-rate schedule on the
training features, on the shared training loop (:class:`visionfm.engine.loop.TrainLoop`); after each epoch it is
scored on the validation features, and the (weight decay, epoch) with the best validation metric is kept. The test
split plays no part.

Example:
    >>> import torch
    >>> from visionfm.tasks.classification.task import ClassificationTask
    >>> task = ClassificationTask("multiclass", ("a", "b"))
    >>> x = torch.cat([torch.randn(20, 8) + 2, torch.randn(20, 8) - 2]); y = torch.tensor([0] * 20 + [1] * 20)
    >>> head, sel = train_probe(x, y, x, y, task, ProbeConfig(epochs=5, weight_decays=(0.0,)))
    >>> sel["val_auroc"]
    1.0
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ...engine.loop import NullWriter, RunContext, TrainLoop
from .heads import Standardize, build_head
from .selection import Selector, resolve_select_metric, split_metrics
from .task import ClassificationTask

__all__ = ["CLASS_WEIGHTS", "ProbeConfig", "cosine_schedule", "train_probe"]

log = logging.getLogger(__name__)

#: ``class_weight`` choices of the probe's loss.
CLASS_WEIGHTS = ("none", "balanced")


@dataclass
class ProbeConfig:
    """Settings of a probe (the ``linear`` section of ``configs/cls/default.yaml``)."""

    head: str = "linear"
    epochs: int = 100
    lr: float = 1e-3
    min_lr: float = 0.0
    warmup_epochs: int = 0
    batch_size: int = 256
    weight_decays: Sequence[float] = (0.0, 0.01, 0.1, 1.0, 10.0)
    hidden_dim: int = 512
    dropout: float = 0.0
    standardize_prior: float = 10.0
    class_weight: str = "none"  # none | balanced (multi-class: every class the same total weight in the loss)
    max_steps: Optional[int] = None  # per weight decay candidate


def cosine_schedule(base: float, final: float, total_steps: int, warmup_steps: int = 0) -> Tensor:
    """Per-step values: linear warm-up from 0 to ``base``, then a half cosine to ``final`` (precomputed and
    indexed by step, as DINO does)."""
    total_steps = max(int(total_steps), 1)
    warmup_steps = min(int(warmup_steps), total_steps)
    warm = torch.linspace(0.0, base, warmup_steps + 1)[1:] if warmup_steps else torch.empty(0)
    rest = total_steps - warmup_steps
    t = torch.arange(rest, dtype=torch.float64) / max(rest, 1)
    cos = final + 0.5 * (base - final) * (1 + torch.cos(math.pi * t))
    return torch.cat([warm, cos.float()])


def _param_groups(head: nn.Module, weight_decay: float):
    decay = [p for p in head.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in head.parameters() if p.requires_grad and p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class _Prefixed:
    """A TensorBoard writer whose tags get a prefix: each weight decay's loop logs to its own section."""

    def __init__(self, writer: Any, prefix: str) -> None:
        self.writer, self.prefix = writer, prefix

    def add_scalar(self, tag: str, *args: Any, **kwargs: Any) -> None:
        self.writer.add_scalar(f"{self.prefix}/{tag}", *args, **kwargs)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:  # the caller's writer outlives the candidates
        pass


def train_probe(train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor, task: ClassificationTask,
                cfg: ProbeConfig, select_metric: str = "auto", seed: int = 0,
                device: "torch.device | str" = "cpu", writer=None,
                ctx: Optional[RunContext] = None) -> Tuple[nn.Module, Dict[str, Any]]:
    """Train a probe for each weight decay and return the one selected on validation.

    Each candidate runs on :class:`~visionfm.engine.loop.TrainLoop` (progress bar, NaN/inf guard, TensorBoard
    scalars under ``probe_wd_<wd>/``), one validation per epoch. The loop only wraps the steps: the head, the
    batches, the schedule and the selection are those of the probe's own loop before (the same numbers). Under
    ``torchrun`` every rank trains the same probe (the loop agrees on stop requests after every step, so every
    rank must call this); only rank 0 shows progress (``ctx``).

    Args:
        train_x, train_y: Training features ``(N, D)`` and targets.
        val_x, val_y: Validation features and targets (selection only).
        task: The task.
        cfg: Probe settings.
        select_metric: Validation metric deciding the weight decay and epoch (``auto``: AUROC, kappa for
            ordinal grading).
        seed: Seed of the head initialisation and batch order.
        device: Where to train (the features are small; the CPU is fine).
        writer: Optional TensorBoard ``SummaryWriter``.
        ctx: The run's context (rank 0 shows the progress bars); default: one process.

    Returns:
        ``(head, selection)``; the head is in eval mode on the CPU; ``selection`` holds the chosen weight
        decay, epoch, step, validation metric and loss, and the per-candidate best values.
    """
    device = torch.device(device)
    ctx = ctx or RunContext(device)
    metric = resolve_select_metric(task, select_metric)
    n = train_x.shape[0]
    if n == 0:
        raise ValueError("no training features")
    if cfg.class_weight not in CLASS_WEIGHTS:
        raise ValueError(f"class_weight must be one of {', '.join(CLASS_WEIGHTS)}, got {cfg.class_weight!r}")
    weights = task.balanced_class_weights(train_y) if cfg.class_weight == "balanced" else None
    norm = Standardize.fit(train_x, prior=cfg.standardize_prior)
    batch = min(cfg.batch_size, n)
    steps_per_epoch = math.ceil(n / batch)
    total = cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    lrs = cosine_schedule(cfg.lr, cfg.min_lr, total, cfg.warmup_epochs * steps_per_epoch)
    xt, yt = train_x.to(device), train_y.to(device)
    xv, yv = val_x.to(device), val_y
    selector = Selector(metric)
    candidates = []
    for wd in cfg.weight_decays:
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        head = build_head(cfg.head, train_x.shape[1], task, cfg.hidden_dim, cfg.dropout, copy.deepcopy(norm)).to(device)
        opt = torch.optim.AdamW(_param_groups(head, float(wd)), lr=cfg.lr)
        local = Selector(metric)
        epoch_order: List[Tensor] = []

        def step(index: int) -> Dict[str, float]:
            start = (index % steps_per_epoch) * batch
            if start == 0:  # a new epoch: its shuffle, drawn as the epoch starts
                head.train()
                epoch_order[:] = [torch.randperm(n, generator=gen).to(device)]
            idx = epoch_order[0][start:start + batch]
            for group in opt.param_groups:
                group["lr"] = float(lrs[index])
            loss = task.loss(head(xt[idx]), yt[idx], weights)
            value = float(loss.detach())
            if math.isfinite(value):  # a NaN stops the loop (NonFiniteLossError) before the head is updated
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            return {"loss": value, "lr": float(lrs[index])}

        def validate(done: int) -> None:
            epoch = (done - 1) // steps_per_epoch + 1
            head.eval()
            with torch.no_grad():
                logits = head(xv).cpu()
            val_loss = float(task.loss(logits, yv, weights))
            val = split_metrics(task, task.probabilities(logits), yv)
            info = {"weight_decay": float(wd), "epoch": epoch, "step": done}
            local.offer(val, val_loss, info)
            selector.offer(val, val_loss, info, state_fn=lambda: copy.deepcopy(head.state_dict()))
            if writer is not None:
                writer.add_scalar(f"probe_wd_{wd:g}/val_loss", val_loss, epoch)
                if metric != "loss" and val.get(metric) is not None:
                    writer.add_scalar(f"probe_wd_{wd:g}/val_{metric}", val[metric], epoch)

        # the train scalars once per epoch: the steps are tiny and many (full-batch probes: one per epoch anyway)
        TrainLoop(ctx, total, f"probe wd {wd:g}", _Prefixed(writer, f"probe_wd_{wd:g}") if writer is not None
                  else NullWriter(), items_per_step=batch, log_every=steps_per_epoch, val_every=steps_per_epoch,
                  hint="lower linear.lr").run(step, validate)
        candidates.append(local.best)
        log.info("probe weight decay %g: best val %s %s at epoch %d", wd, metric,
                 _fmt(local.best.get("val_" + metric)), local.best["epoch"])
    best = build_head(cfg.head, train_x.shape[1], task, cfg.hidden_dim, cfg.dropout, copy.deepcopy(norm))
    best.load_state_dict(selector.state)
    best.eval()
    selection = {"select_metric": metric, **selector.best, "class_weight": cfg.class_weight, "candidates": candidates,
                 "steps_per_candidate": total}
    return best, selection


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) and math.isfinite(value) else str(value)

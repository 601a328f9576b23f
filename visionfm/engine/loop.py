"""The training loop every trainer runs on (pretraining: DINO, iBOT, MAE; CLIP; fine-tuning, segmentation,
detection), and the parts it is made of.

A trainer supplies ``step(step) -> stats`` (one optimiser step; ``stats["loss"]`` is the loss), ``save(steps_done)``
(write its resume state) and, where it has one, ``validate(step)`` (score the model, keep the best checkpoint).
:class:`TrainLoop` owns the rest: the progress bar (loss, throughput, ETA), TensorBoard scalars, the NaN/inf guard,
SIGTERM/SIGINT to a saved state, a wall-clock budget, periodic saves and validation, all agreed across the ranks of
a ``torchrun`` job; with ``lazy=True`` (pretraining) it does so without reading GPU values between logging steps.

:class:`RunContext` is the run's place in the process group: rank 0 alone writes files and TensorBoard events
(:meth:`RunContext.writer`), each rank trains on its slice of every global batch (:meth:`RunContext.part`), the
model's gradients are averaged across ranks (:meth:`RunContext.wrap`, :meth:`RunContext.average_gradients`) and
validation metrics are averaged or gathered across ranks (:meth:`RunContext.mean`, :meth:`RunContext.gather_rows`).
Without ``torchrun`` it is one process of rank 0 and every method is the identity.

Equivalence with one process: a global batch of ``B`` cut into equal rank slices gives each rank the mean loss of
its ``B / world`` items; DDP averages the gradients, which is the gradient of the mean over all ``B`` items. So two
processes with ``--batch-size b`` train as one process with ``2b`` wherever the loss is a mean over items and nothing
in the model couples the items of a batch (BatchNorm statistics and batch-level losses such as Dice do).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..errors import NonFiniteLossError
from .checkpoint import stop_requests
from .distributed import DistInfo, any_rank, init_distributed

__all__ = ["cosine_schedule", "RunContext", "NullWriter", "progress", "TrainLoop"]

log = logging.getLogger("visionfm.engine")


# ----------------------------------------------------------------------------------------------- schedule

def cosine_schedule(base: float, final: float, total: int, warmup: int = 0,
                    warmup_start: Optional[float] = None) -> np.ndarray:
    """Per-step values (float64, indexed by the global step): a linear warm-up to ``base`` over ``warmup`` steps,
    then a half cosine from ``base`` to ``final`` over the remaining steps.

    ``warmup_start=None`` (the downstream trainers): warm-up step ``s`` is ``base * (s + 1) / warmup``, so the first
    step already trains; a number (DINO's ``cosine_scheduler``, CLIP): the warm-up runs from that value, step 0
    included, to ``base`` exclusive.
    """
    total = max(int(total), 1)
    warmup = max(0, min(int(warmup), total))
    if not warmup:
        warm = np.empty(0)
    elif warmup_start is None:
        warm = (np.arange(warmup, dtype=np.float64) + 1) / warmup * base
    else:
        warm = np.linspace(warmup_start, base, warmup, endpoint=False)
    rest = np.arange(total - warmup, dtype=np.float64)
    span = max(total - warmup, 1)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * rest / span))
    return np.concatenate([warm, cosine]).astype(np.float64)


# ----------------------------------------------------------------------------------------------- context

class NullWriter:
    """What ranks other than 0 log to: TensorBoard's ``SummaryWriter`` calls, doing nothing."""

    def add_scalar(self, *args: Any, **kwargs: Any) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class RunContext:
    """A run's device, place in the process group and output folder.

    Args:
        device: The training device (``cuda:<LOCAL_RANK>`` under ``torchrun`` on GPUs).
        dist: Rank and world size (:func:`visionfm.engine.distributed.init_distributed`).
        output: The run folder (rank 0 writes it).
    """

    device: torch.device
    dist: DistInfo = field(default_factory=DistInfo)
    output: Optional[Path] = None

    @classmethod
    def start(cls, device: torch.device, output: "str | Path | None" = None) -> "RunContext":
        """Join the ``torchrun`` process group, if any, and create the run folder on rank 0."""
        ctx = cls(device, init_distributed(device), Path(output) if output is not None else None)
        if ctx.is_main and ctx.output is not None:
            ctx.output.mkdir(parents=True, exist_ok=True)
        if not ctx.is_main:  # one log: the other ranks report warnings and errors only
            logging.getLogger().setLevel(logging.WARNING)
        return ctx

    @property
    def rank(self) -> int:
        return self.dist.rank

    @property
    def world_size(self) -> int:
        return self.dist.world_size

    @property
    def is_main(self) -> bool:
        return self.dist.rank == 0

    @property
    def distributed(self) -> bool:
        return self.dist.enabled and dist.is_available() and dist.is_initialized()

    # -- writing ------------------------------------------------------------------------------------------
    def writer(self, folder: str = "tensorboard"):
        """A TensorBoard ``SummaryWriter`` in ``<output>/<folder>`` on rank 0; a :class:`NullWriter` elsewhere
        (every rank logging the same scalars would write duplicate event files)."""
        if not self.is_main or self.output is None:
            return NullWriter()
        from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 - tensorboard is slow to import

        return SummaryWriter(str(self.output / folder))

    def barrier(self) -> None:
        """Wait for every rank (after rank 0 wrote a file the others read)."""
        if self.distributed:
            dist.barrier()

    # -- data -----------------------------------------------------------------------------------------------
    def part(self, count: int) -> slice:
        """This rank's contiguous share of ``count`` items (a global batch): ranks get equal parts when ``count``
        divides by the world size, else the first ones one item fewer."""
        world, rank = self.world_size, self.rank
        return slice(rank * count // world, (rank + 1) * count // world)

    def shard(self, items: Any) -> Any:
        """``items[self.part(len(items))]`` (a tensor or a list)."""
        return items[self.part(len(items))]

    def loss_weight(self, local: int, total: int) -> float:
        """The factor that turns a rank's mean loss over its ``local`` of ``total`` items into its share of the
        global mean once DDP averages the gradients: ``local * world / total`` (1 for equal parts)."""
        return local * self.world_size / max(total, 1)

    # -- gradients and metrics -----------------------------------------------------------------------------
    def wrap(self, model: nn.Module, find_unused_parameters: bool = False) -> nn.Module:
        """``model`` in :class:`~torch.nn.parallel.DistributedDataParallel` under ``torchrun`` (gradients averaged
        across ranks during backward), else ``model`` itself. A model without trainable parameters is returned
        as it is (DDP refuses it, and there is nothing to average)."""
        if not self.distributed or not any(p.requires_grad for p in model.parameters()):
            return model
        from torch.nn.parallel import DistributedDataParallel  # noqa: PLC0415

        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                       find_unused_parameters=find_unused_parameters)

    def average_gradients(self, parameters: Iterable[Tensor]) -> None:
        """Average the ``.grad`` of ``parameters`` across ranks (for models whose forward is not one call that DDP
        can wrap, e.g. CLIP's projections called piecewise). A missing gradient counts as zero."""
        if not self.distributed:
            return
        for p in parameters:
            if not p.requires_grad:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(self.world_size)

    def gather_with_grad(self, tensor: Tensor) -> Tensor:
        """Every rank's ``tensor`` (equal shapes), concatenated in rank order, with gradients flowing back to each
        rank's own part (lightly's ``GatherLayer``): contrastive losses then see the global batch."""
        if not self.distributed:
            return tensor
        from lightly.utils.dist import gather  # noqa: PLC0415

        return torch.cat(gather(tensor.contiguous()), dim=0)

    def gather_rows(self, tensor: Tensor) -> Tensor:
        """Every rank's rows of ``tensor`` (the same trailing shape, any number of rows), concatenated in rank
        order, without gradients; the result is on ``tensor``'s device on every rank."""
        if not self.distributed:
            return tensor
        parts: List[Any] = [None] * self.world_size
        dist.all_gather_object(parts, tensor.detach().cpu())
        return torch.cat(parts, dim=0).to(tensor.device)

    def gather_objects(self, obj: Any) -> List[Any]:
        """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` without a process group."""
        if not self.distributed:
            return [obj]
        parts: List[Any] = [None] * self.world_size
        dist.all_gather_object(parts, obj)
        return parts

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (what rank 0 alone computed, e.g. the test metrics)."""
        if not self.distributed:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def mean(self, values: Dict[str, float], weight: float = 1.0) -> Dict[str, float]:
        """The ``weight``-weighted mean of each value over ranks (each rank weighs in with its item count); NaN
        values stay NaN. Without a process group: ``values``."""
        if not self.distributed:
            return dict(values)
        keys = sorted(values)
        packed = torch.tensor([float(values[k]) * weight for k in keys] + [weight], dtype=torch.float64)
        parts: List[Any] = [None] * self.world_size
        dist.all_gather_object(parts, packed)
        total = torch.stack(parts).sum(0)
        return {k: float(total[i] / total[-1]) for i, k in enumerate(keys)}


# ----------------------------------------------------------------------------------------------- progress

def progress(total: int, desc: str, initial: int = 0, enabled: bool = True, unit: str = "step"):
    """A tqdm bar on stderr with rate and ETA. In a log file (not a terminal) it still prints when it starts, every
    30 s and when it ends, so a non-interactive run shows its progress too; ``enabled=False`` (ranks other than 0)
    prints nothing."""
    from tqdm import tqdm  # noqa: PLC0415

    tty = sys.stderr.isatty()
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled, file=sys.stderr,
                mininterval=1.0 if tty else 30.0, dynamic_ncols=tty, ascii=None if tty else True)


# ----------------------------------------------------------------------------------------------- the loop

@dataclass
class TrainLoop:
    """Steps ``start .. total - 1`` of a trainer, with everything around them.

    After every step: the loss is checked (NaN/inf on any rank stops every rank with :class:`NonFiniteLossError`
    before anything is saved); scalars go to TensorBoard every ``log_every`` steps; every ``val_every`` steps and
    after the last one ``validate(steps_done)`` runs and then ``save(steps_done)``; in between ``save`` runs every
    ``save_every`` steps; a SIGTERM/SIGINT on any rank makes every rank save after the same step and exit with
    ``128 + signal``; with ``max_seconds`` the step that crosses the wall-clock budget is the last one (saved,
    then :meth:`run` returns early). ``save`` writes the trainer's resume state (the trainer decides what and,
    through :class:`RunContext`, that rank 0 writes it).

    ``lazy`` is for trainers whose steps must not wait for the GPU (pretraining): a step may return its stats as
    tensors on the device, and the loop reads them on the host only where a value is needed anyway: at the steps
    whose loss the step returned as a number (the trainer's logging steps, which it picks through its own
    ``log_every``), before every validation and save, at a stop and after the last step; those steps log all their
    scalars, the others the values that are host numbers already (learning rate, timings). In between, whether
    every loss was finite is kept as a flag on the device (no synchronisation), so a NaN is still caught before
    anything is saved; the message then names the steps it happened between.

    The throughput (progress bar, ``train/<items>_per_s``) is the loop's step time unless the step reports
    ``<items>_per_s`` itself (e.g. timed without the wait for the data loader).

    Args:
        ctx: The run context.
        total: Steps of the run (``--max-steps`` applied).
        desc: The progress bar's label.
        writer: TensorBoard writer (:meth:`RunContext.writer`).
        items_per_step: Items of a global batch, for the throughput.
        log_every, val_every, save_every: Intervals in steps (``val_every`` 0: validate after the last step only;
            ``save_every`` 0: save at validations only). With ``lazy`` the trainer's numeric losses set the
            logging steps instead of ``log_every``.
        hint: What the NaN message suggests changing.
        lazy: Read tensor stats on the host only where needed (above).
        max_seconds: Wall-clock budget of this invocation (``None``/0: none), agreed across ranks.
        items: What an item is, for the progress bar and the throughput's TensorBoard tag (``train/<items>_per_s``).
    """

    ctx: RunContext
    total: int
    desc: str
    writer: Any = field(default_factory=NullWriter)
    items_per_step: int = 1
    log_every: int = 20
    val_every: int = 0
    save_every: int = 0
    hint: str = "lower the learning rate or use --precision fp32"
    lazy: bool = False
    max_seconds: Optional[float] = None
    items: str = "items"
    seconds: float = 0.0  # training seconds of this run (set by run)
    last: Dict[str, float] = field(default_factory=dict)  # the last step's stats as floats (lazy: the last read)
    _finite: Optional[Tensor] = field(default=None, init=False, repr=False)  # lazy: every loss since the last read
    _read_at: int = field(default=0, init=False, repr=False)  # lazy: steps done at the last read

    def run(self, step: Callable[[int], Dict[str, Any]], validate: Optional[Callable[[int], None]] = None,
            save: Optional[Callable[[int], None]] = None, start: int = 0) -> int:
        """Run the steps; returns the number of steps done in all (``total``, or fewer when ``max_seconds``
        ended the run)."""
        bar = progress(self.total, self.desc, initial=start, enabled=self.ctx.is_main)
        t_start = time.perf_counter()
        self._finite, self._read_at = None, start
        done = start
        try:
            with stop_requests("the training state") as signals:
                for index in range(start, self.total):
                    t0 = time.perf_counter()
                    stats = step(index)
                    done = index + 1
                    late = bool(self.max_seconds) and time.perf_counter() - t_start >= float(self.max_seconds)
                    validate_now = validate is not None and (
                        (self.val_every and done % self.val_every == 0) or done == self.total)
                    save_now = save is not None and ((self.val_every and done % self.val_every == 0)
                                                     or done == self.total
                                                     or (self.save_every and done % self.save_every == 0))
                    # One host-side agreement per step: a NaN on one rank or a signal that reached one rank first
                    # must stop all of them after the same step, or the others would wait in the next collective.
                    if self.lazy and isinstance(stats["loss"], Tensor):
                        finite = torch.isfinite(stats["loss"].detach())  # on the device: no synchronisation
                        self._finite = finite if self._finite is None else self._finite & finite
                        read = validate_now or save_now or done == self.total
                        stop, late, bad = any_rank(bool(signals), late, read and not self._read_finite(done))
                        if (stop or late) and not read:  # the same on every rank: the flags were agreed
                            bad, = any_rank(not self._read_finite(done))
                            read = True
                    else:
                        read = True
                        loss = float(stats["loss"])
                        finite = math.isfinite(loss) and (not self.lazy or self._read_finite(done))
                        stop, late, bad = any_rank(bool(signals), late, not finite)
                    if bad:
                        raise NonFiniteLossError(f"{self.desc}: {self._bad_loss(stats['loss'], done)}; {self.hint}. "
                                                 "Saved states hold the last good weights")
                    rate_key = f"{self.items}_per_s"
                    rate = self.items_per_step / max(time.perf_counter() - t0, 1e-9)
                    if isinstance(stats.get(rate_key), (int, float)):  # the trainer timed its step itself
                        rate = float(stats[rate_key])
                    if read:
                        self.last = {k: float(v) for k, v in stats.items() if isinstance(v, (int, float, Tensor))
                                     and (not isinstance(v, Tensor) or v.numel() == 1)}
                        bar.set_postfix({"loss": f"{self.last['loss']:.4f}", f"{self.items}_s": f"{rate:.1f}"},
                                        refresh=False)
                    bar.update(1)
                    scalars: Optional[Dict[str, float]] = None
                    if read and self._log_now(index, start):
                        scalars = dict(self.last)
                    elif self.lazy:  # what is on the host already costs nothing to log: every step, as before
                        scalars = {k: float(v) for k, v in stats.items() if isinstance(v, (int, float))}
                    if scalars is not None:
                        scalars.setdefault(rate_key, rate)
                        for key, value in scalars.items():
                            self.writer.add_scalar(f"train/{key}", value, done)
                    saved = False
                    if validate_now:
                        validate(done)
                        self.writer.flush()
                    if save is not None and (save_now or stop or late):
                        save(done)
                        saved = True
                    if stop:
                        signum = signals[0] if signals else 15  # a rank told by another: SIGTERM's status
                        log.warning("stopped after step %d%s; run the same command again to resume", done,
                                    " (state saved)" if saved else "")
                        raise SystemExit(128 + signum)
                    if late:
                        log.info("the time budget of %s s is used up after step %d%s; run the same command again to "
                                 "go on", self.max_seconds, done, " (state saved)" if saved else "")
                        break
        finally:
            bar.close()
            self.seconds = time.perf_counter() - t_start
        return done

    def _log_now(self, index: int, start: int) -> bool:
        """Whether a step's scalars (once read) go to TensorBoard: every ``log_every`` steps, the first step of a
        run and the last; lazy: every step whose values were read (the trainer's logging steps, saves, the end)."""
        done = index + 1
        return self.lazy or done == self.total or index == start or done % max(1, self.log_every) == 0

    def _read_finite(self, done: int) -> bool:
        """Lazy mode: whether every loss since the last read was finite (one host synchronisation); resets the
        flag."""
        finite = True if self._finite is None else bool(self._finite)
        self._finite = None
        if finite:
            self._read_at = done
        return finite

    def _bad_loss(self, loss: Any, done: int) -> str:
        """What the NaN message says about the loss of step ``done`` (and, lazily read, the steps before it)."""
        value = float(loss.detach()) if isinstance(loss, Tensor) else float(loss)
        if self.lazy and self._read_at < done - 1:  # the losses of the steps since the last read were not looked at
            return (f"the loss became NaN or infinite between steps {self._read_at + 1} and {done}"
                    + (f" (it is {value} at step {done})" if not math.isfinite(value) else ""))
        if not math.isfinite(value):
            return f"the loss is {value} at step {done}"
        return f"the loss became NaN or infinite at step {done} on another rank"

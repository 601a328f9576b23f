"""The shared training loop (visionfm.engine.loop): one cosine schedule, the loop's NaN guard, validation and save
points and signal handling, and under torchrun two gloo processes that train as one process with the doubled
batch while only rank 0 writes."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from visionfm.engine.loop import RunContext, TrainLoop, cosine_schedule
from visionfm.errors import NonFiniteLossError

WORKER = Path(__file__).with_name("_loop_worker.py")


def test_cosine_schedule_conventions():
    values = cosine_schedule(1.0, 0.1, 10, warmup=2)
    assert values[0] == 0.5 and values[1] == 1.0 and values[2] == 1.0 and values[-1] > 0.1
    assert np.all(np.diff(values[2:]) <= 0)
    dino = cosine_schedule(1.0, 0.1, 10, warmup=2, warmup_start=0.0)  # DINO's: the warm-up starts at its value
    assert dino[0] == 0.0 and dino[1] == 0.5 and np.array_equal(dino[2:], values[2:])


def test_single_process_context_is_the_identity():
    ctx = RunContext(torch.device("cpu"))
    x = torch.arange(6.0)
    assert ctx.is_main and ctx.part(6) == slice(0, 6) and torch.equal(ctx.shard(x), x)
    assert ctx.gather_with_grad(x) is x and torch.equal(ctx.gather_rows(x), x)
    assert ctx.mean({"a": 2.0}) == {"a": 2.0} and ctx.loss_weight(3, 3) == 1.0 and ctx.broadcast(5) == 5
    two = RunContext(torch.device("cpu"), dist=type(ctx.dist)(rank=1, world_size=2))
    assert two.part(5) == slice(2, 5) and two.loss_weight(3, 5) == pytest.approx(1.2) and not two.is_main


def test_loop_validates_saves_and_stops_on_nan():
    ctx = RunContext(torch.device("cpu"))
    calls = []
    loop = TrainLoop(ctx, total=7, desc="t", val_every=3, save_every=2)
    loop.run(lambda i: {"loss": 1.0 / (i + 1)}, lambda d: calls.append(("val", d)), lambda d: calls.append(("save", d)))
    assert calls == [("save", 2), ("val", 3), ("save", 3), ("save", 4), ("val", 6), ("save", 6), ("val", 7),
                     ("save", 7)]
    saved = []
    with pytest.raises(NonFiniteLossError, match="step 3"):
        TrainLoop(ctx, total=5, desc="t", save_every=1).run(
            lambda i: {"loss": float("nan") if i == 2 else 1.0}, None, saved.append)
    assert saved == [1, 2]  # nothing saved after the NaN step


def test_loop_saves_and_exits_on_sigterm():
    ctx = RunContext(torch.device("cpu"))
    saved = []

    def step(index):
        if index == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return {"loss": 1.0}

    with pytest.raises(SystemExit) as stop:
        TrainLoop(ctx, total=10, desc="t").run(step, None, saved.append, start=0)
    assert stop.value.code == 128 + signal.SIGTERM and saved == [2]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is put back


def _run(mode, out, batch, world):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    prefix = [sys.executable] if world == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  "--nproc_per_node", str(world)]
    result = subprocess.run(prefix + [str(WORKER), mode, str(out), str(batch)], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out / "weights.pt", weights_only=True), result


@pytest.mark.parametrize("mode", ["finetune", "clip"])
def test_two_gloo_processes_train_as_one_with_the_doubled_batch(tmp_path, mode):
    """Fine-tuning (uneven last batch, sharded validation, resumable state) and CLIP's gathered contrastive loss:
    the weights of 2 processes with batch b equal those of 1 process with 2b (up to the order of float sums)."""
    single, _ = _run(mode, tmp_path / "one", 4, 1)
    double, result = _run(mode, tmp_path / "two", 2, 2)
    flat = lambda d: {f"{k}.{n}": v for k, sub in d.items() for n, v in (sub.items() if isinstance(sub, dict) else [("", sub)])}  # noqa: E731
    a, b = (flat(single), flat(double)) if mode == "clip" else (single, double)
    assert a.keys() == b.keys() and len(a) >= 3
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)
    if mode == "finetune":  # rank 0 alone writes: one TensorBoard event file, one progress bar
        events = list((tmp_path / "two" / "tensorboard").glob("events.*"))
        assert len(events) == 1 and (tmp_path / "two" / "state.pt").is_file()
        assert result.stderr.count("finetune: 100%") == 1


def test_lazy_loop_reads_device_losses_only_at_logging_steps_saves_and_the_end(tmp_path):
    """lazy=True (pretraining): tensors a step returns stay unread except at the steps whose loss the trainer read
    (a float), before saves and after the last step; only those steps log the loss, every step logs its host
    numbers (the learning rate, the throughput)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ctx = RunContext(torch.device("cpu"), output=tmp_path)
    writer = ctx.writer()
    saved = []

    def step(index):
        loss = torch.tensor(10.0 - index)
        return {"loss": float(loss) if index == 1 else loss, "lr": 0.5}  # step 2 (index 1) is a logging step

    loop = TrainLoop(ctx, total=6, desc="t", writer=writer, save_every=4, lazy=True, items="images")
    assert loop.run(step, None, saved.append, start=0) == 6
    writer.close()
    assert saved == [4, 6] and loop.last == {"loss": 5.0, "lr": 0.5}
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6]  # the logging step, the save, the end
    assert [e.value for e in events.Scalars("train/loss")] == [9.0, 7.0, 5.0]
    assert [e.step for e in events.Scalars("train/lr")] == [1, 2, 3, 4, 5, 6]  # host numbers: every step
    assert [e.step for e in events.Scalars("train/images_per_s")] == [1, 2, 3, 4, 5, 6]


def test_time_budget_saves_and_ends_the_run_after_the_step_that_crosses_it():
    ctx = RunContext(torch.device("cpu"))
    saved = []
    loop = TrainLoop(ctx, total=10, desc="t", save_every=0, max_seconds=1e-9)
    assert loop.run(lambda i: {"loss": 1.0}, None, saved.append, start=3) == 4  # one step, then out of time
    assert saved == [4]

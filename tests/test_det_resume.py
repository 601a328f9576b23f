"""``downstream/det.py`` killed with SIGKILL at a random step and rerun with the same command ends with exactly the
weights, best checkpoint and test metrics of an uninterrupted run (the command as users run it, in a subprocess,
one CPU thread so that both runs do the same float operations)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from test_det_data import make_fake_idrid
from test_det_model import TINY_MMDET

ROOT = Path(__file__).resolve().parents[1]
STEPS, EVERY = 16, 2  # optim.steps and train.checkpoint_every_steps (validation every 8)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def det_command(data_root: Path, output: Path) -> list:
    mmdet = "{" + ", ".join(f"{k}: {v}" for k, v in TINY_MMDET["retinanet"].items()) + "}"
    return [sys.executable, str(ROOT / "downstream" / "det.py"), "--dataset", "IDRiD", "--target", "od",
            "--data-root", str(data_root), "--output", str(output), "--random-init", "--device", "cpu",
            "--set", "data.max_size=64", "--set", f"model.mmdet={mmdet}", "--set", "optim.batch_size=2",
            "--set", "data.val_count=2", "--set", "eval.pngs=0", "--set", f"optim.steps={STEPS}",
            "--set", "train.eval_every=8", "--set", f"train.checkpoint_every_steps={EVERY}",
            # drop-path, flips and jitter on: the resumed run must restore the random streams and the data order
            "--set", "model.drop_path_rate=0.2", "--set", "data.hflip=0.5", "--set", "data.color_jitter=0.2"]


def _saved_step(path: Path) -> int:
    try:  # written atomically: the file is complete or absent
        return int(torch.load(path, weights_only=True)["step"])
    except Exception:  # noqa: BLE001 - not there yet
        return 0


def test_sigkill_at_a_random_step_then_rerun_equals_an_uninterrupted_run(tmp_path: Path):
    root = make_fake_idrid(tmp_path / "data")
    whole = subprocess.run(det_command(root, tmp_path / "whole"), env=ENV, capture_output=True, text=True,
                           timeout=300)
    assert whole.returncode == 0, whole.stderr[-3000:]

    rng = random.Random()
    seed = rng.randrange(10**6)
    rng.seed(seed)
    # at least 3 saves (6 steps, ~1.8 s here) stay ahead of the kill: a tiny step takes ~0.3 s, and a kill 0.62 s
    # after step 6 of 8 once found the run already finished (CI)
    after, delay = rng.choice(range(EVERY, STEPS - 3 * EVERY + 1, EVERY)), rng.uniform(0.0, 0.5)
    out = tmp_path / "killed"
    cmd = det_command(root, out)
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(cmd, env=ENV, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while _saved_step(out / "last.pth") < after and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(delay)  # somewhere inside a later step (or a save: atomic)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    killed_at = _saved_step(out / "last.pth")
    context = f"(random seed {seed}: kill {delay:.2f} s after the state of step {after}; last saved {killed_at})"
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it was killed {context}"
    # killed_at == STEPS: the kill landed in the final test evaluation (a fast machine finishes the last steps
    # within the delay); the rerun must then evaluate without training, which is a resume worth checking too
    assert EVERY <= killed_at <= STEPS, context
    assert not (out / "metrics.json").exists(), context

    rerun = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming {out / 'last.pth'} after step {killed_at}" in rerun.stderr, context

    a = torch.load(tmp_path / "whole" / "last.pth", weights_only=True)
    b = torch.load(out / "last.pth", weights_only=True)
    assert a["step"] == b["step"] == STEPS
    assert a["model"].keys() == b["model"].keys()
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), f"{key} {context}"
    best_a = torch.load(tmp_path / "whole" / "best.pth", weights_only=True)
    best_b = torch.load(out / "best.pth", weights_only=True)
    assert best_a["step"] == best_b["step"]
    assert all(torch.equal(v, best_b["model"][k]) for k, v in best_a["model"].items())
    drop = ("train_time_s", "wall_time_s")
    metrics_a, metrics_b = (json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "whole", out))
    for key in set(metrics_a) | set(metrics_b):
        assert key in drop or metrics_a.get(key) == metrics_b.get(key), key

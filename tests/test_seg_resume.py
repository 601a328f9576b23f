"""A segmentation run SIGKILLed at a random step and run again with the same command ends with the weights of a run
that was never interrupted (bit for bit: one thread, fp32): the resume state (model, optimiser, crop sampler, CPU
generator) written every few steps is enough to replay the lost steps exactly."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from _seg_tiny import TINY, write_line_dataset, write_tiny_encoder

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """(tiny cfp encoder file, generic dataset folder of 4 training and 1 test image)."""
    base = tmp_path_factory.mktemp("inputs")
    return write_tiny_encoder(base / "cfp_vit_tiny.safetensors"), write_line_dataset(base / "lines", {"train": 4, "test": 1})


def _model(path):
    return torch.load(path, weights_only=True)["model"]


def test_sigkill_at_a_random_step_then_rerun_ends_as_an_uninterrupted_run(inputs, tmp_path):
    encoder, data = inputs
    steps = 14
    cmd = [sys.executable, str(REPO / "downstream" / "seg.py"), "--dataset", str(data), "--weights", str(encoder),
           "--finetune", "--set", f"optim.steps={steps}", "--set", "optim.warmup_steps=2", "--set",
           "train.val_every=7", "--set", "train.checkpoint_every_steps=3", "--set", "model.drop_path_rate=0.1",
           *TINY]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole = subprocess.run([*cmd, "--output", str(tmp_path / "whole")], env=env, capture_output=True, text=True,
                           timeout=300)
    assert whole.returncode == 0, whole.stderr[-2000:]

    # Killed after a random number of saves (at steps 3, 6, 7, 9, 12) and a random part of a second later: a
    # random step, usually between two saves, so that some steps are lost and done again by the rerun.
    chooser = random.Random()
    saves_before_kill, delay = chooser.randint(1, 3), chooser.uniform(0.0, 0.6)
    parts = tmp_path / "parts"
    state = parts / "last.pth"
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen([*cmd, "--output", str(parts)], env=env, stdout=log, stderr=subprocess.STDOUT)
    seen, deadline = set(), time.time() + 240
    while len(seen) < saves_before_kill and proc.poll() is None and time.time() < deadline:
        try:
            st = state.stat()
            seen.add((st.st_ino, st.st_mtime_ns))
        except FileNotFoundError:
            pass
        time.sleep(0.01)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL, (
        f"the run ended before the kill (after {saves_before_kill} saves + {delay:.2f} s); make it longer")
    log.close()
    killed_at = torch.load(state, weights_only=True)["step"]
    assert 0 < killed_at < steps

    again = subprocess.run([*cmd, "--output", str(parts)], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"at step {killed_at}" in again.stdout and "resuming" in again.stdout, again.stdout[-2000:]
    assert torch.load(state, weights_only=True)["step"] == steps
    for name in ("last.pth", "best.pth"):
        a, b = _model(tmp_path / "whole" / name), _model(parts / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key, f"killed after save {saves_before_kill} + {delay:.2f} s")
    m_whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    m_parts = json.loads((parts / "metrics.json").read_text())
    assert m_parts["best_step"] == m_whole["best_step"] and m_parts["pooled"] == m_whole["pooled"]
    assert not list(parts.glob(".partial-*"))  # an interrupted atomic save leaves nothing behind once rerun

"""SIGKILL at a random step, then the same command again: DINO, iBOT, MAE and CLIP (the command lines, as
subprocesses, on tiny CPU models) end with exactly the weights of an uninterrupted run.

Each run saves its resume state after every step or two; the test waits for a random number of saves, then for a
random fraction of the time between saves, and kills the process: it dies inside a step, inside a save (the atomic write leaves the
previous checkpoint) or between the two. The rerun resumes from whatever checkpoint is on disk. The random choices
are printed (and can be fixed with ``VISIONFM_KILL_SEED``), so a failure can be repeated.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT
from visionfm.engine.checkpoint import safe_load

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(cmd: List[str]) -> None:
    result = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-1500:] + result.stderr[-1500:]


def _kill_after_saves(cmd: List[str], out: Path, saves: int, fraction: float, timeout: float = 300.0) -> int:
    """Start ``cmd``, count the times ``out/checkpoint.pt`` is replaced (each atomic save renames a new file over
    it: a new inode), and SIGKILL the process ``fraction`` of a save interval (the time between the last two saves
    seen; none after the first save) after the ``saves``-th one. Returns the global step of the checkpoint on disk
    after the kill (checked to be a complete file)."""
    path = out / "checkpoint.pt"
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen, last, times = 0, None, []
    deadline = time.time() + timeout
    try:
        while seen < saves and proc.poll() is None and time.time() < deadline:
            try:
                stat = path.stat()
                ident = (stat.st_ino, stat.st_mtime_ns)
            except FileNotFoundError:
                ident = None
            if ident is not None and ident != last:
                seen, last = seen + 1, ident
                times.append(time.perf_counter())
            time.sleep(0.002)
        if len(times) >= 2:
            time.sleep(fraction * (times[-1] - times[-2]))
    finally:
        proc.send_signal(signal.SIGKILL)
        status = proc.wait()
        stderr = proc.stderr.read()
        proc.stderr.close()
    assert status == -signal.SIGKILL, f"the run ended (status {status}) before it was killed: {stderr[-1500:]}"
    return int(safe_load(path)["global_step"])


def _kill_rerun_compare(cmd, tmp_path: Path, total: int, saves_range, weights) -> None:
    seed = int(os.environ.get("VISIONFM_KILL_SEED", random.SystemRandom().randrange(2 ** 32)))
    rng = random.Random(seed)
    saves, fraction = rng.randint(*saves_range), rng.random()
    note = f"VISIONFM_KILL_SEED={seed}: killed {fraction:.2f} of a save interval after save {saves}"
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    # The uninterrupted run goes on beside the killed one (one thread each: two cores halve the test's time).
    uninterrupted = subprocess.Popen(cmd(ref), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        at_kill = _kill_after_saves(cmd(killed), killed, saves, fraction)
        print(f"{note}; the checkpoint on disk holds step {at_kill} of {total}")
        assert 0 < at_kill < total, note
        _run(cmd(killed))
    finally:
        log, _ = uninterrupted.communicate(timeout=600)
    assert uninterrupted.returncode == 0, log[-3000:]
    a, b = weights(ref), weights(killed)
    assert a.keys() == b.keys() and len(a) > 2, note
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{note}; tensors that differ: {differ[:5]}"


def _checkpoint_tensors(path: Path, *entries: str) -> Dict[str, torch.Tensor]:
    ckpt = safe_load(path)
    return {f"{e}.{k}": v for e in entries for k, v in ckpt[e].items() if isinstance(v, torch.Tensor)}


# ------------------------------------------------------------------------------------------------ DINO, iBOT
@pytest.mark.parametrize("objective", ["dino", "ibot"])
def test_dino_killed_at_a_random_step_resumes_to_the_uninterrupted_weights(tmp_path, objective):
    """8 images in batches of 4 for 4 epochs (8 steps, a save after each), drop-path and multi-crop randomness."""
    def cmd(out: Path) -> List[str]:
        return [sys.executable, str(ROOT / "pretrain" / "dino.py"), "--modality", "oct", "--objective", objective,
                "--arch", "vit_tiny", "--img-size", "32", "--local-crops", "2", "--local-size", "16",
                "--batch-size", "4", "--epochs", "4", "--out-dim", "64", "--set", "head.hidden_dim=32",
                "--set", "head.bottleneck_dim=16", "--set", "data.synthetic_count=8", "--set", "data.load_size=40",
                "--set", "train.threads=1", "--set", "train.log_every=3", "--set", "train.checkpoint_every_steps=1",
                "--device", "cpu", "--seed", "3", "--output", str(out)]

    def weights(out: Path) -> Dict[str, torch.Tensor]:
        return {**{f"encoder.{k}": v for k, v in load_file(out / "encoder.safetensors").items()},
                **_checkpoint_tensors(out / "checkpoint.pt", "student", "teacher", "dino_loss")}

    _kill_rerun_compare(cmd, tmp_path, total=8, saves_range=(1, 5), weights=weights)


# ------------------------------------------------------------------------------------------------ MAE
def test_mae_killed_at_a_random_step_resumes_to_the_uninterrupted_weights(tmp_path):
    """12 images in batches of 4 for 3 epochs (9 steps, a save after each), random crops, flips and masks."""
    def cmd(out: Path) -> List[str]:
        return [sys.executable, str(ROOT / "pretrain" / "mae.py"), "--modality", "oct", "--arch", "vit_tiny",
                "--patch-size", "8", "--img-size", "32", "--batch-size", "4", "--epochs", "3", "--lr", "0.05",
                "--set", "data.synthetic_count=12", "--set", "data.load_size=40", "--set", "mae.decoder_dim=32",
                "--set", "mae.decoder_depth=1", "--set", "mae.decoder_num_heads=4", "--set", "optim.warmup_epochs=1",
                "--set", "train.threads=1", "--set", "train.log_every=3", "--set", "train.checkpoint_every_steps=1",
                "--device", "cpu", "--seed", "3", "--output", str(out)]

    def weights(out: Path) -> Dict[str, torch.Tensor]:  # the encoder, and the decoder in the checkpoint
        return {**{f"encoder.{k}": v for k, v in load_file(out / "encoder.safetensors").items()},
                **_checkpoint_tensors(out / "checkpoint.pt", "model")}

    _kill_rerun_compare(cmd, tmp_path, total=9, saves_range=(1, 6), weights=weights)


# ------------------------------------------------------------------------------------------------ CLIP
@pytest.fixture(scope="module")
def clip_inputs(tmp_path_factory) -> Dict[str, Path]:
    """A tiny random BERT as a local transformers folder, a tiny fundus encoder file and 8 labelled images."""
    from test_clip_model import make_encoder_file
    from test_clip_train import _csv_dataset
    from visionfm.models.text import tiny_text_encoder

    root = tmp_path_factory.mktemp("clip_inputs")
    text = tiny_text_encoder()
    text.model.save_pretrained(root / "tiny_bert")
    text.tokenizer.save_pretrained(root / "tiny_bert")
    return {"text": root / "tiny_bert", "encoder": make_encoder_file(root / "cfp_tiny.safetensors", "cfp", 32),
            "data": _csv_dataset(root / "data", 8)}


def test_clip_killed_at_a_random_step_resumes_to_the_uninterrupted_weights(tmp_path, clip_inputs):
    """2 steps per epoch for 40 epochs (80 steps, a save after each epoch), cached views, dropout and captions
    drawn at random."""
    def cmd(out: Path) -> List[str]:
        return [sys.executable, str(ROOT / "pretrain" / "clip.py"), "--modality", "cfp",
                "--data", str(clip_inputs["data"]), "--image-weights", str(clip_inputs["encoder"]),
                "--text-encoder", str(clip_inputs["text"]), "--embed-dim", "16", "--pool", "avg", "--epochs", "40",
                "--batch-size", "4", "--lr", "0.01", "--set", "data.val_split=null", "--set", "image.cache_views=2",
                "--set", "model.dropout=0.1", "--set", "optim.warmup_epochs=1", "--set", "train.eval_every_epochs=0",
                "--set", "train.checkpoint_every_epochs=1", "--device", "cpu", "--seed", "3", "--output", str(out)]

    def weights(out: Path) -> Dict[str, torch.Tensor]:
        return {**{f"export.{k}": v for k, v in load_file(out / "cfp_clip.safetensors").items()},
                **_checkpoint_tensors(out / "checkpoint.pt", "trainable")}

    _kill_rerun_compare(cmd, tmp_path, total=80, saves_range=(1, 30), weights=weights)

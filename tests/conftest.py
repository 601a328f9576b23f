"""Shared fixtures: tiny configs, tiny images, the real data folder."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("VISIONFM_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} not present")
    return SHARED_DATA


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Twelve small random RGB PNGs in a nested folder."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    for i in range(12):
        arr = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / ("sub" if i % 2 else "") / f"img_{i:02d}.png")
    return folder


def tiny_pretrain_config(**overrides) -> dict:
    """The default pretraining config shrunk to run a step in well under a second."""
    from visionfm.config import CONFIG_DIR, apply_overrides, load_yaml

    cfg = load_yaml(CONFIG_DIR / "pretrain" / "default.yaml")
    base = {
        "modality": "oct", "data.synthetic_count": 8, "data.load_size": 40, "model.arch": "vit_tiny",
        "model.drop_path_rate": 0.1, "head.out_dim": 128, "head.hidden_dim": 64, "head.bottleneck_dim": 32,
        "crops.global_size": 32, "crops.local_number": 2, "crops.local_size": 16, "optim.epochs": 2,
        "optim.batch_size": 4, "optim.warmup_epochs": 1, "train.device": "cpu", "train.log_every": 1,
        "train.threads": 1,  # runs compared bit for bit must not time their own thread counts
    }
    base.update(overrides)
    return apply_overrides(cfg, [f"{k}={v}" for k, v in base.items()])


@pytest.fixture
def scripted_thread_probe(monkeypatch):
    """Replaces the thread timing with a script (1 thread at start-up, then all cores), with torch set to 2
    threads; yields the list of ``(max_threads, threads set when timed)`` calls and restores torch's setting."""
    import torch

    import visionfm.engine.threads as threads_module

    start_threads = torch.get_num_threads()
    calls = []

    def probe(max_threads=None, trials=3, dtype=None):
        calls.append((max_threads, torch.get_num_threads()))
        return 1 if len(calls) == 1 else max_threads

    monkeypatch.setattr(threads_module, "fastest_cpu_threads", probe)
    torch.set_num_threads(2)
    try:
        yield calls
    finally:
        torch.set_num_threads(start_threads)


def run_and_sigkill_at_first_checkpoint(cmd, out: Path, timeout: float = 120.0, name: str = "checkpoint.pt") -> int:
    """Start ``cmd`` (one thread), SIGKILL it as soon as ``out/<name>`` exists; returns the exit status
    (``-SIGKILL`` when it was killed before finishing)."""
    import signal
    import subprocess
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not (Path(out) / name).exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    return proc.wait()

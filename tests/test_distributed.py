"""Two gloo processes under torchrun compute the same first-step gradients as one process on the same
global batch (DDP averages the per-rank mean losses' gradients; lightly's centre update all-reduces)."""

import os
import subprocess
import sys
from pathlib import Path

import torch

WORKER = Path(__file__).with_name("_ddp_worker.py")


def test_two_process_gloo_gradients_equal_single_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single, multi = tmp_path / "single.pt", tmp_path / "multi.pt"
    subprocess.run([sys.executable, str(WORKER), str(single)], check=True, env=env, capture_output=True)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(WORKER), str(multi)], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    a = torch.load(single, weights_only=True)
    b = torch.load(multi, weights_only=True)
    assert a["grads"].keys() == b["grads"].keys() and len(a["grads"]) > 10
    for name in a["grads"]:
        torch.testing.assert_close(b["grads"][name], a["grads"][name], rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(b["center"], a["center"], rtol=1e-5, atol=1e-7)


def test_pretrain_cli_runs_under_torchrun(tmp_path):
    """Two ranks pretrain on real image files, decoded once into one array file both ranks map."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / f"img{i}.png")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(root / "pretrain" / "dino.py"), "--modality", "cfp", "--img-size", "32", "--local-crops", "2",
           "--local-size", "16", "--batch-size", "2", "--epochs", "1", "--out-dim", "64", "--set", "head.hidden_dim=32",
           "--set", "head.bottleneck_dim=16", "--data", str(tmp_path), "--set", "data.load_size=36",
           "--set", f"data.cache_dir={tmp_path / 'cache'}", "--device", "cpu", "--output", str(tmp_path / "run")]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "global batch 4" in result.stdout + result.stderr and (tmp_path / "run" / "encoder.safetensors").is_file()
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1
    assert (result.stdout + result.stderr).count("shared by the processes of this machine") == 1

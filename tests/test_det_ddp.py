"""``downstream/det.py`` under ``torchrun`` with two gloo processes: rank 0 alone writes the run folder, and two
processes with ``optim.batch_size=1`` train the weights of one process with ``optim.batch_size=2``.

Why FCOS: the equivalence holds where the loss of a global batch is the mean of the ranks' losses. mmdet's FCOS head
normalises its classification, box and centre-ness losses by the number of positive locations (and the sum of the
centre-ness targets) averaged over the ranks (``reduce_mean``), so each rank's loss is its share of the global
batch's loss whatever the boxes. RetinaNet's anchor head divides each rank's loss by that rank's own positive
anchors (Faster R-CNN, besides, samples anchors and proposals at random, a different draw on each rank): with boxes
of different sizes the two ranks' losses are then weighted differently from one process's, so RetinaNet couples the
items of a batch and is only equivalent when every image has as many positive anchors (measured on this test's data:
Adam's moments differ by about 5 % between one and two processes with RetinaNet, by about 2e-6 with FCOS). Nothing
else couples items here (LayerNorm and GroupNorm are per image, drop-path is off, the IDRiD images have one size, so
the batch padding is the same). So the gradients agree to float precision (checked through Adam's running moments).
The weights agree less tightly: Adam divides each gradient element by its own running RMS, so an element whose
gradient is at the level of float noise (which differs with the summation order) moves by a noisy fraction of a
step; the key bias of every attention block gets no gradient at all in exact arithmetic (softmax ignores a constant
shift of the scores), so its noise becomes whole steps and it is compared loosely."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from test_det_data import make_fake_idrid
from test_det_model import TINY_MMDET

ROOT = Path(__file__).resolve().parents[1]


def _run(data_root: Path, output: Path, batch: int, world: int) -> subprocess.CompletedProcess:
    # GroupNorm of 8 groups in the head: 32 groups of one channel have a single value on the coarsest (1x1) level of
    # a 64-px image, which torch refuses for one image per rank
    heads = {**TINY_MMDET["fcos"], "model.bbox_head.norm_cfg": "{type: GN, num_groups: 8, requires_grad: true}"}
    mmdet = "{" + ", ".join(f"{k}: {v}" for k, v in heads.items()) + "}"
    prefix = [sys.executable] if world == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  "--nproc_per_node", str(world)]
    cmd = prefix + [str(ROOT / "downstream" / "det.py"), "--dataset", "IDRiD", "--target", "od", "--detector", "fcos",
                    "--data-root", str(data_root), "--output", str(output), "--random-init", "--device", "cpu",
                    "--set", "data.max_size=64", "--set", f"model.mmdet={mmdet}", "--set", f"optim.batch_size={batch}",
                    "--set", "data.val_count=2", "--set", "eval.pngs=2", "--set", "optim.steps=3",
                    "--set", "optim.warmup_steps=0", "--set", "optim.lr=1e-3", "--set", "train.eval_every=2",
                    "--set", "train.precision=fp32", "--set", "model.drop_path_rate=0.0", "--set", "train.log_every=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_two_gloo_processes_train_fcos_as_one_with_the_doubled_batch(tmp_path: Path):
    root = make_fake_idrid(tmp_path / "data")  # 96x64 images, discs at random places: boxes of many positions
    _run(root, tmp_path / "one", batch=2, world=1)
    two = _run(root, tmp_path / "two", batch=1, world=2)
    single = torch.load(tmp_path / "one" / "last.pth", weights_only=True)
    double = torch.load(tmp_path / "two" / "last.pth", weights_only=True)
    assert single["step"] == double["step"] == 3
    a, b = single["model"], double["model"]
    assert a.keys() == b.keys()
    # The gradients agree to float precision: Adam's running means of them (after 3 steps) to 1e-4 relative.
    states = single["optimizer"]["state"], double["optimizer"]["state"]
    assert states[0].keys() == states[1].keys() and len(states[0]) > 100  # the encoder's final norm has no gradient
    moments = list(zip(states[0].values(), states[1].values()))
    for s1, s2 in moments:
        for key in ("exp_avg", "exp_avg_sq"):
            assert float((s1[key] - s2[key]).norm()) <= 1e-4 * float(s1[key].norm()) + 1e-12
    assert sum(int(s1["exp_avg"].abs().max() > 1e-4) for s1, _ in moments) > 50  # real gradients, not zeros
    # The weights: Adam divides each gradient element by its own running RMS, so elements whose gradient is at the
    # level of float noise move by a noisy fraction of a step (the backbone's lr 5e-4): 1e-4 absolute.
    for name, value in a.items():
        other = b[name]
        if name.endswith("attn.qkv.bias"):  # the key bias: pure noise, loosely (module docstring)
            dim = value.shape[0] // 3
            torch.testing.assert_close(other[dim:2 * dim], value[dim:2 * dim], rtol=0, atol=2e-3, msg=name)
            value, other = torch.cat([value[:dim], value[2 * dim:]]), torch.cat([other[:dim], other[2 * dim:]])
        torch.testing.assert_close(other, value, rtol=1e-4, atol=1e-4, msg=name)
    # rank 0 alone writes: one TensorBoard event file, one progress bar, the test outputs once
    assert len(list((tmp_path / "two" / "tensorboard").glob("events.*"))) == 1
    assert two.stderr.count("det train: 100%") == 1
    assert (tmp_path / "two" / "metrics.json").is_file()
    assert len(list((tmp_path / "two" / "predictions").glob("*.png"))) == 2
    assert not list((tmp_path / "two").glob("*.tmp"))

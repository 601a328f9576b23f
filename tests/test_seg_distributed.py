"""downstream/seg.py under torchrun with 2 gloo processes: rank 0 alone writes, the ranks share one decoded copy of
the training images, and the weights equal one process's with the doubled batch.

Why equality can hold for segmentation, where items of a batch can be coupled: the recipe here has nothing that
couples them. Its norms are GroupNorm (per crop; BatchNorm, ``model.norm=BN``, would normalise over each rank's
crops only), mmseg's Dice is a per-crop Dice averaged over the batch, and the cross-entropy averages over the
non-ignored pixels of the batch (``avg_non_ignore``), which is a mean over crops only while every crop has the same
number of them: true here, as 64 px crops of 72 x 80 images are never padded and there is no rotation (padding or
``augment.rotate_degrees`` would weight the ranks' crops by their labelled pixels, and the runs would differ). So
the one coupling left is the order of float sums (DDP averages two half-batch gradients), hence a tolerance.
(Checked the other way: with ``model.norm=BN`` this comparison fails, at the neck's first weights.)"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _seg_tiny import TINY, write_line_dataset, write_tiny_encoder

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """(tiny cfp encoder file, generic dataset folder of 5 training and 1 test image)."""
    base = tmp_path_factory.mktemp("inputs")
    return write_tiny_encoder(base / "cfp_vit_tiny.safetensors"), write_line_dataset(base / "lines", {"train": 5, "test": 1})


def test_two_processes_train_as_one_with_the_doubled_batch(inputs, tmp_path):
    encoder, data = inputs
    common = [str(REPO / "downstream" / "seg.py"), "--dataset", str(data), "--weights", str(encoder),
              "--set", "optim.steps=4", "--set", "optim.warmup_steps=1", "--set", "train.val_every=2",
              "--set", "data.val_count=2", "--set", "augment.hue=0.05", *TINY]
    shared_tmp = tmp_path / "tmp"  # where the ranks share the decoded images (tempfile.gettempdir())
    shared_tmp.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(shared_tmp)}
    one = subprocess.run([sys.executable, *common, "--batch-size", "4", "--output", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          *common, "--batch-size", "2", "--output", str(tmp_path / "two")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    for name in ("last.pth", "best.pth"):
        a = torch.load(tmp_path / "one" / name, weights_only=True)
        b = torch.load(tmp_path / "two" / name, weights_only=True)
        assert a["step"] == b["step"] and a["model"].keys() == b["model"].keys()
        for key, value in a["model"].items():
            torch.testing.assert_close(b["model"][key], value, rtol=1e-4, atol=1e-5, msg=f"{name} {key}")
    # The heads did train, alike: Adam's first moments (the averaged gradients) are nonzero and agree.
    moments = [[s["exp_avg"] for s in torch.load(tmp_path / run / "last.pth", weights_only=True)["optimizer"]
                ["state"].values()] for run in ("one", "two")]
    assert len(moments[0]) == len(moments[1]) > 10 and any(m.abs().max() > 0 for m in moments[0])
    for m_one, m_two in zip(*moments):
        torch.testing.assert_close(m_two, m_one, rtol=1e-3, atol=1e-6)
    # rank 0 alone writes: one event file, one progress bar, one metrics.json; the shared images are gone
    assert len(list((tmp_path / "two" / "tensorboard").glob("events.*"))) == 1
    assert two.stderr.count("seg train: 100%") == 1
    assert (tmp_path / "two" / "metrics.json").is_file() and (tmp_path / "two" / "overlays").is_dir()
    assert '"processes": 2' in (tmp_path / "two" / "metrics.json").read_text()
    assert not list(shared_tmp.glob("visionfm-seg-*"))

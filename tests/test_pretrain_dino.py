"""End-to-end DINO pretraining on tiny models: outputs, resume equality, errors, export."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import ROOT, tiny_pretrain_config
from visionfm.data.io import ImageReadError
from visionfm.data.unlabeled import DataError
from visionfm.engine.checkpoint import safe_load
from visionfm.engine.dino_trainer import DINOTrainer
from visionfm.weights import load_encoder, read_metadata


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_run_writes_config_checkpoint_tensorboard_and_encoder(tmp_path):
    out = tmp_path / "run"
    summary = DINOTrainer(tiny_pretrain_config(), out).train()
    assert summary["global_step"] == 4 and np.isfinite(summary["final_loss"])
    for name in ("config.yaml", "checkpoint.pt", "encoder.safetensors"):
        assert (out / name).is_file(), name
    assert list((out / "tensorboard").glob("events.out.tfevents*"))
    ckpt = safe_load(out / "checkpoint.pt")  # loads with weights_only=True
    assert {"student", "teacher", "optimizer", "dino_loss", "epoch", "global_step", "config"} <= set(ckpt)
    assert ckpt["global_step"] == 4 and ckpt["epoch"] == 2
    meta = read_metadata(out / "encoder.safetensors")
    assert meta["modality"] == "oct" and meta["arch"] == "vit_tiny" and meta["patch_size"] == 16
    assert meta["img_size"] == 32 and meta["steps"] == 4 and "synthetic" in meta["data"]
    teacher_backbone = {k[len("backbone."):]: v for k, v in ckpt["teacher"].items() if k.startswith("backbone.")}
    assert _max_diff(load_file(out / "encoder.safetensors"), teacher_backbone) == 0


def test_resume_mid_epoch_equals_uninterrupted_run(tmp_path):
    full = tmp_path / "full"
    DINOTrainer(tiny_pretrain_config(), full).train()
    part = tmp_path / "part"
    DINOTrainer(tiny_pretrain_config(**{"train.max_steps": 3}), part).train()  # stops inside epoch 2
    assert safe_load(part / "checkpoint.pt")["step_in_epoch"] == 1
    DINOTrainer(tiny_pretrain_config(), part).train()  # same command again resumes
    assert _max_diff(load_file(full / "encoder.safetensors"), load_file(part / "encoder.safetensors")) == 0
    a, b = safe_load(full / "checkpoint.pt"), safe_load(part / "checkpoint.pt")
    assert _max_diff(a["student"], b["student"]) == 0
    assert torch.equal(a["dino_loss"]["center"], b["dino_loss"]["center"])


def test_checkpoints_every_n_steps_at_the_end_and_not_at_epoch_boundaries(tmp_path, monkeypatch):
    """train.checkpoint_every_steps sets the saves (2-step epochs, every 3 steps: after steps 3 and 5, not after
    the epoch ends at 2 and 4), plus one after the last step (6); each holds the data position of the next step."""
    saved = []
    original = DINOTrainer.save_checkpoint

    def spy(self, epoch, step_in_epoch, global_step):
        saved.append((global_step, epoch, step_in_epoch))
        original(self, epoch, step_in_epoch, global_step)

    monkeypatch.setattr(DINOTrainer, "save_checkpoint", spy)
    out = tmp_path / "run"
    DINOTrainer(tiny_pretrain_config(**{"optim.epochs": 3, "train.checkpoint_every_steps": 3}), out).train()
    assert saved == [(3, 1, 1), (6, 3, 0)]
    saved.clear()
    DINOTrainer(tiny_pretrain_config(**{"optim.epochs": 3, "train.checkpoint_every_steps": 0, "train.max_steps": 5}),
                tmp_path / "b").train()
    assert saved == [(5, 2, 1)]  # only at the end (of this invocation)
    assert list((out / "tensorboard").glob("events.out.tfevents*"))


def test_a_nan_loss_between_checkpoints_stops_before_the_next_one(tmp_path, monkeypatch):
    """A NaN loss at step 3 (not a logging step: its loss stays on the device) stops the run at the checkpoint
    after step 4 with one clear error; the checkpoint of step 2 stays and nothing is exported."""
    from visionfm.errors import NonFiniteLossError
    from visionfm.objectives.dino import DINOLoss

    calls = []
    original = DINOLoss.forward

    def nan_at_step_3(self, *args, **kwargs):
        calls.append(1)
        loss = original(self, *args, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(DINOLoss, "forward", nan_at_step_3)
    out = tmp_path / "run"
    cfg = tiny_pretrain_config(**{"train.log_every": 100, "train.checkpoint_every_steps": 2})
    with pytest.raises(NonFiniteLossError, match="between steps 3 and 4"):
        DINOTrainer(cfg, out).train()
    assert safe_load(out / "checkpoint.pt")["global_step"] == 2 and not (out / "encoder.safetensors").exists()


def test_time_budget_stops_after_the_step_that_crosses_it_then_rerun_goes_on(tmp_path):
    out = tmp_path / "run"
    summary = DINOTrainer(tiny_pretrain_config(**{"train.max_seconds": "0.000001"}), out).train()
    assert summary["global_step"] == 1 and summary["steps_this_run"] == 1  # one step, then out of time
    assert safe_load(out / "checkpoint.pt")["global_step"] == 1 and (out / "encoder.safetensors").is_file()
    summary = DINOTrainer(tiny_pretrain_config(), out).train()
    assert summary["global_step"] == 4 and summary["steps_this_run"] == 3


def test_resume_under_a_changed_config_is_refused_unless_asked_for(tmp_path):
    from visionfm.config import ConfigMismatchError

    out = tmp_path / "run"
    DINOTrainer(tiny_pretrain_config(**{"train.max_steps": 2}), out).train()
    with pytest.raises(ConfigMismatchError, match=r"optim.lr = 0.001 \(checkpoint: 0.0005\)"):
        DINOTrainer(tiny_pretrain_config(**{"optim.lr": 0.001}), out).train()
    assert safe_load(out / "checkpoint.pt")["global_step"] == 2  # nothing was overwritten
    DINOTrainer(tiny_pretrain_config(**{"train.max_steps": 3}), out).train()  # run-only settings may change
    summary = DINOTrainer(tiny_pretrain_config(**{"optim.lr": 0.001, "train.resume_with_changes": True}), out).train()
    assert summary["global_step"] == 4 and summary["steps_this_run"] == 1


def _cli(out: Path, *extra: str) -> list:
    return [sys.executable, str(ROOT / "pretrain" / "dino.py"), "--modality", "oct", "--arch", "vit_tiny",
            "--img-size", "32", "--local-crops", "2", "--local-size", "16", "--batch-size", "4", "--epochs", "3",
            "--out-dim", "128", "--set", "head.hidden_dim=64", "--set", "head.bottleneck_dim=32",
            "--set", "data.synthetic_count=8", "--set", "train.threads=1", "--set", "train.checkpoint_every_steps=2",
            "--device", "cpu", "--seed", "1", "--output", str(out), *extra]


def test_sigterm_saves_a_checkpoint_and_exits(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    proc = subprocess.Popen(_cli(out, "--epochs", "200"), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, log
    assert "state saved" in log and "run the same command again to resume" in log
    assert safe_load(out / "checkpoint.pt")["global_step"] >= 2


def test_empty_folder_and_corrupt_image_are_clear_errors(tmp_path, image_folder):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no images"):
        DINOTrainer(tiny_pretrain_config(**{"data.source": str(empty)}), tmp_path / "a").train()
    (image_folder / "broken_scan.jpg").write_bytes(os.urandom(200))
    with pytest.raises(ImageReadError, match="broken_scan.jpg"):
        DINOTrainer(tiny_pretrain_config(**{"data.source": str(image_folder)}), tmp_path / "b").train()
    # with the explicit flag the file is left out and the run goes on
    trainer = DINOTrainer(tiny_pretrain_config(**{"data.source": str(image_folder), "data.skip_corrupt": True,
                                                  "train.max_steps": 1}), tmp_path / "c")
    trainer.train()
    assert len(trainer.dataset) == 12 and len(trainer.dataset.skipped) == 1


def test_cli_reports_bad_input_without_traceback(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = subprocess.run(_cli(tmp_path / "o", "--data", str(empty)), capture_output=True, text=True)
    assert result.returncode != 0 and "no images found" in result.stderr and "Traceback" not in result.stderr
    result = subprocess.run(_cli(tmp_path / "o", "--modality", "xray"), capture_output=True, text=True)
    assert result.returncode == 2 and "valid modalities" in result.stderr


def test_export_to_weights_dir_round_trips_through_load_encoder(tmp_path):
    wdir = tmp_path / "weights"
    out = tmp_path / "run"
    DINOTrainer(tiny_pretrain_config(**{"export.to": str(wdir), "train.max_steps": 2}), out).train()
    assert (wdir / "oct_vit_tiny.safetensors").is_file()
    encoder, info = load_encoder("OCT", weights_dir=wdir, img_size=32)
    assert info.modality == "oct" and info.metadata["dtype"] == "float16"
    from visionfm.weights.export import read_index, sha256_file

    assert read_index(wdir)["oct_vit_tiny.safetensors"]["sha256"] == sha256_file(wdir / "oct_vit_tiny.safetensors")
    fp32, _ = load_encoder("oct", weights=out / "encoder.safetensors", img_size=32)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(encoder.eval()(x), fp32.eval()(x), rtol=2e-2, atol=2e-2)  # fp16 storage


def test_init_from_starts_student_and_teacher_from_an_exported_encoder(tmp_path):
    DINOTrainer(tiny_pretrain_config(**{"train.max_steps": 2}), tmp_path / "first").train()
    source = tmp_path / "first" / "encoder.safetensors"
    trainer = DINOTrainer(tiny_pretrain_config(**{"train.max_steps": 1, "model.init_from": str(source)}),
                          tmp_path / "second")
    initialised = []
    trainer._run_step = (lambda step, run=trainer._run_step: initialised.append(
        tuple({k: v.clone() for k, v in net.backbone.state_dict().items()}
              for net in (trainer.model.student, trainer.model.teacher)))
        or run(step))
    trainer.train()
    student, teacher = initialised[0]  # the weights the first step started from
    assert _max_diff(student, load_file(source)) == 0 and _max_diff(teacher, load_file(source)) == 0
    assert read_metadata(tmp_path / "second" / "encoder.safetensors")["init_from"]["steps"] == 2


def test_real_oct_images_grey_16bit_and_csv_sources(tmp_path, shared_data):
    oct_dir = shared_data / "OCT_AND_EYE_FUNDUS_DME_DR" / "OCT" / "OCT1"
    files = sorted(oct_dir.glob("*.jpg"))[:6]
    arr = (np.linspace(0, 65535, 40 * 40).reshape(40, 40)).astype(np.uint16)
    Image.fromarray(arr).save(tmp_path / "scan16.tif")
    Image.fromarray((arr // 256).astype(np.uint8)).save(tmp_path / "grey.png")
    csv = tmp_path / "list.csv"
    csv.write_text("path\n" + "\n".join([str(f) for f in files] + ["scan16.tif", "grey.png"]) + "\n")
    trainer = DINOTrainer(tiny_pretrain_config(**{"data.source": str(csv), "train.max_steps": 1}), tmp_path / "run")
    trainer.train()
    assert len(trainer.dataset) == 8
    assert all(img.shape == (1, 40, 40) and img.dtype == torch.uint8 for img in trainer.dataset)
    assert trainer.dataset[6].float().max() > 200  # the 16-bit scan keeps its range


def test_auto_threads_are_timed_again_every_epoch(tmp_path, scripted_thread_probe):
    """DINO pretraining re-times train.threads=auto after each epoch (start-up timings can be fooled by a burst of
    other work), with the core count the run started with still a candidate."""
    DINOTrainer(tiny_pretrain_config(**{"train.threads": "auto"}), tmp_path / "run").train()  # 2 epochs
    assert scripted_thread_probe == [(2, 2), (2, 1), (2, 2)] and torch.get_num_threads() == 2

"""downstream/seg.py end to end on tiny data: train a few steps, metrics/CSV/overlays/TensorBoard/best.pth,
--eval-only, predict, the real DRIVE files, and the error paths."""

import csv
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _seg_tiny import TINY, write_tiny_encoder
from conftest import SHARED_DATA as SHARED
from visionfm.tasks.segmentation.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory):
    return write_tiny_encoder(tmp_path_factory.mktemp("weights") / "cfp_vit_tiny.safetensors")


def _vessel_image(rng, h=80, w=96):
    """A dark disc with a few bright 2-px lines (the 'vessels') and its truth and FOV."""
    image = np.zeros((h, w, 3), np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    fov = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (min(h, w) / 2 - 1) ** 2
    image[fov] = (120, 60, 30)
    truth = np.zeros((h, w), bool)
    for _ in range(3):
        if rng.random() < 0.5:
            r = int(rng.integers(5, h - 5))
            truth[r:r + 2] = True
        else:
            c = int(rng.integers(5, w - 5))
            truth[:, c:c + 2] = True
    truth &= fov
    image[truth] = (220, 200, 120)
    return image, truth, fov


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "lines"
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("test", 2)):
        for i in range(n):
            image, truth, fov = _vessel_image(rng)
            for sub, arr in (("images", image), ("masks", truth.astype(np.uint8) * 255),
                             ("fov", fov.astype(np.uint8) * 255)):
                (root / split / sub).mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).save(root / split / sub / f"{split}{i}.png")
    return root


@pytest.fixture(scope="module")
def trained(dataset, encoder_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    rc = main(["--dataset", str(dataset), "--weights", str(encoder_file), "--output", str(out), "--max-steps", "4",
               "--set", "train.val_every=2", "--finetune", *TINY])
    assert rc == 0
    return out


def test_training_run_writes_everything(trained):
    metrics = json.loads((trained / "metrics.json").read_text())
    for key in ("dice", "iou", "auc", "sensitivity", "specificity", "accuracy"):
        assert isinstance(metrics["pooled"][key], float) and isinstance(metrics["mean"][key], float)
    assert metrics["n_images"] == 2 and [r["name"] for r in metrics["per_image"]] == ["test0", "test1"]
    assert metrics["split"] == "test" and metrics["region"] == "inside the FOV mask"
    assert metrics["validation"]["images"] and metrics["train"]["steps"] == 4 and metrics["best_step"] in (2, 4)
    # the validation image came from the training split, never the test split
    assert not set(metrics["validation"]["images"]) & {"test0", "test1"}
    rows = list(csv.DictReader(open(trained / "metrics.csv")))
    assert [r["name"] for r in rows] == ["test0", "test1", "mean", "pooled"]
    overlays = sorted((trained / "overlays").glob("*.png"))
    assert [p.stem for p in overlays] == ["test0", "test1"]
    with Image.open(overlays[0]) as img:
        assert img.size == (4 * 96 + 3 * 4, 80)  # image | truth | prediction | errors at the original size
    assert list((trained / "tensorboard").glob("events.out.tfevents.*"))
    assert (trained / "config.yaml").is_file()
    ckpt = torch.load(trained / "best.pth", weights_only=True)
    assert ckpt["format"] == "visionfm-seg-1" and ckpt["encoder"]["mean"] == [0.4, 0.3, 0.2]


def test_pooled_counts_are_fov_pixels_at_original_resolution(trained, dataset):
    metrics = json.loads((trained / "metrics.json").read_text())
    pooled = metrics["pooled"]
    fov = sum(int((np.asarray(Image.open(p)) > 0).sum()) for p in sorted((dataset / "test" / "fov").glob("*.png")))
    vessels = sum(int((np.asarray(Image.open(p)) > 0).sum()) for p in sorted((dataset / "test" / "masks").glob("*.png")))
    assert pooled["tp"] + pooled["fp"] + pooled["fn"] + pooled["tn"] == fov
    assert pooled["tp"] + pooled["fn"] == vessels


def test_eval_only_reproduces_metrics(trained, dataset, tmp_path):
    rc = main(["--dataset", str(dataset), "--eval-only", "--checkpoint", str(trained / "best.pth"),
               "--output", str(tmp_path), "--precision", "fp32"])
    assert rc == 0
    first = json.loads((trained / "metrics.json").read_text())["pooled"]
    again = json.loads((tmp_path / "metrics.json").read_text())["pooled"]
    for key in ("dice", "auc", "tp", "fp"):
        assert again[key] == pytest.approx(first[key])


def test_predict_writes_masks(trained, dataset, tmp_path):
    rc = main(["predict", "--checkpoint", str(trained / "best.pth"), "--images", str(dataset / "test" / "images"),
               "--output", str(tmp_path), "--probabilities"])
    assert rc == 0
    for name in ("test0", "test1"):
        mask = np.asarray(Image.open(tmp_path / f"{name}.png"))
        assert mask.shape == (80, 96) and set(np.unique(mask)) <= {0, 255}
        assert (tmp_path / f"{name}_prob.png").is_file()


def test_threshold_chosen_on_validation_is_used_and_stored(dataset, encoder_file, tmp_path):
    out = tmp_path / "run"
    rc = main(["--dataset", str(dataset), "--weights", str(encoder_file), "--output", str(out), "--max-steps", "2",
               "--set", "test.threshold=val", "--finetune", *TINY])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    ckpt = torch.load(out / "best.pth", weights_only=True)
    assert metrics["threshold_source"].startswith("validation") and 0.05 <= metrics["threshold"] <= 0.95
    assert ckpt["threshold"] == metrics["threshold"]
    assert metrics["pooled_at_0.5"]["threshold"] == 0.5
    # --eval-only with 'val' reuses the stored threshold (no new choice) and reproduces the counts
    rc = main(["--dataset", str(dataset), "--eval-only", "--checkpoint", str(out / "best.pth"), "--output",
               str(tmp_path / "again"), "--set", "test.threshold=val", "--precision", "fp32"])
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert rc == 0 and again["threshold"] == metrics["threshold"] and "best.pth" in again["threshold_source"]
    assert again["pooled"]["tp"] == metrics["pooled"]["tp"] and again["pooled"]["fp"] == metrics["pooled"]["fp"]


def test_eval_only_and_predict_use_the_checkpoints_clahe(dataset, encoder_file, tmp_path):
    # A model trained on contrast-equalised input must see the same input later, without the user repeating
    # data.clahe: eval-only reproduces the training run's test metrics, and predict's probabilities differ
    # from those of the same weights fed raw images.
    out = tmp_path / "run"
    rc = main(["--dataset", str(dataset), "--weights", str(encoder_file), "--output", str(out), "--max-steps", "2",
               "--set", "data.clahe={clip_limit: 3.0, grid: 4}", "--finetune", *TINY])
    assert rc == 0
    rc = main(["--dataset", str(dataset), "--eval-only", "--checkpoint", str(out / "best.pth"), "--output",
               str(tmp_path / "again"), "--precision", "fp32"])
    assert rc == 0
    first = json.loads((out / "metrics.json").read_text())["pooled"]
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())["pooled"]
    assert again["auc"] == pytest.approx(first["auc"]) and again["tp"] == first["tp"]
    ckpt = torch.load(out / "best.pth", weights_only=True)
    assert ckpt["config"]["data"]["clahe"] == {"clip_limit": 3.0, "grid": 4}
    ckpt["config"]["data"]["clahe"] = None
    torch.save(ckpt, tmp_path / "raw.pth")
    probs = {}
    for name in ("best.pth", "raw.pth"):
        folder = tmp_path / f"predict_{name}"
        rc = main(["predict", "--checkpoint", str(out / name if name == "best.pth" else tmp_path / name),
                   "--images", str(dataset / "test" / "images"), "--output", str(folder), "--probabilities"])
        assert rc == 0
        probs[name] = np.asarray(Image.open(folder / "test0_prob.png"), dtype=np.int16)
    assert np.abs(probs["best.pth"] - probs["raw.pth"]).max() > 0


@pytest.mark.parametrize("value", ["1.5", "median"])
def test_bad_threshold_is_an_early_error(dataset, encoder_file, tmp_path, capsys, value):
    rc = main(["--dataset", str(dataset), "--weights", str(encoder_file), "--output", str(tmp_path / "o"),
               "--max-steps", "1", "--set", f"test.threshold={value}", *TINY])
    assert rc in (1, 2) and "test.threshold" in capsys.readouterr().err  # 2: refused as a config value
    assert not (tmp_path / "o" / "best.pth").exists()


def _weights(path):
    return {k: v for k, v in torch.load(path, weights_only=True)["model"].items()}


def test_stopped_run_resumes_to_the_uninterrupted_result(dataset, encoder_file, tmp_path, capsys, caplog):
    # A run stopped after 3 of its 6 steps (--max-steps keeps the 6-step schedule) and rerun into the same folder
    # must end where an uninterrupted 6-step run ends: model, optimiser, crop sampler and RNG all restored.
    common = ["--dataset", str(dataset), "--weights", str(encoder_file), "--finetune", "--set", "optim.steps=6",
              "--set", "train.val_every=3", "--set", "optim.warmup_steps=2", *TINY]
    assert main([*common, "--output", str(tmp_path / "whole")]) == 0
    assert main([*common, "--output", str(tmp_path / "parts"), "--max-steps", "3"]) == 0
    assert torch.load(tmp_path / "parts" / "last.pth", weights_only=True)["step"] == 3
    with caplog.at_level("INFO", logger="visionfm.seg"):
        assert main([*common, "--output", str(tmp_path / "parts")]) == 0
    assert "resuming" in caplog.text and "at step 3" in caplog.text
    capsys.readouterr()
    whole, parts = _weights(tmp_path / "whole" / "last.pth"), _weights(tmp_path / "parts" / "last.pth")
    assert whole.keys() == parts.keys()
    for key in whole:
        assert torch.equal(whole[key], parts[key]), key
    m_whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    m_parts = json.loads((tmp_path / "parts" / "metrics.json").read_text())
    assert m_parts["best_step"] == m_whole["best_step"] and m_parts["pooled"] == m_whole["pooled"]
    # the same folder under another recipe is refused, naming the setting
    assert main([*common, "--output", str(tmp_path / "parts"), "--set", "optim.lr=0.01"]) == 1
    assert "optim.lr = 0.01" in capsys.readouterr().err


def test_unsafe_checkpoint_refused(dataset, tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    with open(bad, "wb") as fh:
        pickle.dump({"format": "visionfm-seg-1", "obj": Path("x")}, fh)
    rc = main(["--dataset", str(dataset), "--eval-only", "--checkpoint", str(bad), "--output", str(tmp_path / "o")])
    assert rc == 1 and "refused" in capsys.readouterr().err


def test_missing_dataset_and_bad_target(tmp_path, capsys):
    assert main(["--dataset", "DRIVE", "--data-root", str(tmp_path), "--output", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "DRIVE" in err and str(tmp_path / "DRIVE") in err and "1st_manual" in err
    assert main(["--dataset", "DRIVE", "--target", "OD", "--data-root", str(tmp_path),
                 "--output", str(tmp_path / "o")]) == 1
    assert "IDRiD" in capsys.readouterr().err
    assert main(["--dataset", "nowhere", "--data-root", str(tmp_path), "--output", str(tmp_path / "o")]) == 1
    assert "neither a known dataset" in capsys.readouterr().err


def test_missing_weights_is_clear(dataset, tmp_path, capsys):
    rc = main(["--dataset", str(dataset), "--weights", str(tmp_path / "none.safetensors"),
               "--output", str(tmp_path / "o"), "--max-steps", "1", *TINY])
    assert rc == 1 and "none.safetensors" in capsys.readouterr().err


@pytest.mark.skipif(not (SHARED / "DRIVE").is_dir(), reason="../shared/data/DRIVE not present")
def test_real_drive_quick_run(encoder_file, tmp_path):
    # The real 565x584 files: one training image, one validation image, two test images, original resolution.
    rc = main(["--dataset", "DRIVE", "--data-root", str(SHARED), "--weights", str(encoder_file), "--output",
               str(tmp_path), "--max-steps", "2", "--limit", "2", *TINY, "--crop-size", "128"])
    assert rc == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["dataset"] == "DRIVE" and [r["name"] for r in metrics["per_image"]] == ["01_test", "02_test"]
    pooled = metrics["pooled"]
    fov = sum(int((np.asarray(Image.open(SHARED / "DRIVE" / "test" / "mask" / f"0{i}_test_mask.gif")) > 0).sum())
              for i in (1, 2))
    assert pooled["tp"] + pooled["fp"] + pooled["fn"] + pooled["tn"] == fov
    with Image.open(tmp_path / "overlays" / "01_test.png") as img:
        assert img.size == (4 * 565 + 12, 584)


def test_help_lists_the_modes():
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0


def test_entry_point_runs_from_a_checkout_without_install(tmp_path):
    # As the acceptance script does: the script runs from any directory, and an empty data root names DRIVE.
    out = subprocess.run([sys.executable, str(REPO / "downstream" / "seg.py"), "--dataset", "DRIVE", "--data-root",
                          str(tmp_path), "--output", str(tmp_path / "o")], capture_output=True, text=True, cwd="/",
                         timeout=300)
    assert out.returncode == 1 and "dataset DRIVE not found" in out.stderr and "Traceback" not in out.stderr


def test_auto_threads_are_timed_again_at_validation(dataset, encoder_file, tmp_path, scripted_thread_probe):
    """A start-up timing fooled by a burst of other work (1 thread chosen) is corrected at the next validation,
    with all the cores the run started with still a candidate."""
    rc = main(["--dataset", str(dataset), "--weights", str(encoder_file), "--output", str(tmp_path), "--max-steps",
               "4", "--set", "train.val_every=2", *TINY, "--set", "train.threads=auto"])
    assert rc == 0
    # start-up, then after the validations at steps 2 and 4; the later ones run while 1 thread is set
    assert scripted_thread_probe == [(2, 2), (2, 1), (2, 2)] and torch.get_num_threads() == 2


def test_fixed_thread_count_is_not_timed(monkeypatch):
    import visionfm.engine.threads as threads_module
    from visionfm.tasks.segmentation.runner import ThreadChooser

    monkeypatch.setattr(threads_module, "fastest_cpu_threads", lambda *a, **k: pytest.fail("timed a fixed setting"))
    start_threads = torch.get_num_threads()
    try:
        chooser = ThreadChooser(1, torch.device("cpu"), None)
        assert chooser.apply() == 1 and torch.get_num_threads() == 1
        assert chooser.recheck() is None and torch.get_num_threads() == 1
        assert ThreadChooser(None, torch.device("cpu"), None).apply() is None
    finally:
        torch.set_num_threads(start_threads)


def test_a_run_puts_back_the_thread_count_it_found(scripted_thread_probe):
    """Two runs in one process (a notebook, this test session): the second must not start from, and cap its
    timing at, the 1 thread the first one chose."""
    from visionfm.engine.threads import ThreadChooser

    with ThreadChooser("auto", torch.device("cpu"), None):
        assert torch.get_num_threads() == 1  # the script's start-up choice
    assert torch.get_num_threads() == 2
    with ThreadChooser("auto", torch.device("cpu"), None):
        assert torch.get_num_threads() == 2
    assert scripted_thread_probe == [(2, 2), (2, 2)]

"""Bad input and faults: one clear error naming the file or key, nothing half-written, nothing trained on nonsense.

Unit tests of the shared parts (input checks, typed overrides, the run-folder guard, the error boundary, weights
files, nested dataset folders), then a table of command-line cases run as a user would run them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visionfm.config import ConfigError, ConfigMismatchError, apply_overrides, write_run_config
from visionfm.data.datasets.drive import load_drive
from visionfm.data.inputs import InputError, check_min_side, collect_images, note_channels, unique_names
from visionfm.data.io import ImageReadError, check_image
from visionfm.errors import VisionFMError, run_cli
from visionfm.weights.export import WeightsFileError, load_safetensors, read_metadata

ROOT = Path(__file__).resolve().parents[1]


def _jpeg(path: Path, size=(64, 48), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path, quality=90)
    return path


def _truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def _tree_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(f.relative_to(folder)).encode())
        digest.update(f.read_bytes())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------- image inputs
def test_truncated_jpeg_fails_the_full_decode_check_that_verify_alone_passes(tmp_path):
    bad = _truncate(_jpeg(tmp_path / "cut.jpg", (256, 256)))
    with Image.open(bad) as img:
        img.verify()  # the structural check alone is fooled: this is why check_image decodes
    with pytest.raises(ImageReadError, match="cut.jpg"):
        check_image(bad)
    assert check_image(_jpeg(tmp_path / "ok.jpg")) == (64, 48)


def test_collect_images_names_a_corrupt_file_or_skips_and_counts_it(tmp_path, caplog):
    for i in range(3):
        _jpeg(tmp_path / f"a{i}.jpg", seed=i)
    _truncate(_jpeg(tmp_path / "broken.jpg", (256, 256)))
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ImageReadError, match="broken.jpg.*--skip-corrupt"):
        collect_images(tmp_path)
    with caplog.at_level(logging.WARNING):
        images = collect_images(tmp_path, skip_corrupt=True)
    assert [im.path.name for im in images] == ["a0.jpg", "a1.jpg", "a2.jpg"]
    assert "skipped 2 unreadable file(s) of 5" in caplog.text


def test_collect_images_refuses_missing_and_empty_sources(tmp_path):
    with pytest.raises(InputError, match="no such folder"):
        collect_images(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty"):
        collect_images(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(InputError, match="no readable images"):
        collect_images(tmp_path / "bad", skip_corrupt=True)


def test_two_inputs_never_share_an_output_name(tmp_path):
    Image.fromarray(np.zeros((20, 20), np.uint16)).save(tmp_path / "x.tif")
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "x.png")
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "y.png")
    names = [im.name for im in collect_images(tmp_path)]
    assert names == ["x_png", "x_tif", "y"] and len(set(n.lower() for n in names)) == 3
    paths = [Path("a/x.png"), Path("b/x.png"), Path("b/X.PNG")]
    assert len({n.lower() for n in unique_names(paths)}) == 3


def test_csv_input_reads_paths_relative_to_the_csv_and_labels(tmp_path):
    (tmp_path / "img").mkdir()
    _jpeg(tmp_path / "img" / "a.jpg")
    _jpeg(tmp_path / "img" / "b.jpg", seed=1)
    (tmp_path / "list.csv").write_text("path,label\nimg/a.jpg,dr\nimg/b.jpg,normal\n")
    images = collect_images(tmp_path / "list.csv")
    assert [(im.path.name, im.label) for im in images] == [("a.jpg", "dr"), ("b.jpg", "normal")]
    (tmp_path / "nocol.csv").write_text("file_name\nimg/a.jpg\n")
    with pytest.raises(InputError, match="no image path column"):
        collect_images(tmp_path / "nocol.csv")


def test_grey_for_colour_is_noted_and_tiny_images_refused(tmp_path, caplog):
    Image.fromarray((np.arange(64 * 64, dtype=np.uint16) * 15).reshape(64, 64)).save(tmp_path / "grey16.tif")
    _jpeg(tmp_path / "colour.jpg")
    Image.fromarray(np.zeros((12, 10, 3), np.uint8)).save(tmp_path / "tiny.png")
    images = collect_images(tmp_path)
    with caplog.at_level(logging.WARNING):
        assert note_channels(images, 3, "cfp") == 1
    assert "grey16.tif" in caplog.text and "cfp modality reads colour" in caplog.text
    assert note_channels(images, 1, "oct") == 2
    with pytest.raises(InputError, match=r"tiny.png: image is 10x12 pixels, smaller than one patch \(16 px\)"):
        check_min_side(images, 16)


# ------------------------------------------------------------------------------------------- config values
@pytest.mark.parametrize("override, message", [
    ("optim.lr=abc", "optim.lr expects a number"),
    ("train.flag=3", "train.flag expects true or false"),
    ("optim.lrr=1", "unknown config key 'optim.lrr'; keys at this level: lr, steps"),
    ("optm.lr=1", "unknown config key 'optm'.*keys at this level: optim, train"),
])
def test_mistyped_override_names_the_key_and_what_it_expects(override, message):
    cfg = {"optim": {"lr": 1e-3, "steps": 10}, "train": {"flag": True}}
    with pytest.raises(ConfigError, match=message):
        apply_overrides(cfg, [override])


def test_numbers_convert_only_where_nothing_is_lost():
    cfg = apply_overrides({"optim": {"lr": 1e-3, "steps": 10, "name": None}},
                          ["optim.lr=1", "optim.steps=2e3", "optim.name=adamw"])
    assert cfg["optim"] == {"lr": 1.0, "steps": 2000, "name": "adamw"}
    assert isinstance(cfg["optim"]["lr"], float) and isinstance(cfg["optim"]["steps"], int)


def test_run_folder_of_another_run_is_refused_and_left_untouched(tmp_path):
    cfg = {"dataset": "DRIVE", "train": {"max_steps": 5, "resume_with_changes": False}}
    write_run_config(cfg, tmp_path)
    (tmp_path / "best.pth").write_bytes(b"weights")
    before = _tree_digest(tmp_path)
    write_run_config({**cfg, "train": {**cfg["train"], "max_steps": 9}}, tmp_path)  # resumable key: same run
    with pytest.raises(ConfigMismatchError, match="dataset = 'IDRiD' \\(earlier run: 'DRIVE'\\)"):
        write_run_config({**cfg, "dataset": "IDRiD"}, tmp_path)
    assert _tree_digest(tmp_path) != before  # max_steps was rewritten ...
    write_run_config(cfg, tmp_path)
    assert _tree_digest(tmp_path) == before  # ... and the refused config never was


# ------------------------------------------------------------------------------------------- weights files
@pytest.mark.parametrize("content", [os.urandom(5000), b"", b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":"])
def test_unreadable_safetensors_names_the_file(tmp_path, content):
    path = tmp_path / "w.safetensors"
    path.write_bytes(content)
    for read in (load_safetensors, read_metadata):
        with pytest.raises(WeightsFileError, match="w.safetensors: not a readable safetensors file"):
            read(path)


def test_converting_our_own_dino_checkpoint_keeps_its_modality_normalisation(tmp_path):
    from timm.models.vision_transformer import VisionTransformer

    from visionfm.modalities import get_modality
    from visionfm.weights.formats import read_foreign_checkpoint

    vit = VisionTransformer(img_size=32, patch_size=16, embed_dim=192, depth=1, num_heads=3, num_classes=0)
    teacher = {f"backbone.{k}": v for k, v in vit.state_dict().items()}
    torch.save({"teacher": teacher, "student": teacher, "epoch": 1, "config": {"modality": "oct", "objective": "dino"}},
               tmp_path / "checkpoint.pt")
    meta = read_foreign_checkpoint(tmp_path / "checkpoint.pt", "cfp").metadata
    oct_ = get_modality("oct")
    assert meta["modality"] == "oct" and meta["objective"] == "dino"
    assert meta["mean"] == pytest.approx(list(oct_.mean)) and meta["std"] == pytest.approx(list(oct_.std))
    assert meta["mean"] != pytest.approx([0.485, 0.456, 0.406])


# ------------------------------------------------------------------------------------------- datasets
def test_dataset_nested_one_level_down_is_found_and_logged(tmp_path, caplog):
    inner = tmp_path / "DRIVE" / "DRIVE"
    for split in ("training", "test"):
        for sub in ("images", "1st_manual", "mask"):
            (inner / split / sub).mkdir(parents=True)
        Image.fromarray(np.zeros((24, 24, 3), np.uint8)).save(inner / split / "images" / "21_training.tif")
        Image.fromarray(np.zeros((24, 24), np.uint8)).save(inner / split / "1st_manual" / "21_manual1.gif")
        Image.fromarray(np.zeros((24, 24), np.uint8)).save(inner / split / "mask" / "21_training_mask.gif")
    with caplog.at_level(logging.INFO):
        splits = load_drive(tmp_path)
    assert splits.root == inner and len(splits.train) == 1
    assert "does not hold the expected layout" in caplog.text


# ------------------------------------------------------------------------------------------- the boundary
def test_error_boundary_prints_one_line_for_user_errors_and_raises_our_bugs(capsys):
    def user_mistake(argv):
        raise ConfigError("optim.lr expects a number, got 'abc'")

    def our_bug(argv):
        raise KeyError("internal")

    assert run_cli(user_mistake, []) == 1
    err = capsys.readouterr().err
    assert err == "error: optim.lr expects a number, got 'abc'\n"
    assert run_cli(lambda argv: (_ for _ in ()).throw(FileNotFoundError(2, "No such file", "x.yaml")), []) == 1
    assert "x.yaml" in capsys.readouterr().err
    with pytest.raises(KeyError):
        run_cli(our_bug, [])
    assert run_cli(user_mistake, ["--debug"]) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err
    assert issubclass(ImageReadError, VisionFMError) and issubclass(ConfigError, ValueError)


# ------------------------------------------------------------------------------------------- the commands
def _run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _cases(tmp: Path):
    (tmp / "bad.yaml").write_text("optim: [unclosed\n")
    (tmp / "random.safetensors").write_bytes(os.urandom(4000))
    (tmp / "afile").write_text("")
    (tmp / "imgs").mkdir()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp / "imgs" / "a.png")
    return [
        # (command, what the one line must name, accepted exit statuses: 2 for argparse and config errors)
        ("pretrain/dino.py --modality oct --max-steps -3", "--max-steps", (2,)),
        ("pretrain/mae.py --modality oct --limit 0", "--limit", (2,)),
        ("pretrain/dino.py --modality oct --set optim.lr=abc --max-steps 1", "optim.lr expects a number", (1, 2)),
        (f"pretrain/dino.py --modality oct --config {tmp / 'bad.yaml'} --max-steps 1", "bad.yaml", (1, 2)),
        (f"downstream/det.py --dataset IDRiD --target od --config {tmp / 'bad.yaml'} --max-steps 1", "bad.yaml",
         (1, 2)),
        ("downstream/det.py --dataset IDRiD --target od --set optim.lrr=1 --max-steps 1", "optim.lrr", (1, 2)),
        ("downstream/cls.py --dataset OCT_DME --modality oct --set optm.lr=1", "keys at this level", (1, 2)),
        (f"downstream/cls.py --dataset OCT_DME --modality oct --weights {tmp / 'random.safetensors'} --limit 8",
         "random.safetensors", (1,)),
        (f"downstream/seg.py --dataset DRIVE --max-steps 1 --output {tmp / 'afile'}", "afile", (2,)),
        (f"downstream/seg.py predict --checkpoint {tmp / 'none.pth'} --images {tmp / 'imgs'}", "none.pth", (1,)),
        (f"-m visionfm.weights convert {tmp / 'random.safetensors'} --modality oct", "random.safetensors", (1, 2)),
    ]


def test_every_cli_answers_bad_input_with_one_line_and_no_traceback(tmp_path, shared_data):
    os.environ.setdefault("VISIONFM_DATA", str(shared_data))
    failures = []
    for line, expected, status in _cases(tmp_path):
        takes_data_root = not line.startswith("-m") and " predict " not in line
        out = _run(*line.split(), *(["--data-root", str(shared_data)] if takes_data_root else []))
        text = out.stdout + out.stderr
        if out.returncode not in status or "Traceback (most recent call last)" in text or expected not in out.stderr:
            failures.append(f"{line}: exit {out.returncode} (want {status}); stderr tail: {out.stderr[-300:]!r}")
    assert not failures, "\n".join(failures)


def test_killed_classification_fine_tuning_resumes_to_the_uninterrupted_weights(tmp_path, shared_data):
    from conftest import run_and_sigkill_at_first_checkpoint

    def command(out: Path) -> list:
        return [sys.executable, "downstream/cls.py", "--dataset", "OCT_DME", "--modality", "oct", "--mode", "finetune",
                "--data-root", str(shared_data), "--limit", "8", "--output", str(out), "--precision", "fp32",
                "--set", "finetune.epochs=3", "--set", "finetune.batch_size=4", "--set", "eval.bootstrap=10",
                "--set", "train.checkpoint_every_steps=1"]

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    assert subprocess.run(command(whole), cwd=ROOT, env=env, capture_output=True, timeout=600).returncode == 0
    status = run_and_sigkill_at_first_checkpoint(command(killed), killed, timeout=600, name="finetune_state.pt")
    assert status != 0, "the run finished before it could be killed"
    rerun = subprocess.run(command(killed), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-500:]
    assert "resuming fine-tuning" in rerun.stdout + rerun.stderr
    a = torch.load(whole / "model.pt", weights_only=True)
    b = torch.load(killed / "model.pt", weights_only=True)
    a, b = (x.get("model", x) if isinstance(x, dict) else x for x in (a, b))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_named_source_of_another_run_is_refused_before_its_file_list_is_rewritten(tmp_path, shared_data):
    from visionfm.config import CONFIG_DIR, load_yaml
    from visionfm.pretrain_cli import prepare_named_source

    def config(source: str) -> dict:
        cfg = load_yaml(CONFIG_DIR / "pretrain" / "default.yaml")
        cfg["data"]["source"] = source
        return cfg

    first = config("DRIVE:train")
    prepare_named_source(first, str(shared_data), tmp_path, "cfp")
    write_run_config(first, tmp_path)
    before = _tree_digest(tmp_path)
    again = config("DRIVE:train")
    prepare_named_source(again, str(shared_data), tmp_path, "cfp")  # the same run: passes, the same file list
    assert _tree_digest(tmp_path) == before
    with pytest.raises(ConfigMismatchError, match="data.source 'DRIVE:train', not 'IDRiD:train'"):
        prepare_named_source(config("IDRiD:train"), str(shared_data), tmp_path, "cfp")
    assert _tree_digest(tmp_path) == before

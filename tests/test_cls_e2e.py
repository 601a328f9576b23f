"""End-to-end runs of downstream/cls.py (every mode, every dataset kind) on real images with a tiny encoder."""

from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn import metrics as skm
from timm.models.vision_transformer import VisionTransformer

from visionfm.data.datasets.oct_fundus import read_records
from visionfm.engine.checkpoint import safe_load
from visionfm.tasks.classification.cli import build_parser, config_from_args, main
from visionfm.tasks.classification.fewshot import fewshot_curve, format_table
from visionfm.weights.export import save_encoder

QUICK = ["--set", "eval.bootstrap=20", "--set", "linear.epochs=4", "--device", "cpu"]


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    """A 48-wide, 2-block ViT for 32-pixel OCT images, saved in our weights format."""
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=16, embed_dim=48, depth=2, num_heads=2, num_classes=0,
                            dynamic_img_size=True)
    path = tmp_path_factory.mktemp("weights") / "oct_tiny.safetensors"
    save_encoder(vit.state_dict(), path, {"modality": "oct", "num_heads": 2, "img_size": 32,
                                          "mean": [0.2, 0.2, 0.2], "std": [0.2, 0.2, 0.2]})
    return path


def _run(args, capsys) -> dict:
    rc = main(args + QUICK)
    err = capsys.readouterr().err
    assert rc == 0, err
    out = Path(args[args.index("--output") + 1])
    return json.loads((out / "metrics.json").read_text())


def _check_outputs(out: Path, metrics: dict) -> None:
    for name in ("config.yaml", "confusion_matrix.png", "roc_curves.png", "predictions_test.csv"):
        assert (out / name).is_file(), name
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    with Image.open(out / "roc_curves.png") as img:
        assert img.format == "PNG"
    test = metrics["test"]
    for key in ("accuracy", "balanced_accuracy", "auroc", "aupr", "f1_macro", "per_class", "confusion_matrix", "ci"):
        assert key in test, key
    assert test["ci"]["auroc"] is None or test["ci"]["auroc"][0] <= test["auroc"] <= test["ci"]["auroc"][1]
    assert metrics["val"]["n"] == metrics["data"]["splits"]["val"]["images"]
    assert metrics["test"]["n"] == metrics["data"]["splits"]["test"]["images"]


def _recompute_from_predictions(out: Path, metrics: dict) -> None:
    """The reported test metrics are those of the whole split's saved predictions (not per-batch averages)."""
    with open(out / "predictions_test.csv") as fh:
        rows = list(csv.DictReader(fh))
    y = np.array([int(r["target"]) for r in rows])
    pred = np.array([int(r["prediction"]) for r in rows])
    probs = np.array([[float(r[k]) for k in r if k.startswith("p_")] for r in rows])
    test = metrics["test"]
    assert test["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert test["f1_macro"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    if probs.shape[1] == 2:
        assert test["auroc"] == pytest.approx(skm.roc_auc_score(y, probs[:, 1]), abs=1e-5)
    else:
        assert test["kappa"] == pytest.approx(skm.cohen_kappa_score(y, pred, weights="quadratic",
                                                                    labels=list(range(probs.shape[1]))))


def test_linear_probe_oct_dme(shared_data, tiny_weights, tmp_path, capsys):
    out = tmp_path / "linear"
    m = _run(["--dataset", "OCT_DME", "--modality", "oct", "--mode", "linear", "--data-root", str(shared_data),
              "--weights", str(tiny_weights), "--limit", "12", "--max-steps", "3", "--output", str(out)], capsys)
    _check_outputs(out, m)
    _recompute_from_predictions(out, m)
    assert m["encoder"]["source"] == str(tiny_weights) and m["encoder"]["img_size"] == 32
    assert m["selection"]["select_metric"] == "auroc" and m["selection"]["steps_per_candidate"] == 3
    assert m["data"]["splits"]["train"]["images"] == 12
    saved = safe_load(out / "head.pt")
    assert saved["class_names"] == ["no DME", "DME"] and "head" in saved


def test_probe_with_mirrored_training_images(shared_data, tiny_weights, tmp_path, capsys):
    """``linear.mirror_train``: the probe trains on each training image and its mirror (twice the batches per
    epoch), while validation and test images are not mirrored (their counts stay)."""
    steps = {}
    for mirror in (False, True):
        out = tmp_path / f"mirror_{mirror}"
        m = _run(["--dataset", "OCT_DME", "--modality", "oct", "--mode", "linear", "--data-root", str(shared_data),
                  "--weights", str(tiny_weights), "--limit", "12", "--set", "linear.batch_size=4",
                  "--set", f"linear.mirror_train={str(mirror).lower()}", "--output", str(out)], capsys)
        steps[mirror] = m["selection"]["steps_per_candidate"]
        assert m["val"]["n"] == m["data"]["splits"]["val"]["images"]
    assert steps == {False: 4 * 3, True: 4 * 6}  # linear.epochs=4 (QUICK), 12 and 24 rows in batches of 4


def test_mlp_probe_on_dr_grades_with_shots(shared_data, tiny_weights, tmp_path, capsys):
    out = tmp_path / "mlp"
    m = _run(["--dataset", "OCT_DME", "--modality", "oct", "--task", "dr", "--mode", "linear", "--head", "mlp",
              "--pool", "cls+mean", "--last-blocks", "2", "--shots", "2", "--data-root", str(shared_data),
              "--weights", str(tiny_weights), "--limit", "15", "--output", str(out)], capsys)
    _check_outputs(out, m)
    _recompute_from_predictions(out, m)
    assert m["label_kind"] == "ordinal" and "kappa" in m["test"] and m["selection"]["select_metric"] == "kappa"
    assert m["data"]["splits"]["train_used"] == {"images": 6, "no DR": 2, "NPDR": 2, "PDR": 2}


def test_knn_random_init(shared_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VISIONFM_WEIGHTS", str(tmp_path / "no_weights"))  # no default weights: random vit_tiny
    out = tmp_path / "knn"
    m = _run(["--dataset", "OCT_DME", "--modality", "oct", "--mode", "knn", "--random-init", "--img-size", "32",
              "--data-root", str(shared_data), "--limit", "12", "--output", str(out)], capsys)
    _check_outputs(out, m)
    assert m["encoder"]["pretrained"] is False and m["selection"]["k"] in (10, 12)
    assert not (out / "head.pt").exists()


def test_knn_queries_with_their_mirror(shared_data, tiny_weights, tmp_path, capsys):
    """``eval.mirror`` reaches k-NN: validation and test queries are the mean of each image's and its mirror's
    features (the bank stays unmirrored), so the test probabilities change."""
    probs = {}
    for mirror in (False, True):
        out = tmp_path / f"knn_{mirror}"
        m = _run(["--dataset", "OCT_DME", "--modality", "oct", "--mode", "knn", "--data-root", str(shared_data),
                  "--weights", str(tiny_weights), "--limit", "12", "--set", "knn.k=[5]",
                  "--set", f"eval.mirror={str(mirror).lower()}", "--output", str(out)], capsys)
        assert m["test"]["n"] == m["data"]["splits"]["test"]["images"]
        with open(out / "predictions_test.csv") as fh:
            probs[mirror] = np.array([[float(r[k]) for k in r if k.startswith("p_")] for r in csv.DictReader(fh)])
    assert probs[False].shape == probs[True].shape
    assert not np.allclose(probs[False], probs[True])


def test_finetune_with_mixup_cutmix(shared_data, tiny_weights, tmp_path, capsys):
    out = tmp_path / "ft"
    m = _run(["--dataset", "OCT_DME", "--modality", "oct", "--mode", "finetune", "--data-root", str(shared_data),
              "--weights", str(tiny_weights), "--limit", "8", "--max-steps", "3", "--batch-size", "4",
              "--epochs", "3", "--set", "finetune.mixup=0.8", "--set", "finetune.cutmix=1.0",
              "--set", "finetune.drop_path=0.1", "--output", str(out)], capsys)
    _check_outputs(out, m)
    _recompute_from_predictions(out, m)
    sel = m["selection"]
    assert sel["steps"] == 3 and len(sel["history"]) == 2 and sel["epoch"] in (1, 2)
    saved = safe_load(out / "model.pt")
    assert any(k.startswith("encoder.blocks.1.") for k in saved["model"]) and saved["kind"] == "multiclass"


def test_finetune_from_a_probe(shared_data, tiny_weights, tmp_path, capsys, caplog):
    """LP-FT on real OCT images: the probe is selected on validation, and fine-tuning starts from its logits
    (the first validation of a one-step run with lr 0 equals the probe's); a rerun resumes without a new probe."""
    out = tmp_path / "lpft"
    args = ["--dataset", "OCT_DME", "--modality", "oct", "--mode", "finetune", "--data-root", str(shared_data),
            "--weights", str(tiny_weights), "--limit", "8", "--max-steps", "1", "--batch-size", "4",
            "--epochs", "1", "--set", "finetune.head_init=probe", "--set", "finetune.lr=0",
            "--set", "finetune.min_lr=0", "--set", "finetune.warmup_epochs=0", "--set", "finetune.augment=false",
            "--set", "finetune.drop_path=0", "--output", str(out),
            # fp32: under bf16 autocast the fine-tuned head's matmul rounds, the probe's (on cached features) not
            "--precision", "fp32"]
    m = _run(args, capsys)
    _check_outputs(out, m)
    probe = m["selection"]["head_init_probe"]
    assert probe["select_metric"] == "auroc" and len(probe["candidates"]) == 5
    first = m["selection"]["history"][0]
    assert first["val_auroc"] == pytest.approx(probe["val_auroc"], abs=1e-6)
    assert first["val_loss"] == pytest.approx(probe["val_loss"], abs=1e-4)
    # rerunning the command resumes from the finished run's state: the head comes from it, no probe is trained,
    # and the probe's record is the stored one
    caplog.clear()
    with caplog.at_level(logging.INFO):
        again = _run(args, capsys)
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("LP-FT: resuming from") for m in messages), messages
    assert not any(m.startswith("LP-FT: head initialised") for m in messages)
    assert again["selection"]["head_init_probe"] == probe
    rc = main(["--dataset", "OCT_DME", "--modality", "oct", "--mode", "finetune", "--data-root", str(shared_data),
               "--weights", str(tiny_weights), "--limit", "8", "--set", "finetune.head_init=lp",
               "--output", str(tmp_path / "bad")])
    assert rc == 1 and "finetune.head_init must be one of random, probe" in capsys.readouterr().err


def test_finetune_wise_interpolation(shared_data, tiny_weights, tmp_path, capsys):
    """WiSE-FT on real OCT images: the saved weights lie halfway between the encoder file (and the probe head)
    and what the same run reaches without interpolation; a rerun resumes and rebuilds the same start."""
    from safetensors.torch import load_file

    def args(alpha: float, out: Path):
        return ["--dataset", "OCT_DME", "--modality", "oct", "--mode", "finetune", "--data-root", str(shared_data),
                "--weights", str(tiny_weights), "--limit", "8", "--max-steps", "2", "--batch-size", "4",
                "--epochs", "1", "--set", "finetune.head_init=probe", "--set", "finetune.drop_path=0",
                "--set", f"finetune.wise_alpha={alpha}", "--output", str(out), "--precision", "fp32"]

    full = _run(args(1.0, tmp_path / "ft"), capsys)
    half = _run(args(0.5, tmp_path / "wise"), capsys)
    assert half["selection"]["wise_alpha"] == 0.5 and "wise_alpha" not in full["selection"]
    end = safe_load(tmp_path / "ft" / "model.pt")["model"]
    mid = safe_load(tmp_path / "wise" / "model.pt")["model"]
    start = {k[len("encoder."):]: 2 * mid[k] - end[k] for k in end if k.startswith("encoder.")}
    stored = load_file(str(tiny_weights))
    shared = [k for k in stored if k in start]
    assert len(shared) > 10
    moved = max(float((end["encoder." + k] - stored[k].float()).abs().max()) for k in shared)
    assert moved > 1e-4  # fine-tuning changed the encoder: halfway is a point of its own
    for k in shared:
        torch.testing.assert_close(start[k], stored[k].float(), atol=1e-5, rtol=0, msg=k)
    again = _run(args(0.5, tmp_path / "wise"), capsys)  # resumes from the finished state
    assert again["test"]["auroc"] == half["test"]["auroc"]
    resumed = safe_load(tmp_path / "wise" / "model.pt")["model"]
    assert all(torch.equal(resumed[k], mid[k]) for k in mid)
    rc = main(args(0.0, tmp_path / "bad"))
    assert rc == 1 and "finetune.wise_alpha must lie in (0, 1]" in capsys.readouterr().err


def test_imagefolder_and_csv_datasets(shared_data, tiny_weights, tmp_path, capsys):
    recs = sorted(read_records(shared_data, "oct"), key=lambda r: r.path.name)
    recs = [r for r in recs if r.dme == 0][:9] + [r for r in recs if r.dme == 1][:9]
    root = tmp_path / "folder"
    rows = []
    for i, r in enumerate(recs):
        split = ("train", "val", "test")[i % 3]
        cls = "DME" if r.dme else "normal"
        (root / split / cls).mkdir(parents=True, exist_ok=True)
        os.symlink(r.path, root / split / cls / r.path.name)
        rows.append([str(r.path), r.dme, int(r.dr == 2), split])
    out = tmp_path / "if"
    m = _run(["--dataset", "imagefolder", "--modality", "oct", "--mode", "knn", "--data-root", str(root),
              "--weights", str(tiny_weights), "--output", str(out)], capsys)
    assert m["classes"] == ["DME", "normal"] and m["data"]["splits"]["test"]["images"] == 6
    table = tmp_path / "labels.csv"
    with open(table, "w", newline="") as fh:
        csv.writer(fh).writerows([["path", "dme", "pdr", "split"]] + rows)
    out = tmp_path / "csv"
    m = _run(["--dataset", "csv", "--csv", str(table), "--label-columns", "dme,pdr", "--modality", "oct",
              "--mode", "linear", "--weights", str(tiny_weights), "--output", str(out)], capsys)
    _check_outputs(out, m)
    assert m["label_kind"] == "multilabel" and m["classes"] == ["dme", "pdr"]
    assert len(m["test"]["per_class"]) == 2 and "label_accuracy" in m["test"]


def test_errors_are_clear(shared_data, tmp_path, capsys):
    rc = main(["--dataset", "OCT_DME", "--modality", "oct", "--data-root", str(shared_data), "--weights",
               str(tmp_path / "none.safetensors"), "--output", str(tmp_path / "o")])
    assert rc == 1 and "none.safetensors" in capsys.readouterr().err
    rc = main(["--dataset", "OCT_DME", "--modality", "slitlamp", "--random-init", "--data-root", str(shared_data),
               "--output", str(tmp_path / "o")])
    assert rc == 1 and "slitlamp" in capsys.readouterr().err
    rc = main(["--dataset", "OCT_DME", "--data-root", str(tmp_path), "--random-init", "--output", str(tmp_path / "o")])
    assert rc == 1 and "OCT_AND_EYE_FUNDUS_DME_DR" in capsys.readouterr().err
    rc = main(["--dataset", "csv", "--random-init", "--output", str(tmp_path / "o")])
    assert rc == 1 and "--csv" in capsys.readouterr().err
    rc = main(["--modality", "oct", "--set", "linear.nonexistent=1", "--output", str(tmp_path / "o")])
    assert rc == 2 and "nonexistent" in capsys.readouterr().err


def test_fewshot_curve(shared_data, tiny_weights, tmp_path):
    args = build_parser().parse_args(["--dataset", "OCT_DME", "--modality", "oct", "--mode", "linear",
                                      "--data-root", str(shared_data), "--weights", str(tiny_weights),
                                      "--limit", "10", "--max-steps", "2", "--device", "cpu"])
    cfg = config_from_args(args)
    result = fewshot_curve(cfg, tmp_path / "fs", shots_list=[1, 3], repeats=2, compare_random_init=True,
                           n_bootstrap=5)
    rows = {(r["encoder"], r["shots"]): r for r in result["rows"]}
    assert set(rows) == {(e, k) for e in ("pretrained", "random_init") for k in (1, 3, "all")}
    assert rows[("pretrained", 1)]["train_images"] == [2, 2] and rows[("pretrained", 3)]["runs"] == 2
    assert rows[("pretrained", "all")]["train_images"] == [10]
    assert json.loads((tmp_path / "fs" / "fewshot.json").read_text())["metric"] == "auroc"
    ri = json.loads((tmp_path / "fs" / "random_init" / "shots_1" / "seed_0" / "metrics.json").read_text())
    assert ri["encoder"]["pretrained"] is False and ri["encoder"]["img_size"] == 32
    assert "| 3 |" in format_table(result)


def test_random_init_with_weights_keeps_shape_not_values(shared_data, tiny_weights, tmp_path, monkeypatch):
    import shutil

    from visionfm.tasks.classification.runner import ClassificationExperiment

    base = ["--dataset", "OCT_DME", "--modality", "oct", "--data-root", str(shared_data), "--weights",
            str(tiny_weights), "--limit", "4", "--device", "cpu"]
    pre = ClassificationExperiment(config_from_args(build_parser().parse_args(base)))
    rnd = ClassificationExperiment(config_from_args(build_parser().parse_args(base + ["--random-init"])))
    assert rnd.info.pretrained is False and rnd.encoder.embed_dim == 48 and len(rnd.encoder.blocks) == 2
    assert rnd.img_size == pre.img_size == 32
    a, b = pre.encoder.state_dict(), rnd.encoder.state_dict()
    assert a.keys() == b.keys()
    assert not torch.allclose(a["blocks.0.attn.qkv.weight"], b["blocks.0.attn.qkv.weight"])
    # Without --weights, the random baseline takes the shape of the modality's default weights.
    (tmp_path / "w").mkdir()
    shutil.copy(tiny_weights, tmp_path / "w" / "oct_tiny.safetensors")
    monkeypatch.setenv("VISIONFM_WEIGHTS", str(tmp_path / "w"))
    default = base[:base.index("--weights")] + base[base.index("--weights") + 2:] + ["--random-init"]
    rnd2 = ClassificationExperiment(config_from_args(build_parser().parse_args(default)))
    assert rnd2.info.pretrained is False and rnd2.encoder.embed_dim == 48 and rnd2.img_size == 32


def test_recipes_only_use_known_keys():
    """Every configs/cls/*.yaml merges onto the default without new keys (a typo would be silently ignored)."""
    from visionfm.config import CONFIG_DIR, load_yaml

    default = load_yaml(CONFIG_DIR / "cls" / "default.yaml")

    def unknown(recipe, base, prefix=""):
        for key, value in recipe.items():
            if key not in base:
                yield prefix + key
            elif isinstance(value, dict) and isinstance(base[key], dict):
                yield from unknown(value, base[key], prefix + key + ".")

    recipes = sorted((CONFIG_DIR / "cls").glob("*.yaml"))
    assert len(recipes) >= 5
    for path in recipes:
        assert not list(unknown(load_yaml(path), default)), path.name
        args = build_parser().parse_args(["--config", str(path), "--modality", "oct"])
        assert config_from_args(args)["mode"] in ("linear", "finetune", "knn")

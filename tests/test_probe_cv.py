"""benchmarks/probe_cv.py and grouped_folds: linear-probe settings compared by patient-grouped cross-validation."""

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.models.vision_transformer import VisionTransformer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import probe_cv  # noqa: E402
from visionfm.data.datasets.eyedisease4 import read_eyedisease4  # noqa: E402
from visionfm.data.datasets.labeled import LabeledSample, grouped_folds  # noqa: E402
from visionfm.weights.export import save_encoder  # noqa: E402


def test_grouped_folds_on_eyedisease4(shared_data):
    data = read_eyedisease4(shared_data)
    samples = data.splits["train"] + data.splits["val"]
    fold = grouped_folds(samples, 5, seed=0)
    assert set(fold) == {s.group_key for s in samples} and set(fold.values()) == set(range(5))
    sizes = Counter(fold.values())  # groups per fold: dealt round-robin across strata
    assert max(sizes.values()) - min(sizes.values()) <= 1
    for k in range(5):  # every class in every fold, about a fifth of it
        counts = Counter(s.label for s in samples if fold[s.group_key] == k)
        for c in range(4):
            total = sum(s.label == c for s in samples)
            assert abs(counts[c] - total / 5) < 0.05 * total + 5
    assert grouped_folds(list(reversed(samples)), 5, seed=0) == fold  # independent of the input order
    assert grouped_folds(samples, 5, seed=1) != fold


def test_grouped_folds_keep_patients_together_and_refuse_too_few_groups():
    samples = [LabeledSample(Path(f"{i}.png"), i % 2, group=f"p{i // 3}") for i in range(30)]  # 10 patients
    fold = grouped_folds(samples, 3)
    assert len(fold) == 10 and sorted(Counter(fold.values()).values()) == [3, 3, 4]
    with pytest.raises(ValueError, match="3 folds need"):
        grouped_folds(samples[:6], 3)  # 2 patients
    with pytest.raises(ValueError, match="1 folds need"):
        grouped_folds(samples, 1)


def test_fold_splits_roles():
    samples = [LabeledSample(Path(f"{i}.png"), i % 2, group=f"p{i}") for i in range(8)]
    fold = {f"p{i}": i % 4 for i in range(8)}
    splits = probe_cv.fold_splits(samples, fold, 3)
    assert [s.group for s in splits["test"]] == ["p3", "p7"]
    assert [s.group for s in splits["val"]] == ["p0", "p4"]  # the next fold, wrapping round
    assert len(splits["train"]) == 4


def test_variants_only_change_probe_settings():
    assert probe_cv.parse_probe_variant("m=eval.mirror=true eval.select_metric=balanced_accuracy") == (
        "m", ["eval.mirror=true", "eval.select_metric=balanced_accuracy"])
    assert probe_cv.parse_probe_variant("base=") == ("base", [])
    with pytest.raises(Exception, match="not a probe setting"):
        probe_cv.parse_probe_variant("x=data.img_size=256")
    with pytest.raises(Exception, match="'linear.lr' is not KEY=VALUE"):
        probe_cv.parse_probe_variant("x=linear.lr")
    with pytest.raises(Exception, match="expected NAME=KEY=VALUE"):
        probe_cv.parse_probe_variant("=linear.lr=0.1")


@pytest.fixture
def tiny_eyedisease4(tmp_path):
    """EyeDisease4's layout with 4 classes of 15 images (class = colour), and a tiny cfp encoder for 32 px."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(("cataract", "diabetic_retinopathy", "glaucoma", "normal")):
        folder = tmp_path / "data" / "EyeDisease4" / "train" / name
        folder.mkdir(parents=True)
        for i in range(15):
            image = rng.integers(0, 80, (40, 48, 3), dtype=np.uint8)
            image[:, : 12 * (c + 1), c % 3] += 40  # left-right asymmetric (the mirror changes the features) and
            # faint, so that no variant scores a perfect fold and the variants' figures can differ
            Image.fromarray(image).save(folder / f"img{i}.png")
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=16, embed_dim=48, depth=2, num_heads=2, num_classes=0,
                            dynamic_img_size=True)
    weights = tmp_path / "cfp_tiny.safetensors"
    save_encoder(vit.state_dict(), weights, {"modality": "cfp", "num_heads": 2, "img_size": 32,
                                             "mean": [0.3, 0.3, 0.3], "std": [0.2, 0.2, 0.2]})
    return tmp_path / "data", weights


def test_probe_cv_end_to_end(tiny_eyedisease4, tmp_path, capsys):
    data_root, weights = tiny_eyedisease4
    out = tmp_path / "cv.json"
    rc = probe_cv.main(["--data-root", str(data_root), "--weights", str(weights), "--device", "cpu", "--folds", "3",
                        "--set", "linear.epochs=3", "--set", "linear.weight_decays=[0.0,1.0]", "--json", str(out),
                        "--variant", "base=", "--variant", "mirror=eval.mirror=true",
                        "--variant", "same=linear.epochs=3"])
    assert rc == 0
    table = capsys.readouterr().out
    assert "| mirror |" in table and "vs base" in table
    result = json.loads(out.read_text())
    carve = read_eyedisease4(data_root)
    assert result["images"] == len(carve.splits["train"]) + len(carve.splits["val"])  # the test carve is not read
    rows = result["table"]
    assert all(len(rows[v]["per_fold"]) == 3 for v in rows)
    assert rows["base"]["diff"] == 0 and rows["same"] == rows["base"]  # same settings: the same probes, figures
    assert rows["mirror"] != rows["base"]  # the variant's eval.mirror reaches its probes
    assert all(sel["weight_decay"] in (0.0, 1.0) and 1 <= sel["epoch"] <= 3 for sel in rows["base"]["selections"])

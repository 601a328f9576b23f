"""The transfer suite: the paired bootstrap of a difference, the EyeDisease4 carve, and a --quick run end to end
on the real data."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visionfm.data.datasets.eyedisease4 import CLASSES, patient_of, read_eyedisease4
from visionfm.data.unlabeled import DataError
from visionfm.evaluation.paired import metric_difference, paired_bootstrap
from visionfm.evaluation.transfer import segmentation_rows

REPO = Path(__file__).resolve().parents[1]


def _binary_scores(score: np.ndarray) -> np.ndarray:
    """``(1, N, 2)`` class probabilities from a real-valued positive-class score."""
    p = 1.0 / (1.0 + np.exp(-score))
    return np.stack([1.0 - p, p], axis=-1)[None]


@pytest.fixture(scope="module")
def binary_task():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 100)
    informative = _binary_scores(2.0 * y + rng.normal(0.0, 1.0, y.size))
    also_informative = _binary_scores(2.0 * y + rng.normal(0.0, 1.0, y.size))
    noise = _binary_scores(rng.normal(0.0, 1.0, y.size))
    return y, informative, also_informative, noise


# ------------------------------------------------------------------------------------------ paired bootstrap

def test_real_difference_gives_interval_above_zero(binary_task):
    y, informative, _, noise = binary_task
    result = paired_bootstrap(metric_difference(y, informative, noise, ["auroc"]), len(y), strata=y,
                              n_resamples=300, seed=0)
    assert result.estimate[0] > 0.3
    assert 0.0 < result.low[0] < result.estimate[0] < result.high[0]


def test_identical_inputs_give_interval_containing_zero(binary_task):
    y, informative, also_informative, _ = binary_task
    same = paired_bootstrap(metric_difference(y, informative, informative.copy(), ["auroc", "balanced_accuracy"]),
                            len(y), strata=y, n_resamples=200, seed=1)
    assert np.all(same.estimate == 0.0) and np.all(same.low <= 0.0) and np.all(same.high >= 0.0)
    # Two different scorers of the same quality: no difference to find either.
    equal = paired_bootstrap(metric_difference(y, informative, also_informative, ["auroc"]), len(y), strata=y,
                             n_resamples=300, seed=2)
    assert equal.low[0] < 0.0 < equal.high[0]


def test_resampling_is_stratified_and_paired():
    strata = np.array([0] * 30 + [1] * 10 + [2] * 5)
    # Every resample keeps the class counts exactly.
    counts = paired_bootstrap(lambda items, draws: np.bincount(strata[items], minlength=3), len(strata),
                              strata=strata, n_resamples=50)
    assert counts.low.tolist() == counts.high.tolist() == [30, 10, 5]
    # A model better by exactly 1 on every item: pairing leaves no spread at all.
    a = np.random.default_rng(0).normal(size=45)
    exact = paired_bootstrap(lambda items, draws: (a[items] + 1.0).mean() - a[items].mean(), 45, n_resamples=50)
    assert exact.low[0] == pytest.approx(1.0) and exact.high[0] == pytest.approx(1.0)


def test_draws_are_resampled():
    per_draw = np.array([0.1, 0.2, 0.6])
    result = paired_bootstrap(lambda items, draws: per_draw[draws].mean(), n_items=4, n_draws=3, n_resamples=200)
    assert result.estimate[0] == pytest.approx(0.3)
    assert 0.1 <= result.low[0] < 0.3 < result.high[0] <= 0.6


def test_bad_arguments_are_errors(binary_task):
    y, informative, _, noise = binary_task
    with pytest.raises(ValueError, match="one label per item"):
        paired_bootstrap(lambda i, d: 0.0, len(y), strata=y[:-1])
    with pytest.raises(ValueError, match="scores must both be"):
        metric_difference(y, informative, noise[:, :-1], ["auroc"])


def test_segmentation_rows_pool_dice_over_images():
    def run(counts):
        return {"per_image": [{"name": f"{i:02d}", "tp": tp, "fp": fp, "fn": fn, "auc": auc}
                              for i, (tp, fp, fn, auc) in enumerate(counts)]}

    good = [(90, 10, 10, 0.99), (80, 20, 20, 0.98), (70, 5, 30, 0.97), (60, 30, 10, None)]
    bad = [(50, 50, 50, 0.90), (40, 40, 60, 0.85), (70, 5, 30, 0.97), (10, 60, 60, 0.50)]
    dice, auc = segmentation_rows("toy", {"pretrained": run(good), "random_init": run(bad)}, 200, 0)
    tp, fp, fn = np.sum([g[:3] for g in good], axis=0)
    assert dice.pretrained == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert auc.pretrained == pytest.approx(np.mean([0.99, 0.98, 0.97]))  # an image without AUC is left out
    assert dice.diff == pytest.approx(dice.pretrained - dice.random_init) and dice.n == 4
    assert dice.ci95[0] <= dice.diff <= dice.ci95[1]
    with pytest.raises(ValueError, match="different images"):
        segmentation_rows("toy", {"pretrained": run(good), "random_init": run(bad[:3])}, 10, 0)


# ------------------------------------------------------------------------------------------ EyeDisease4 carve

@pytest.fixture
def eyedisease_root(tmp_path):
    """A small EyeDisease4 tree: per class some two-eye patients, some single eyes and some unpatterned names."""
    sizes = {"cataract": 25, "diabetic_retinopathy": 40, "glaucoma": 15, "normal": 50}
    image = Image.new("RGB", (8, 8), (120, 40, 20))
    for c, (name, n) in enumerate(sizes.items()):
        folder = tmp_path / "EyeDisease4" / "train" / name
        folder.mkdir(parents=True)
        ext = "jpeg" if name == "diabetic_retinopathy" else "jpg"
        for i in range(n):
            patient = 1000 * c + i // 2 if i < n - 5 else 1000 * c + 500 + i
            stem = f"{name}_{i:03d}" if i % 7 == 6 else f"{patient}_{'left' if i % 2 else 'right'}"
            image.save(folder / f"{stem}.{ext}", format="JPEG")
    return tmp_path, sizes


def _check_carve(splits, sizes, fraction, images=0, share=0.0):
    """Every class keeps its share of the evaluation part within ``images`` images or ``share`` of the class,
    and no patient is in two parts."""
    assert splits.class_names == list(CLASSES)
    counts = {part: splits.class_counts(part) for part in ("train", "val", "test")}
    for c, name in enumerate(splits.class_names):
        total = sum(counts[p][c] for p in counts)
        assert total == sizes[name]
        assert abs(counts["test"][c] - fraction * total) <= max(images, share * total), (name, counts)
    groups = {part: {s.group_key for s in splits.splits[part]} for part in counts}
    assert not groups["train"] & groups["val"] and not groups["train"] & groups["test"] \
        and not groups["val"] & groups["test"]


def test_carve_is_stratified_grouped_and_deterministic(eyedisease_root):
    root, sizes = eyedisease_root
    splits = read_eyedisease4(root)
    _check_carve(splits, sizes, 0.2, images=2)  # whole patients move: within a pair of images per class
    again = read_eyedisease4(root)
    assert all([s.path for s in splits.splits[p]] == [s.path for s in again.splits[p]] for p in splits.splits)
    # The evaluation part does not depend on how much is set aside for selection; another seed moves it.
    other_selection = read_eyedisease4(root, selection_fraction=0.3)
    assert [s.path for s in other_selection.splits["test"]] == [s.path for s in splits.splits["test"]]
    other_seed = read_eyedisease4(root, seed=1)
    assert [s.path for s in other_seed.splits["test"]] != [s.path for s in splits.splits["test"]]
    assert "carved" in splits.notes[0]


def test_patient_ids_and_errors(tmp_path):
    assert patient_of("normal/1034_left.jpg") == patient_of("normal/1034_right.jpg") == "jpg:1034"
    assert patient_of("dr/1034_left.jpeg") == "jpeg:1034"  # another source's numbering
    assert patient_of("cataract/cataract_099.png") is None
    with pytest.raises(DataError, match="EyeDisease4/train does not exist"):
        read_eyedisease4(tmp_path)
    (tmp_path / "EyeDisease4" / "train" / "normal").mkdir(parents=True)
    (tmp_path / "EyeDisease4" / "train" / "glaucoma").mkdir()
    with pytest.raises(DataError, match="glaucoma: class folder holds no images"):
        read_eyedisease4(tmp_path)
    with pytest.raises(DataError, match="leave images for training"):
        read_eyedisease4(tmp_path, eval_fraction=0.5, selection_fraction=0.5)


def test_carve_of_the_real_eyedisease4(shared_data):
    splits = read_eyedisease4(shared_data)
    sizes = {name: n for name, n in zip(splits.class_names, [sum(x) for x in zip(
        *(splits.class_counts(p) for p in ("train", "val", "test")))])}
    assert sum(sizes.values()) == 2480
    _check_carve(splits, sizes, 0.2, share=0.015)  # measured: 19.3-20.7 % of each class


# ------------------------------------------------------------------------------------------ end to end

def _transfer_main():
    spec = importlib.util.spec_from_file_location("transfer_benchmark", REPO / "benchmarks" / "transfer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_quick_suite_oct_end_to_end(shared_data, tmp_path, capsys):
    out = tmp_path / "oct.json"
    rc = _transfer_main()(["--modality", "oct", "--quick", "--data-root", str(shared_data), "--json", str(out),
                           "--output", str(tmp_path / "runs")])
    assert rc == 0
    result = json.loads(out.read_text())
    assert {"rows", "weights", "random_init", "ci", "seconds"} <= set(result)
    assert Path(result["random_init"]["weights"]).is_file()
    tasks = [(r["task"], r["metric"]) for r in result["rows"]]
    assert tasks == [("OCT DME linear probe", "auroc"), ("OCT DME 2-shot probe", "auroc"),
                     ("OCT DME fine-tuning", "auroc")]
    for row in result["rows"]:
        assert {"pretrained", "random_init", "diff", "ci95", "n"} <= set(row)
        assert row["diff"] == pytest.approx(row["pretrained"] - row["random_init"], abs=1e-9)
        assert row["ci95"] is None or row["ci95"][0] <= row["ci95"][1]
    assert result["rows"][1]["pretrained_sd"] is not None  # over the draws
    for encoder in ("pretrained", "random_init"):  # LP-FT for both: the head starts from a probe on frozen features
        assert result["tasks"]["OCT DME fine-tuning"][encoder]["head_init_probe"]["weight_decay"] is not None
    table = capsys.readouterr().out
    assert "| OCT DME fine-tuning | AUROC |" in table and "random init" in table


def test_eyedisease4_rows_use_the_suite_protocol(shared_data, tmp_path):
    """The EyeDisease4 probe trains with a class-balanced loss (its row reports balanced accuracy), at the rate
    chosen for it by cross-validation (the default's 0.001 under-trains it)."""
    from visionfm.evaluation.transfer import QUICK, SuiteContext, eyedisease4_frozen, make_random_twin

    source, twin = make_random_twin("cfp", None, tmp_path / "twin.safetensors")
    ctx = SuiteContext("cfp", {"pretrained": source, "random_init": twin}, shared_data, tmp_path, QUICK)
    rows, details = eyedisease4_frozen(ctx)
    assert [(r.task, r.metric) for r in rows] == [
        ("EyeDisease4 linear probe", "balanced_accuracy"), ("EyeDisease4 linear probe", "auroc"),
        ("EyeDisease4 k-NN", "balanced_accuracy"), ("EyeDisease4 k-NN", "auroc")]
    for encoder in ("pretrained", "random_init"):
        assert details[encoder]["probe"]["class_weight"] == "balanced"
        assert details[encoder]["probe"]["lr"] == QUICK.eyedisease4_probe_lr == 0.01

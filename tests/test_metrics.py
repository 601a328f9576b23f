"""Whole-split classification metrics against scikit-learn on fixed inputs, bootstrap intervals, plots."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as skm

from visionfm.metrics import (average_precision, binary_auroc, bootstrap_ci, classification_metrics, confusion_matrix,
                              evaluate_split, plot_confusion_matrix, plot_roc_curves, quadratic_kappa, roc_curve,
                              to_jsonable)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.fixture
def multiclass():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 4, 60)
    logits = rng.normal(size=(60, 4)) + 1.5 * np.eye(4)[y]
    probs = _softmax(logits)
    probs[5] = probs[6]  # a tie
    return y, probs


def test_binary_metrics_match_sklearn():
    y = np.array([0, 0, 1, 1, 0, 1, 1, 0, 1, 0, 0, 1])
    p1 = np.array([0.1, 0.4, 0.35, 0.8, 0.4, 0.9, 0.4, 0.2, 0.65, 0.7, 0.05, 0.55])  # ties at 0.4
    probs = np.stack([1 - p1, p1], axis=1)
    m = classification_metrics(y, probs, "multiclass")
    pred = (p1 >= 0.5).astype(int)
    assert m["auroc"] == pytest.approx(skm.roc_auc_score(y, p1))
    assert m["aupr"] == pytest.approx(skm.average_precision_score(y, p1))
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, probs.argmax(1)))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, probs.argmax(1)))
    assert m["f1_macro"] == pytest.approx(skm.f1_score(y, probs.argmax(1), average="macro"))
    tn, fp, fn, tp = skm.confusion_matrix(y, pred).ravel()
    assert m["per_class"][1]["sensitivity"] == pytest.approx(tp / (tp + fn))
    assert m["per_class"][1]["specificity"] == pytest.approx(tn / (tn + fp))
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred).tolist()


def test_multiclass_metrics_match_sklearn(multiclass):
    y, probs = multiclass
    m = classification_metrics(y, probs, "multiclass")
    pred = probs.argmax(1)
    assert m["auroc"] == pytest.approx(skm.roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    onehot = np.eye(4)[y]
    assert m["aupr"] == pytest.approx(skm.average_precision_score(onehot, probs, average="macro"))
    assert m["f1_macro"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    sens = skm.recall_score(y, pred, average=None)
    assert [c["sensitivity"] for c in m["per_class"]] == pytest.approx(list(sens))
    for c in range(4):
        assert m["per_class"][c]["auroc"] == pytest.approx(skm.roc_auc_score(y == c, probs[:, c]))


def test_macro_f1_ignores_classes_neither_true_nor_predicted():
    y = np.array([0, 0, 1, 1, 1])
    pred = np.array([0, 1, 1, 1, 0])
    cm = confusion_matrix(y, pred, 3)
    from visionfm.metrics import macro_f1

    assert macro_f1(cm) == pytest.approx(skm.f1_score(y, pred, average="macro"))


def test_quadratic_kappa_matches_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 80)
    pred = np.clip(y + rng.integers(-1, 2, 80), 0, 4)
    pred[:7] = 4 - y[:7]
    cm = confusion_matrix(y, pred, 5)
    expected = skm.cohen_kappa_score(y, pred, weights="quadratic", labels=list(range(5)))
    assert quadratic_kappa(cm) == pytest.approx(expected)
    probs = np.eye(5)[pred] * 0.6 + 0.08
    m = classification_metrics(y, probs, "ordinal", y_pred=pred)
    assert m["kappa"] == pytest.approx(expected)
    assert quadratic_kappa(confusion_matrix(y, y, 5)) == pytest.approx(1.0)


def test_multilabel_metrics_match_sklearn():
    rng = np.random.default_rng(1)
    y = (rng.random((50, 3)) < [0.3, 0.5, 0.2]).astype(int)
    scores = np.clip(0.6 * y + rng.random((50, 3)) * 0.6, 0, 1)
    m = classification_metrics(y, scores, "multilabel")
    pred = (scores >= 0.5).astype(int)
    assert m["auroc"] == pytest.approx(skm.roc_auc_score(y, scores, average="macro"))
    assert m["aupr"] == pytest.approx(skm.average_precision_score(y, scores, average="macro"))
    assert m["f1_macro"] == pytest.approx(skm.f1_score(y, pred, average="macro", zero_division=0))
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["label_accuracy"] == pytest.approx(1 - skm.hamming_loss(y, pred))
    for j in range(3):
        assert m["per_class"][j]["sensitivity"] == pytest.approx(skm.recall_score(y[:, j], pred[:, j]))


def test_roc_curve_and_ap_edge_cases():
    y = np.array([0, 1, 0, 1])
    s = np.array([0.2, 0.2, 0.7, 0.9])
    fpr, tpr = roc_curve(y, s)
    sk_fpr, sk_tpr, _ = skm.roc_curve(y, s, drop_intermediate=False)
    assert np.allclose(fpr, sk_fpr) and np.allclose(tpr, sk_tpr)
    assert math.isnan(binary_auroc(np.zeros(4), s))
    assert math.isnan(average_precision(np.zeros(4), s))
    assert binary_auroc(np.array([0, 0, 1, 1]), np.array([0.5, 0.5, 0.5, 0.5])) == pytest.approx(0.5)


def test_metrics_are_not_batch_averages(multiclass):
    """AUROC of the whole split differs from the mean of per-batch AUROCs: the code must use the former."""
    y = np.array([0, 1, 0, 1, 0, 1, 0, 1])
    p1 = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    probs = np.stack([1 - p1, p1], 1)
    whole = classification_metrics(y, probs, "multiclass")["auroc"]
    halves = np.mean([skm.roc_auc_score(y[i:i + 4], p1[i:i + 4]) for i in (0, 4)])
    assert whole == pytest.approx(skm.roc_auc_score(y, p1))
    assert whole != pytest.approx(halves)


def test_bootstrap_ci_brackets_estimate_and_is_seeded(multiclass):
    y, probs = multiclass
    ci = bootstrap_ci(y, probs, "multiclass", n_resamples=300, seed=5)
    point = classification_metrics(y, probs, "multiclass")
    for key in ("accuracy", "auroc", "aupr", "f1_macro", "balanced_accuracy"):
        lo, hi = ci[key]
        assert lo <= point[key] <= hi and hi - lo > 0
    assert ci == bootstrap_ci(y, probs, "multiclass", n_resamples=300, seed=5)
    assert ci != bootstrap_ci(y, probs, "multiclass", n_resamples=300, seed=6)
    # More data, narrower interval.
    big = bootstrap_ci(np.tile(y, 8), np.tile(probs, (8, 1)), "multiclass", n_resamples=300, seed=5)
    assert big["auroc"][1] - big["auroc"][0] < ci["auroc"][1] - ci["auroc"][0]


def test_bootstrap_is_stratified_for_single_label():
    y = np.array([0] * 30 + [1] * 2)
    p1 = np.linspace(0, 1, 32)
    ci = bootstrap_ci(y, np.stack([1 - p1, p1], 1), "multiclass", n_resamples=200, seed=0)
    assert ci["auroc"] is not None  # every resample keeps both positives' class present


def test_evaluate_split_names_classes_and_serialises(tmp_path):
    y = np.array([0, 1, 2, 2, 1, 0, 2])
    probs = _softmax(np.eye(3)[y] * 2 + np.random.default_rng(0).normal(size=(7, 3)))
    out = evaluate_split(y, probs, "ordinal", ["none", "mild", "severe"], n_resamples=50)
    assert [c["name"] for c in out["per_class"]] == ["none", "mild", "severe"]
    assert "kappa" in out["ci"] and out["ci_resamples"] == 50
    assert "sensitivity" in out["per_class"][0]["ci"]
    with pytest.raises(ValueError, match="class names"):
        evaluate_split(y, probs, "ordinal", ["a", "b"], n_resamples=0)
    assert to_jsonable({"a": float("nan"), "b": np.float32(0.5), "c": np.arange(2)}) == {"a": None, "b": 0.5,
                                                                                          "c": [0, 1]}


def test_bad_inputs_fail_early():
    with pytest.raises(ValueError, match="kind"):
        classification_metrics(np.array([0, 1]), np.eye(2), "binary")
    with pytest.raises(ValueError, match="class indices"):
        classification_metrics(np.array([0, 2]), np.eye(2), "multiclass")
    with pytest.raises(ValueError, match="shape"):
        classification_metrics(np.zeros((2, 3)), np.zeros((2, 2)), "multilabel")


def test_plots_write_pngs(tmp_path, multiclass):
    y, probs = multiclass
    names = ["a", "b", "c", "d"]
    cm = classification_metrics(y, probs, "multiclass")["confusion_matrix"]
    p1 = plot_confusion_matrix(cm, names, tmp_path / "cm.png")
    p2 = plot_roc_curves(y, probs, "multiclass", names, tmp_path / "roc.png")
    ym = (probs > 0.3).astype(int)
    p3 = plot_confusion_matrix(np.array(classification_metrics(ym, probs, "multilabel")["confusion_matrix"]), names,
                               tmp_path / "cm_ml.png")
    for p in (p1, p2, p3):
        with Image.open(p) as img:
            assert img.format == "PNG" and img.size[0] > 100

"""Vessel metrics: a hand-computed case, pooled vs per-image, histogram AUCs against scikit-learn."""

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from visionfm.tasks.segmentation.metrics import BinarySegMetrics, auc_from_histograms, binary_metrics


def test_hand_computed_case_inside_fov():
    # 3x3 image; the last column is outside the FOV and holds a wrong prediction that must not count.
    prob = np.array([[0.9, 0.2, 0.8],
                     [0.6, 0.4, 0.9],
                     [0.1, 0.7, 0.95]])
    truth = np.array([[1, 0, 0],
                      [1, 1, 0],
                      [0, 0, 0]], bool)
    fov = np.array([[1, 1, 0],
                    [1, 1, 0],
                    [1, 1, 0]], bool)
    m = binary_metrics(prob, truth, fov)
    # Inside the FOV: probs 0.9 0.2 / 0.6 0.4 / 0.1 0.7, truth 1 0 / 1 1 / 0 0.
    # Predicted (> 0.5): 0.9, 0.6, 0.7 -> TP = 2 (0.9, 0.6), FP = 1 (0.7), FN = 1 (0.4), TN = 2 (0.2, 0.1).
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (2, 1, 1, 2)
    assert m["dice"] == pytest.approx(4 / 6)
    assert m["iou"] == pytest.approx(2 / 4)
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(2 / 3)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["precision"] == pytest.approx(2 / 3)
    # AUC: positives {0.9, 0.6, 0.4} vs negatives {0.2, 0.1, 0.7}: pairs won 3+2+2 = 7 of 9.
    assert m["auc"] == pytest.approx(7 / 9)
    # AP: ranked 0.9(+) 0.7(-) 0.6(+) 0.4(+): (1/3)*1 + (1/3)*(2/3) + (1/3)*(3/4)
    assert m["aupr"] == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)


def test_threshold_is_strict_like_argmax():
    m = binary_metrics(np.array([0.5, 0.5]), np.array([1, 0], bool))
    assert m["tp"] == 0 and m["fn"] == 1  # 0.5 is not foreground (mmseg's argmax picks class 0 on a tie)


def test_empty_truth_and_prediction():
    m = binary_metrics(np.zeros((4, 4)), np.zeros((4, 4), bool))
    assert m["dice"] == 1.0 and m["iou"] == 1.0 and m["specificity"] == 1.0
    assert math.isnan(m["sensitivity"]) and math.isnan(m["auc"])


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ in shape"):
        binary_metrics(np.zeros((4, 4)), np.zeros((4, 5), bool))


def test_pooled_and_mean_against_sklearn():
    rng = np.random.default_rng(0)
    acc = BinarySegMetrics(threshold=0.5)
    all_p, all_t = [], []
    per_image_dice = []
    for i in range(3):
        truth = rng.random((40, 50)) < 0.2
        prob = np.clip(truth * 0.35 + rng.random((40, 50)) * 0.65, 0, 1)
        fov = np.ones_like(truth)
        fov[:5] = False
        m = acc.update(f"img{i}", prob, truth, fov)
        per_image_dice.append(m["dice"])
        all_p.append(prob[fov])
        all_t.append(truth[fov])
        assert m["auc"] == pytest.approx(roc_auc_score(truth[fov], prob[fov]), abs=1e-5)
        assert m["aupr"] == pytest.approx(average_precision_score(truth[fov], prob[fov]), abs=1e-4)
    p, t = np.concatenate(all_p), np.concatenate(all_t)
    pooled = acc.pooled()
    pred = p > 0.5
    tp, fp, fn = (pred & t).sum(), (pred & ~t).sum(), (~pred & t).sum()
    assert pooled["dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert pooled["auc"] == pytest.approx(roc_auc_score(t, p), abs=1e-5)
    assert pooled["aupr"] == pytest.approx(average_precision_score(t, p), abs=1e-4)
    assert acc.mean()["dice"] == pytest.approx(np.mean(per_image_dice))
    summary = acc.summary()
    assert summary["n_images"] == 3 and [r["name"] for r in summary["per_image"]] == ["img0", "img1", "img2"]


def test_histogram_auc_counts_ties_half():
    pos = np.array([0, 1, 1])  # positives in bins 1 and 2
    neg = np.array([1, 1, 0])  # negatives in bins 0 and 1
    # pairs: pos@1 vs neg@0 win, vs neg@1 tie; pos@2 wins both -> (1 + 0.5 + 2) / 4
    assert auc_from_histograms(pos, neg)["auc"] == pytest.approx(3.5 / 4)


def test_best_dice_threshold_matches_a_brute_force_sweep():
    rng = np.random.default_rng(3)
    acc = BinarySegMetrics()
    probs, truths = [], []
    for i in range(2):
        truth = rng.random((40, 50)) < 0.2
        prob = np.clip(0.35 * truth + 0.55 * rng.random((40, 50)), 0, 1)  # Dice peaks well away from 0.5
        acc.update(f"im{i}", prob, truth)
        probs.append(prob.ravel())
        truths.append(truth.ravel())
    p, t = np.concatenate(probs), np.concatenate(truths)
    sweep = {c: binary_metrics(p, t, threshold=c)["dice"] for c in np.round(np.arange(0.05, 0.951, 0.01), 2)}
    best = max(sweep, key=sweep.get)
    threshold, dice = acc.best_dice_threshold()
    assert threshold == pytest.approx(best) and dice == pytest.approx(sweep[best])
    assert threshold != 0.5 and dice > sweep[0.5]
    # and the pooled counts at any other threshold, from the same histograms
    at = acc.pooled_at(0.3)
    direct = binary_metrics(p, t, threshold=0.3)
    assert (at["tp"], at["fp"], at["fn"], at["tn"]) == (direct["tp"], direct["fp"], direct["fn"], direct["tn"])
    assert at["dice"] == pytest.approx(direct["dice"])

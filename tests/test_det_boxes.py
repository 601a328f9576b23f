"""Box derivation from masks and points, box checks, and the point-localisation metric (no mmdet needed)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from visionfm.data.boxes import (BoxError, DetectionRecord, EmptyMaskError, check_boxes, component_boxes,
                                            crop_boxes, flip_boxes, mask_box, merge_close_boxes, point_box,
                                            scale_boxes)
from visionfm.tasks.detection.points import point_metrics, top_box_centre


def test_mask_box_is_the_pixel_extent():
    mask = np.zeros((30, 40), bool)
    mask[5:12, 7:20] = True
    mask[14, 25] = True  # a stray pixel still belongs to the structure
    assert mask_box(mask).tolist() == [7.0, 5.0, 26.0, 15.0]


def test_mask_box_empty_mask_names_source():
    with pytest.raises(EmptyMaskError, match="IDRiD_99_OD.tif: mask is empty"):
        mask_box(np.zeros((8, 8), np.uint8), source="IDRiD_99_OD.tif")


def test_component_boxes_eight_connectivity_and_no_merge():
    mask = np.zeros((20, 20), bool)
    mask[2, 2] = mask[3, 3] = True  # diagonal neighbours: one 8-connected component
    mask[10:13, 10:13] = True
    found = component_boxes(mask, merge_gap=0, min_size=0)
    assert found.components == 2
    assert found.boxes.tolist() == [[2, 2, 4, 4], [10, 10, 13, 13]]


def test_component_boxes_merge_and_drop_rule():
    mask = np.zeros((100, 100), bool)
    mask[10:20, 10:20] = True  # A
    mask[10:20, 24:30] = True  # B: 4 px right of A -> merged with A at gap 5
    mask[50:51, 50:51] = True  # C: isolated single pixel -> dropped by min_size
    mask[80:90, 80:95] = True  # D: far away, kept alone
    found = component_boxes(mask, merge_gap=5, min_size=3)
    assert found.components == 4 and found.merged == 3 and found.dropped == 1
    assert found.boxes.tolist() == [[10, 10, 30, 20], [80, 80, 95, 90]]
    # the gap is strict: 4 px apart is not "closer than 4"
    assert len(component_boxes(mask, merge_gap=4, min_size=3).boxes) == 3


def test_merge_repeats_until_stable():
    # a and b merge (1 px apart); their union then comes within the gap of c, which neither a nor b alone was
    a, b, c = [0, 0, 10, 10], [11, 0, 20, 4], [16, 12, 20, 20]
    assert _gap(a, b) == 1 and _gap(a, c) == 6 and _gap(b, c) == 8
    merged = merge_close_boxes(np.array([a, b, c], np.float32), merge_gap=3)
    assert merged.tolist() == [[0, 0, 20, 20]]
    assert len(merge_close_boxes(np.array([a, b, c], np.float32), merge_gap=1)) == 3


def _gap(a, b):
    gx = max(a[0], b[0]) - min(a[2], b[2])
    gy = max(a[1], b[1]) - min(a[3], b[3])
    return max(gx, gy, 0)


def test_empty_lesion_mask_gives_no_boxes():
    found = component_boxes(np.zeros((16, 16), bool), merge_gap=3, min_size=2)
    assert found.boxes.shape == (0, 4) and found.components == 0


def test_point_box_clipped_and_outside_point_rejected():
    assert point_box(5, 50, 20, width=100, height=60).tolist() == [0, 40, 15, 60]
    with pytest.raises(BoxError, match="fovea.csv.*outside the 100x60 image"):
        point_box(120, 10, 20, width=100, height=60, source="fovea.csv")


def test_check_boxes_tolerance_and_errors():
    out = check_boxes(np.array([[-0.5, 0, 100.6, 60]]), 100, 60, "ann.json")
    assert out.tolist() == [[0, 0, 100, 60]]
    with pytest.raises(BoxError, match="ann.json: box 0 .* outside the 100x60 image"):
        check_boxes(np.array([[10, 10, 130, 20]]), 100, 60, "ann.json")
    with pytest.raises(BoxError, match="is empty"):
        check_boxes(np.array([[10, 10, 10, 20]]), 100, 60, "ann.json")
    with pytest.raises(BoxError, match="non-finite"):
        check_boxes(np.array([[10, np.nan, 20, 20]]), 100, 60, "ann.json")


def test_scale_and_flip():
    boxes = np.array([[10, 20, 30, 60]], np.float32)
    assert scale_boxes(boxes, (0.5, 0.25)).tolist() == [[5, 5, 15, 15]]
    flipped = flip_boxes(boxes, 100)
    assert flipped.tolist() == [[70, 20, 90, 60]]
    assert flip_boxes(flipped, 100).tolist() == boxes.tolist()


def test_record_checks_lengths():
    with pytest.raises(ValueError, match="2 boxes, 1 labels"):
        DetectionRecord("x", "x.png", 10, 10, np.zeros((2, 4)), np.zeros(1))


def test_top_box_centre_picks_best_of_class():
    boxes = np.array([[0, 0, 10, 10], [20, 20, 40, 40], [50, 50, 60, 60]])
    scores = np.array([0.9, 0.5, 0.99])
    labels = np.array([0, 0, 1])
    assert top_box_centre(boxes, scores, labels, 0) == (5.0, 5.0)
    assert top_box_centre(boxes, scores, labels, 1) == (55.0, 55.0)
    assert top_box_centre(boxes, scores, labels, 2) is None


def test_point_metrics_hand_made():
    # distances 3-4-5 -> 5 (within 80/8 = 10), 20 (not within 10), missing -> diagonal of 30x40 = 50
    m = point_metrics([(3.0, 4.0), (20.0, 0.0), None], [(0.0, 0.0), (0.0, 0.0), (1.0, 1.0)], [80.0, 80.0, 80.0],
                      [(100, 100), (100, 100), (30, 40)])
    assert m["mean_distance_px"] == pytest.approx((5 + 20 + 50) / 3)
    assert m["median_distance_px"] == pytest.approx(20.0)
    assert m["within_1_8_dd"] == pytest.approx(1 / 3)
    assert m["n_missing"] == 1 and m["n_images"] == 3
    # the boundary counts as within (distance == DD/8)
    assert point_metrics([(10.0, 0.0)], [(0.0, 0.0)], [80.0], [(100, 100)])["within_1_8_dd"] == 1.0
    assert math.isclose(point_metrics([(0.0, 10.01)], [(0.0, 0.0)], [80.0], [(9, 9)])["within_1_8_dd"], 0.0)


def test_point_metrics_errors():
    with pytest.raises(ValueError, match="must all match"):
        point_metrics([None], [], [1.0], [(1, 1)])
    with pytest.raises(ValueError, match="disc diameter must be positive"):
        point_metrics([(0.0, 0.0)], [(0.0, 0.0)], [0.0], [(1, 1)])


def test_crop_boxes_shift_clip_and_visibility_rule():
    boxes = [[10, 10, 20, 20],   # wholly inside the window (5, 5, 45, 45)
             [40, 10, 60, 20],   # a quarter inside (x 40-45 of 40-60): dropped at min_visible 0.5
             [0, 30, 10, 40],    # half inside (x 5-10 of 0-10): kept, clipped
             [50, 50, 60, 60]]   # outside
    kept, mask = crop_boxes(boxes, (5, 5, 45, 45), min_visible=0.5)
    assert mask.tolist() == [True, False, True, False]
    assert kept.tolist() == [[5, 5, 15, 15], [0, 25, 5, 35]]
    kept, mask = crop_boxes(boxes, (5, 5, 45, 45), min_visible=0.2)
    assert mask.tolist() == [True, True, True, False] and kept[1].tolist() == [35, 5, 40, 15]
    kept, mask = crop_boxes(np.zeros((0, 4)), (0, 0, 8, 8))
    assert kept.shape == (0, 4) and mask.shape == (0,)

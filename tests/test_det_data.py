"""Detection datasets: boxes derived from the real IDRiD masks and CSVs, the splits, COCO json reading, and the
error paths (missing files, empty masks, boxes outside the image), on real data and tiny files made here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visionfm.config import CONFIG_DIR, load_yaml
from visionfm.data.datasets.coco import CocoFormatError, load_coco
from visionfm.data.datasets.generic_seg import DatasetNotFoundError
from visionfm.data.datasets.idrid_det import load_idrid_detection, read_markups
from visionfm.data.boxes import BoxError, EmptyMaskError, component_boxes

SEG = "IDRiD/A. Segmentation"
TRUTH = {"MA": "1. Microaneurysms", "HE": "2. Haemorrhages", "EX": "3. Hard Exudates", "SE": "4. Soft Exudates",
         "OD": "5. Optic Disc"}


# --------------------------------------------------------------------------------------- tiny IDRiD tree
def _save_mask(path: Path, mask: np.ndarray) -> None:
    img = Image.fromarray(mask.astype(np.uint8), mode="P")
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # IDRiD's palette: index 1 is red
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def make_fake_idrid(root: Path, width: int = 96, height: int = 64, n_train: int = 6, n_test: int = 3,
                    n_loc: int = 12) -> Path:
    """A miniature IDRiD (parts A and C, testing images only in C) with the real folder and file names.

    Each part-A image shows a bright disc where its OD mask is, and two haemorrhage blobs 2 px apart (merged
    into one box by a merge gap of 3) plus a 1-px exudate speck (dropped by a minimum size of 2)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width]
    for split, names in (("a. Training Set", range(1, n_train + 1)),
                         ("b. Testing Set", range(n_train + 1, n_train + n_test + 1))):
        for n in names:
            name = f"IDRiD_{n:02d}"
            cx, cy, r = int(rng.integers(15, width - 15)), int(rng.integers(15, height - 15)), 8
            disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
            image = (rng.integers(0, 60, (height, width, 3))).astype(np.uint8)
            image[disc] = (250, 230, 120)
            img_dir = root / SEG / "1. Original Images" / split
            img_dir.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(img_dir / f"{name}.jpg", quality=95)
            truth = root / SEG / "2. All Segmentation Groundtruths" / split
            _save_mask(truth / TRUTH["OD"] / f"{name}_OD.tif", disc)
            he = np.zeros((height, width), bool)
            he[4:8, 4:8] = True
            he[4:8, 10:12] = True
            _save_mask(truth / TRUTH["HE"] / f"{name}_HE.tif", he)
            ex = np.zeros((height, width), bool)
            ex[height - 3, width - 3] = True
            _save_mask(truth / TRUTH["EX"] / f"{name}_EX.tif", ex)
            _save_mask(truth / TRUTH["MA"] / f"{name}_MA.tif", ex)
            (truth / TRUTH["SE"]).mkdir(parents=True, exist_ok=True)  # no soft exudates anywhere
    loc = root / "IDRiD/C. Localization"
    img_dir = loc / "1. Original Images/b. Testing Set"
    img_dir.mkdir(parents=True)
    rows_od, rows_fovea = [], []
    for n in range(1, n_loc + 1):
        name = f"IDRiD_{n:03d}"
        fx, fy = int(rng.integers(20, width - 20)), int(rng.integers(20, height - 20))
        image = (rng.integers(60, 120, (height, width, 3))).astype(np.uint8)
        image[(xx - fx) ** 2 + (yy - fy) ** 2 <= 25] = 10  # a dark fovea
        Image.fromarray(image).save(img_dir / f"{name}.jpg", quality=95)
        rows_fovea.append(f"{name},{fx},{fy},,,")
        rows_od.append(f"{name},{width - fx},{fy},,,")
    rows_fovea.append(f"IDRiD_{n_loc + 1:03d},5,5,,,")  # the CSVs list images that are not present
    for sub, csv_name, rows in (("1. Optic Disc Center Location", "b. IDRiD_OD_Center_Testing Set_Markups.csv", rows_od),
                                ("2. Fovea Center Location", "IDRiD_Fovea_Center_Testing Set_Markups.csv", rows_fovea)):
        (loc / "2. Groundtruths" / sub).mkdir(parents=True, exist_ok=True)
        (loc / "2. Groundtruths" / sub / csv_name).write_text(
            "Image No,X- Coordinate,Y - Coordinate,,,\n" + "\n".join(rows) + "\n,,,,,\n")
    return root


@pytest.fixture
def fake_idrid(tmp_path: Path) -> Path:
    return make_fake_idrid(tmp_path / "data")


# ------------------------------------------------------------------------------------------- real IDRiD
def test_real_od_boxes_match_mask_extent(shared_data: Path):
    records, classes = load_idrid_detection(shared_data, "od", "test", limit=2)
    assert classes == ("optic_disc",)
    for rec in records:
        mask = np.asarray(Image.open(shared_data / SEG / "2. All Segmentation Groundtruths/b. Testing Set" /
                                     TRUTH["OD"] / f"{rec.name}_OD.tif")) > 0
        ys, xs = np.nonzero(mask)
        assert rec.boxes.tolist() == [[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]]
        assert (rec.width, rec.height) == (4288, 2848)
        assert rec.point == pytest.approx(((xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2))
        assert 350 < rec.disc_diameter < 700  # optic discs in 4288-px IDRiD images are ~400-650 px across


def test_default_lesion_rule_keeps_exudate_fields_apart(shared_data: Path):
    """IDRiD_03 has a field of hard exudates around the macula. Merging components within 20 px chained it into a
    box about 1500 px across (which 512-px training crops then dropped, leaving those exudates as background); the
    default rule keeps the mask's own components, each a box of at most a few hundred pixels."""
    path = shared_data / SEG / "2. All Segmentation Groundtruths/a. Training Set" / TRUTH["EX"] / "IDRiD_03_EX.tif"
    mask = np.asarray(Image.open(path).convert("L")) > 0
    defaults = load_yaml(CONFIG_DIR / "det" / "default.yaml")["data"]  # what downstream/det.py uses

    def sides(merge_gap: float, min_size: float) -> np.ndarray:
        boxes = component_boxes(mask, merge_gap, min_size).boxes
        return (boxes[:, 2:] - boxes[:, :2]).max(axis=1)

    default_sides = sides(defaults["lesion_merge_gap"], defaults["lesion_min_size"])
    chained_sides = sides(20, 24)
    assert chained_sides.max() > 1200
    assert default_sides.max() < 600
    assert len(default_sides) > 5 * len(chained_sides)
    assert default_sides.min() >= defaults["lesion_min_size"]


def test_real_lesion_boxes_cover_and_are_tight(shared_data: Path):
    gap = 20
    (rec,), classes = load_idrid_detection(shared_data, "lesions", "test", limit=1, merge_gap=gap, min_size=0)
    assert classes == ("haemorrhage", "hard_exudate", "soft_exudate")
    truth = shared_data / SEG / "2. All Segmentation Groundtruths/b. Testing Set"
    for label, code in enumerate(("HE", "EX", "SE")):
        path = truth / TRUTH[code] / f"{rec.name}_{code}.tif"
        boxes = rec.boxes[rec.labels == label].astype(int)
        if not path.exists():
            assert len(boxes) == 0
            continue
        mask = np.asarray(Image.open(path).convert("L")) > 0
        covered = np.zeros_like(mask)
        for x1, y1, x2, y2 in boxes:
            covered[y1:y2, x1:x2] = True
            # tight: every edge row / column of a box holds a foreground pixel
            assert mask[y1, x1:x2].any() and mask[y2 - 1, x1:x2].any()
            assert mask[y1:y2, x1].any() and mask[y1:y2, x2 - 1].any()
        assert not (mask & ~covered).any(), f"{code}: foreground pixels outside every box"
        for i in range(len(boxes)):  # merged until no two boxes are closer than the gap
            for j in range(i + 1, len(boxes)):
                a, b = boxes[i], boxes[j]
                assert max(max(a[0], b[0]) - min(a[2], b[2]), max(a[1], b[1]) - min(a[3], b[3])) >= gap


def test_real_splits_are_disjoint_and_complete(shared_data: Path):
    names = {s: [r.name for r in load_idrid_detection(shared_data, "od", s)[0]] for s in ("train", "val", "test")}
    assert (len(names["train"]), len(names["val"]), len(names["test"])) == (44, 10, 27)
    assert not set(names["train"]) & set(names["val"])
    assert set(names["train"]) | set(names["val"]) == {f"IDRiD_{i:02d}" for i in range(1, 55)}
    fovea = {s: load_idrid_detection(shared_data, "fovea", s)[0] for s in ("train", "val", "test")}
    sets = {s: {r.name for r in recs} for s, recs in fovea.items()}
    assert (len(sets["train"]), len(sets["val"]), len(sets["test"])) == (32, 8, 20)
    assert sets["train"] | sets["val"] | sets["test"] == {f"IDRiD_{i:03d}" for i in range(1, 61)}
    assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"]) and not (sets["val"] & sets["test"])
    first = {r.name: r for recs in fovea.values() for r in recs}["IDRiD_001"]
    assert first.point == (1914.0, 1617.0)  # row IDRiD_001 of IDRiD_Fovea_Center_Testing Set_Markups.csv
    assert first.boxes.tolist() == [[1914 - 261, 1617 - 261, 1914 + 261, 1617 + 261]]
    assert first.disc_diameter == 522.0


# ------------------------------------------------------------------------------------------- tiny IDRiD
def test_fake_tree_rule_and_absent_lesions(fake_idrid: Path):
    recs, _ = load_idrid_detection(fake_idrid, "lesions", "test", merge_gap=3, min_size=2)
    for rec in recs:
        assert rec.boxes.tolist() == [[4, 4, 12, 8]] and rec.labels.tolist() == [0]  # HE merged, EX speck dropped
    recs, _ = load_idrid_detection(fake_idrid, "lesions", "test", merge_gap=0, min_size=0)
    assert sorted(recs[0].labels.tolist()) == [0, 0, 1]


def test_empty_od_mask_is_an_error(fake_idrid: Path):
    path = fake_idrid / SEG / "2. All Segmentation Groundtruths/b. Testing Set" / TRUTH["OD"] / "IDRiD_08_OD.tif"
    _save_mask(path, np.zeros((64, 96), bool))
    with pytest.raises(EmptyMaskError, match="IDRiD_08_OD.tif: mask is empty"):
        load_idrid_detection(fake_idrid, "od", "test")


def test_missing_od_mask_and_wrong_size(fake_idrid: Path):
    truth = fake_idrid / SEG / "2. All Segmentation Groundtruths/b. Testing Set" / TRUTH["OD"]
    _save_mask(truth / "IDRiD_08_OD.tif", np.ones((10, 10), bool))
    with pytest.raises(ValueError, match="IDRiD_08_OD.tif: mask is 10x10 but its image is 96x64"):
        load_idrid_detection(fake_idrid, "od", "test")
    (truth / "IDRiD_08_OD.tif").unlink()
    with pytest.raises(DatasetNotFoundError, match="IDRiD_08.jpg: no optic-disc mask"):
        load_idrid_detection(fake_idrid, "od", "test")


def test_missing_dataset_and_csv(tmp_path: Path, fake_idrid: Path):
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        load_idrid_detection(tmp_path / "nowhere", "od", "train")
    csv = fake_idrid / "IDRiD/C. Localization/2. Groundtruths/2. Fovea Center Location" / \
        "IDRiD_Fovea_Center_Testing Set_Markups.csv"
    text = csv.read_text()
    csv.write_text(text.replace("IDRiD_003,", "IDRiD_003,abc,"))
    with pytest.raises(ValueError, match=r"Markups.csv:4: expected an image name and two numbers"):
        read_markups(csv)
    csv.unlink()
    with pytest.raises(DatasetNotFoundError, match="markup file not found"):
        load_idrid_detection(fake_idrid, "fovea", "train")


def test_point_outside_image_is_an_error(fake_idrid: Path):
    csv = fake_idrid / "IDRiD/C. Localization/2. Groundtruths/2. Fovea Center Location" / \
        "IDRiD_Fovea_Center_Testing Set_Markups.csv"
    lines = csv.read_text().splitlines()
    name = load_idrid_detection(fake_idrid, "fovea", "test", loc_test_count=4, loc_val_count=2)[0][0].name
    csv.write_text("\n".join(f"{name},500,10,," if line.startswith(name + ",") else line for line in lines))
    with pytest.raises(BoxError, match=f"{name}.*outside the 96x64 image"):
        load_idrid_detection(fake_idrid, "fovea", "test", loc_test_count=4, loc_val_count=2)


def test_bad_target_and_source(fake_idrid: Path):
    with pytest.raises(ValueError, match="target must be one of od, fovea, lesions"):
        load_idrid_detection(fake_idrid, "macula", "train")
    with pytest.raises(ValueError, match="no fovea annotation"):
        load_idrid_detection(fake_idrid, "fovea", "train", source="segmentation")


# -------------------------------------------------------------------------------------------------- COCO
def _coco(tmp_path: Path, annotations, images=None, categories=None) -> tuple:
    img_dir = tmp_path / "images"
    img_dir.mkdir(exist_ok=True)
    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(img_dir / name)
    data = {"images": images or [{"id": 1, "file_name": "a.png", "width": 60, "height": 40},
                                 {"id": 2, "file_name": "b.png"}],
            "annotations": annotations,
            "categories": categories or [{"id": 7, "name": "lesion"}, {"id": 3, "name": "disc"}]}
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    return path, img_dir


def test_coco_reads_boxes_classes_and_crowd(tmp_path: Path):
    ann, img_dir = _coco(tmp_path, [
        {"id": 10, "image_id": 1, "category_id": 7, "bbox": [5, 6, 10, 20]},
        {"id": 11, "image_id": 1, "category_id": 3, "bbox": [0, 0, 60, 40], "iscrowd": 1}])
    records, classes = load_coco(ann, img_dir)
    assert classes == ("disc", "lesion")  # ordered by category id
    a, b = records
    assert a.boxes.tolist() == [[5, 6, 15, 26], [0, 0, 60, 40]]
    assert a.labels.tolist() == [1, 0] and a.ignore.tolist() == [False, True]
    assert len(b.boxes) == 0 and (b.width, b.height) == (60, 40)


def test_coco_errors(tmp_path: Path):
    ann, img_dir = _coco(tmp_path, [{"id": 12, "image_id": 2, "category_id": 7, "bbox": [50, 30, 30, 5]}])
    with pytest.raises(BoxError, match="annotation 12 of b.png.*outside the 60x40 image"):
        load_coco(ann, img_dir)
    ann, img_dir = _coco(tmp_path, [{"id": 13, "image_id": 1, "category_id": 99, "bbox": [1, 1, 2, 2]}])
    with pytest.raises(CocoFormatError, match="annotation 13 has unknown category 99"):
        load_coco(ann, img_dir)
    ann, img_dir = _coco(tmp_path, [], images=[{"id": 1, "file_name": "missing.png"}])
    with pytest.raises(FileNotFoundError, match="'missing.png' .*not found"):
        load_coco(ann, img_dir)
    ann, img_dir = _coco(tmp_path, [])
    with pytest.raises(CocoFormatError, match="differ from the training set"):
        load_coco(ann, img_dir, classes=("other",))
    with pytest.raises(FileNotFoundError, match="annotation file not found"):
        load_coco(tmp_path / "nope.json", img_dir)


@pytest.mark.parametrize("recipe", ["od_target", "fovea_target", "lesions_target"])
def test_target_recipes_build_their_detectors(recipe: str):
    """Each shipped recipe merges over the defaults and builds its mmdet detector (overrides name real fields)."""
    from visionfm.config import build_config
    from visionfm.tasks.detection.runner import build_detector

    cfg = build_config(CONFIG_DIR / "det" / "default.yaml", CONFIG_DIR / "det" / f"{recipe}.yaml",
                       overrides=["model.random_init=true"])
    model, _, mm = build_detector(cfg, ("a", "b", "c"), img_size=64)
    assert type(model).__name__ == {"od_target": "RetinaNet", "fovea_target": "RetinaNet",
                                    "lesions_target": "FCOS"}[recipe]
    assert mm.model.bbox_head.num_classes == 3

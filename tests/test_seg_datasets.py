"""Segmentation dataset readers: the real DRIVE and IDRiD files in ../shared/data, the other official layouts on
small files made in tmp_path, and the error paths."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import SHARED_DATA as SHARED
from visionfm.data.datasets.chase import load_chase
from visionfm.data.datasets.drive import load_drive
from visionfm.data.datasets.generic_seg import (DatasetNotFoundError, fov_from_image, load_generic, match_by_stem,
                                                read_mask)
from visionfm.data.datasets.hrf import load_hrf
from visionfm.data.datasets.idrid_seg import TARGETS, list_pairs, load_idrid_seg
from visionfm.data.datasets.stare import load_stare
from visionfm.data.io import ImageReadError

needs_drive = pytest.mark.skipif(not (SHARED / "DRIVE").is_dir(), reason="../shared/data/DRIVE not present")
needs_idrid = pytest.mark.skipif(not (SHARED / "IDRiD").is_dir(), reason="../shared/data/IDRiD not present")


def _png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _fundus(h=40, w=48) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    disc = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (min(h, w) / 2 - 2) ** 2
    img = np.zeros((h, w, 3), np.uint8)
    img[disc] = (180, 90, 40)
    return img


# ---------------------------------------------------------------------------------------------- real data

@needs_drive
def test_drive_official_layout():
    splits = load_drive(SHARED)
    assert (len(splits.train), len(splits.test)) == (20, 20)
    assert splits.train[0].name == "21_training" and splits.test[0].name == "01_test"
    first = splits.test[0]
    assert first.mask.name == "01_manual1.gif" and first.fov.name == "01_test_mask.gif"
    vessels, fov = read_mask(first.mask), read_mask(first.fov)
    assert vessels.shape == fov.shape == (584, 565)
    assert 0.05 < vessels.mean() < 0.2  # vessels cover about a tenth of a DRIVE image
    assert 0.6 < fov.mean() < 0.8 and not fov[0, 0]
    assert not (vessels & ~fov).sum() > 0.01 * vessels.sum()


@needs_drive
def test_drive_palette_second_observer_reads_by_index():
    # 01_manual2.gif is a palette image whose index 0 is not black: reading colours would mark everything.
    second = read_mask(SHARED / "DRIVE" / "test" / "2nd_manual" / "01_manual2.gif")
    first = read_mask(SHARED / "DRIVE" / "test" / "1st_manual" / "01_manual1.gif")
    assert 0.05 < second.mean() < 0.2
    agreement = (first == second).mean()
    assert agreement > 0.9


@needs_drive
def test_fov_from_image_matches_drive_mask():
    from visionfm.data.io import read_image

    sample = load_drive(SHARED).test[0]
    estimated = fov_from_image(read_image(sample.image, 3))
    official = read_mask(sample.fov)
    iou = (estimated & official).sum() / (estimated | official).sum()
    assert iou > 0.95


@needs_idrid
def test_idrid_pairs_and_targets():
    train, test = list_pairs(SHARED, "train"), list_pairs(SHARED, "test")
    assert (len(train), len(test)) == (54, 27)
    assert set(train[0].masks) == set(TARGETS)
    assert sum(p.masks["SE"] is not None for p in train) == 26
    assert sum(p.masks["HE"] is not None for p in train) == 53
    assert all(p.masks["OD"] is not None for p in train + test)
    od = load_idrid_seg(SHARED, "od")
    assert (len(od.train), len(od.test), od.target) == (54, 27, "OD")
    se = load_idrid_seg(SHARED, "SE")
    assert (len(se.train), len(se.test)) == (26, 14) and any("left out" in n for n in se.notes)
    se_all = load_idrid_seg(SHARED, "SE", include_absent=True)
    assert len(se_all.train) == 54 and sum(s.mask is None for s in se_all.train) == 28
    mask = read_mask(od.test[0].mask)
    assert mask.shape == (2848, 4288) and 0.002 < mask.mean() < 0.05  # the optic disc: ~1 % of the image


@needs_idrid
def test_idrid_rgba_exudate_mask_binarises():
    # The one testing EX mask stored as RGBA 0/255 reads like the palette 0/1 ones.
    pairs = list_pairs(SHARED, "test")
    modes = {}
    for p in pairs:
        with Image.open(p.masks["EX"]) as img:
            modes.setdefault(img.mode, p.masks["EX"])
    assert "RGBA" in modes
    mask = read_mask(modes["RGBA"])
    assert mask.dtype == bool and 0 < mask.mean() < 0.1


def test_idrid_bad_target(tmp_path):
    with pytest.raises(ValueError, match="MA, HE, EX, SE, OD"):
        load_idrid_seg(tmp_path, "XX")


# ------------------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("loader,name", [(load_drive, "DRIVE"), (load_chase, "CHASE_DB1"), (load_hrf, "HRF"),
                                         (load_stare, "STARE"), (lambda r: load_idrid_seg(r, "OD"), "IDRiD")])
def test_missing_dataset_says_where_and_what(tmp_path, loader, name):
    with pytest.raises(DatasetNotFoundError) as info:
        loader(tmp_path)
    message = str(info.value)
    assert name in message and str(tmp_path) in message and "--data-root" in message


def test_drive_missing_manual_names_the_image(tmp_path):
    root = tmp_path / "DRIVE"
    for split, n in (("training", "21"), ("test", "01")):
        _png(root / split / "images" / f"{n}_{split}.png", _fundus())
        _png(root / split / "mask" / f"{n}_{split}_mask.png", np.full((40, 48), 255, np.uint8))
        (root / split / "1st_manual").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError, match="21_training.png.*manual"):
        load_drive(tmp_path)


def test_unreadable_mask_names_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ImageReadError, match="broken.png"):
        read_mask(bad)


# --------------------------------------------------------------------------------------- other layouts

def test_chase_flat_official_layout(tmp_path):
    root = tmp_path / "CHASE_DB1"
    for n in range(1, 15):
        for eye in "LR":
            _png(root / f"Image_{n:02d}{eye}.jpg", _fundus())
            _png(root / f"Image_{n:02d}{eye}_1stHO.png", np.zeros((40, 48), np.uint8))
            _png(root / f"Image_{n:02d}{eye}_2ndHO.png", np.zeros((40, 48), np.uint8))
    splits = load_chase(tmp_path)
    assert (len(splits.train), len(splits.test)) == (20, 8)
    assert splits.train[-1].name == "Image_10R" and splits.test[0].name == "Image_11L"
    assert splits.test[0].mask.name == "Image_11L_1stHO.png" and splits.test[0].fov is None
    assert splits.fov_from_image


def test_chase_folder_variant_and_missing_label(tmp_path):
    root = tmp_path / "CHASE_DB1"
    for n in range(1, 15):
        for eye in "LR":
            stem = f"Image_{n:02d}{eye}"
            _png(root / "images" / f"{stem}.jpg", _fundus())
            _png(root / "1st_label" / f"{stem}_1stHO.png", np.zeros((40, 48), np.uint8))
            _png(root / "mask" / f"{stem}.png", np.full((40, 48), 255, np.uint8))
    splits = load_chase(tmp_path)
    assert (len(splits.train), len(splits.test)) == (20, 8) and splits.test[0].fov.parent.name == "mask"
    (root / "1st_label" / "Image_12R_1stHO.png").unlink()
    with pytest.raises(DatasetNotFoundError, match="Image_12R.jpg"):
        load_chase(tmp_path)


def test_hrf_layout_split(tmp_path):
    root = tmp_path / "HRF"
    for n in range(1, 16):
        for cat in ("h", "g", "dr"):
            stem = f"{n:02d}_{cat}"
            _png(root / "images" / f"{stem}.{'JPG' if cat == 'dr' else 'jpg'}", _fundus())
            _png(root / "manual1" / f"{stem}.tif", np.zeros((40, 48), np.uint8))
            _png(root / "mask" / f"{stem}_mask.tif", np.full((40, 48), 255, np.uint8))
    splits = load_hrf(tmp_path)
    assert (len(splits.train), len(splits.test)) == (15, 30)
    assert {s.name for s in splits.train} >= {"01_h", "05_dr"} and "06_g" in {s.name for s in splits.test}


def test_stare_layout_and_gz_refused(tmp_path):
    root = tmp_path / "STARE"
    names = ["im0001", "im0002", "im0003", "im0004", "im0005", "im0044", "im0077", "im0081", "im0082", "im0139",
             "im0162", "im0163", "im0235", "im0236", "im0239", "im0240", "im0255", "im0291", "im0319", "im0324"]
    for name in names + ["im0400"]:  # an unlabelled image is not part of the dataset
        _png(root / "stare-images" / f"{name}.ppm", _fundus())
    for name in names:
        _png(root / "labels-ah" / f"{name}.ah.ppm", np.zeros((40, 48), np.uint8))
    splits = load_stare(tmp_path)
    assert (len(splits.train), len(splits.test)) == (10, 10) and splits.test[-1].name == "im0324"
    (root / "stare-images" / "im0500.ppm.gz").write_bytes(b"x")
    with pytest.raises(DatasetNotFoundError, match="gunzip"):
        load_stare(tmp_path)


def test_generic_folder_layouts(tmp_path):
    flat = tmp_path / "flat"
    for i in range(10):
        _png(flat / "images" / f"case{i}.png", _fundus())
        _png(flat / "masks" / f"case{i}_mask.png", np.zeros((40, 48), np.uint8))
    splits = load_generic(flat)
    assert len(splits.train) + len(splits.test) == 10 and splits.test
    assert load_generic(flat).test == splits.test  # deterministic
    nested = tmp_path / "nested"
    for split in ("train", "test"):
        _png(nested / split / "images" / "a.png", _fundus())
        _png(nested / split / "masks" / "a.png", np.zeros((40, 48), np.uint8))
    splits = load_generic(nested)
    assert len(splits.train) == len(splits.test) == 1
    (flat / "masks" / "case3_mask.png").unlink()
    with pytest.raises(DatasetNotFoundError, match="case3.png: no mask"):
        load_generic(flat)


def test_match_by_stem_refuses_ambiguity(tmp_path):
    image = tmp_path / "a.png"
    assert match_by_stem(image, [tmp_path / "ab.png", tmp_path / "a_mask.png"]) == tmp_path / "a_mask.png"
    with pytest.raises(ValueError, match="several"):
        match_by_stem(image, [tmp_path / "a_1.png", tmp_path / "a_2.png"])


def test_read_mask_thresholds(tmp_path):
    zero_one = _png(tmp_path / "01.png", np.array([[0, 1], [1, 0]], np.uint8))
    zero_255 = _png(tmp_path / "0255.png", np.array([[0, 255], [255, 0]], np.uint8))
    noisy = _png(tmp_path / "noisy.png", np.array([[3, 250], [200, 40]], np.uint8))
    expected = np.array([[False, True], [True, False]])
    for path in (zero_one, zero_255, noisy):
        assert (read_mask(path) == expected).all(), path


@needs_drive
def test_clahe_lifts_vessel_contrast_on_a_real_drive_image():
    from visionfm.data.io import read_image
    from visionfm.tasks.segmentation.data import equalize_contrast, model_input

    sample = load_drive(SHARED).test[0]
    image = read_image(sample.image, 3)
    vessels, fov = read_mask(sample.mask), read_mask(sample.fov)

    def vessel_contrast(img):
        grey = img.astype(np.float64).mean(axis=2)
        return grey[fov & ~vessels].mean() - grey[fov & vessels].mean()

    equalised = equalize_contrast(image, clip_limit=2.0, grid=8)
    assert equalised.shape == image.shape and equalised.dtype == np.uint8
    assert vessel_contrast(equalised) > 1.3 * vessel_contrast(image)  # vessels are darker than the background
    # lightness only: the fundus stays reddish (red above green above blue inside the FOV)
    means = equalised[fov].astype(np.float64).mean(axis=0)
    assert means[0] > means[1] > means[2]
    cfg = {"resize_long_side": None, "clahe": {"clip_limit": 2.0, "grid": 8}}
    assert np.array_equal(model_input(image, cfg), equalised)
    assert np.array_equal(model_input(vessels, cfg, mask=True), vessels)  # masks are never equalised
    assert np.array_equal(model_input(image, {"clahe": None}), image)


def test_bad_clahe_settings_are_errors():
    from visionfm.tasks.segmentation.data import equalize_contrast, model_input

    image = _fundus()
    with pytest.raises(ValueError, match="clip_limt"):
        model_input(image, {"clahe": {"clip_limt": 2.0}})
    with pytest.raises(ValueError, match="mapping"):
        model_input(image, {"clahe": "yes"})
    with pytest.raises(ValueError, match="RGB"):
        equalize_contrast(image[:, :, 0])

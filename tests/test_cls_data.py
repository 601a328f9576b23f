"""Classification data: grouped splits, few-shot sampling, and each dataset reader on real files."""

from __future__ import annotations

import csv
import dataclasses
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visionfm.data.datasets.csvfile import read_csv_dataset
from visionfm.data.datasets.imagefolder import read_imagefolder
from visionfm.data.datasets.labeled import (LabeledImages, LabeledSample, grouped_split, limit_samples,
                                            sample_shots)
from visionfm.data.datasets.oct_fundus import read_records
from visionfm.data.io import ImageReadError
from visionfm.data.unlabeled import DataError
from visionfm.modalities import get_modality
from visionfm.tasks.classification.data import read_oct_dme


def _groups(samples):
    return {s.group_key for s in samples}


def _assert_disjoint(splits):
    keys = [_groups(v) for v in splits.values()]
    for i in range(len(keys)):
        for j in range(i + 1, len(keys)):
            assert not keys[i] & keys[j], "a patient is in two splits"


def _synthetic(n_patients=60, seed=0):
    rng = np.random.default_rng(seed)
    samples = []
    for p in range(n_patients):
        label = int(p % 3 == 0)
        for k in range(int(rng.integers(1, 4))):
            samples.append(LabeledSample(Path(f"p{p}_{k}.png"), label, f"P{p}"))
    return samples


def test_grouped_split_keeps_patients_together_and_stratifies():
    samples = _synthetic()
    splits = grouped_split(samples, (0.6, 0.15, 0.25), seed=0)
    _assert_disjoint(splits)
    assert sum(len(v) for v in splits.values()) == len(samples)
    for split, members in splits.items():  # both labels in every split (stratified by patient label)
        assert {s.label for s in members} == {0, 1}, split
    n_test_patients = len(_groups(splits["test"]))
    assert abs(n_test_patients - 15) <= 2


def test_grouped_split_is_seeded_and_order_independent():
    samples = _synthetic()
    a = grouped_split(samples, seed=1)
    b = grouped_split(list(reversed(samples)), seed=1)
    c = grouped_split(samples, seed=2)
    assert {k: sorted(map(str, (s.path for s in v))) for k, v in a.items()} == \
           {k: sorted(map(str, (s.path for s in v))) for k, v in b.items()}
    assert _groups(a["test"]) != _groups(c["test"])
    with pytest.raises(ValueError, match="fractions"):
        grouped_split(samples, (0.5, 0.5, 0.5))


def test_limit_and_shots_are_class_balanced_and_seeded():
    samples = [LabeledSample(Path(f"{i}.png"), 0 if i < 90 else 1) for i in range(100)]
    limited = limit_samples(samples, 10, seed=0)
    assert len(limited) == 10 and Counter(s.label for s in limited) == {0: 5, 1: 5}
    shots = sample_shots(samples, 4, "multiclass", 2, seed=0)
    assert Counter(s.label for s in shots) == {0: 4, 1: 4}
    assert shots == sample_shots(samples, 4, "multiclass", 2, seed=0)
    assert shots != sample_shots(samples, 4, "multiclass", 2, seed=1)
    few = sample_shots(samples, 20, "multiclass", 2, seed=0)  # class 1 has only 10
    assert Counter(s.label for s in few) == {0: 20, 1: 10}
    ml = [LabeledSample(Path(f"{i}.png"), (int(i % 2 == 0), int(i % 3 == 0))) for i in range(30)]
    drawn = sample_shots(ml, 2, "multilabel", 2, seed=0)
    assert sum(s.label[0] for s in drawn) >= 2 and sum(s.label[1] for s in drawn) >= 2
    with pytest.raises(ValueError, match="positive"):
        sample_shots(samples, 0, "multiclass", 2)


def test_oct_dme_reader_patient_level(shared_data):
    dme = read_oct_dme(shared_data, "oct", "dme")
    _assert_disjoint(dme.splits)
    assert dme.class_names == ["no DME", "DME"] and dme.kind == "multiclass"
    total = sum(len(v) for v in dme.splits.values())
    assert total == len(read_records(shared_data, "oct"))
    assert all(s.path.is_file() and s.path.parent.parent.name == "OCT" for v in dme.splits.values() for s in v)
    dr = read_oct_dme(shared_data, "oct", "dr")
    assert dr.kind == "ordinal" and dr.num_classes == 3
    assert sum(len(v) for v in dr.splits.values()) < total  # ungraded images left out, and said so
    assert any("without a DR grade" in n for n in dr.notes)
    # The same patient is in the same split for OCT and fundus.
    cfp = read_oct_dme(shared_data, "cfp", "dme")
    assert all(s.path.parent.parent.name == "EYE FUNDUS" for s in cfp.splits["train"])
    oct_of = {s.group: k for k, v in dme.splits.items() for s in v}
    for split, members in cfp.splits.items():
        for s in members:
            if s.group in oct_of:
                assert oct_of[s.group] == split
    with pytest.raises(DataError, match="task"):
        read_oct_dme(shared_data, "oct", "glaucoma")


def _real_oct_images(shared_data, n):
    recs = sorted(read_records(shared_data, "oct"), key=lambda r: r.path.name)
    return [r for r in recs if r.dme == 0][:n] + [r for r in recs if r.dme == 1][:n]


def test_imagefolder_reader_on_real_files(shared_data, tmp_path):
    root = tmp_path / "folder"
    recs = _real_oct_images(shared_data, 6)
    for i, r in enumerate(recs):
        split = ["train", "train", "train", "val", "test", "test"][i % 6]
        cls = "DME" if r.dme else "normal"
        (root / split / cls).mkdir(parents=True, exist_ok=True)
        os.symlink(r.path, root / split / cls / r.path.name)
    data = read_imagefolder(root)
    assert data.class_names == ["DME", "normal"]
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 6, "val": 2, "test": 4}
    for s in data.splits["train"]:
        assert data.class_names[s.label] == ("DME" if "DME" in str(s.path.parent.name) else "normal")
    # Images load as 3-channel, normalised tensors (OCT is grey: the 3 channels are equal).
    ds = LabeledImages(data.splits["val"], "oct", 32, (0.2,) * 3, (0.2,) * 3)
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    # A class in test that train lacks is an error naming the folder.
    (root / "test" / "glaucoma").mkdir()
    os.symlink(recs[0].path, root / "test" / "glaucoma" / "x.jpg")
    with pytest.raises(DataError, match="glaucoma"):
        read_imagefolder(root)


def test_imagefolder_without_val_holds_out_part_of_train(shared_data, tmp_path):
    root = tmp_path / "folder"
    for i, r in enumerate(_real_oct_images(shared_data, 8)):
        split = "test" if i % 4 == 0 else "train"
        cls = str(r.dme)
        (root / split / cls).mkdir(parents=True, exist_ok=True)
        os.symlink(r.path, root / split / cls / r.path.name)
    data = read_imagefolder(root, kind="ordinal", val_fraction=0.25)
    assert data.class_names == ["0", "1"] and len(data.splits["val"]) >= 2
    assert not {s.path for s in data.splits["val"]} & {s.path for s in data.splits["train"]}
    assert "no val/" in data.notes[0]


def test_carves_do_not_depend_on_how_the_data_root_is_spelled(tmp_path, monkeypatch):
    """Images without a patient id are their own group, named by their path under the dataset: the same carve for
    ``data/...`` and ``/abs/.../data/...`` (an absolute path once gave another EyeDisease4 evaluation split)."""
    from visionfm.data.datasets.eyedisease4 import read_eyedisease4

    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    rows = []
    for c in ("cataract", "diabetic_retinopathy", "glaucoma", "normal"):
        for i in range(12):
            for folder in (data / "EyeDisease4" / "train" / c, data / "folder" / "train" / c):
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
            rows.append([f"folder/train/{c}/img{i}.png", c])
        (data / "folder" / "test" / c).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(data / "folder" / "test" / c / "t.png")
    _write_csv(data / "labels.csv", rows, ["Path", "Label"])
    monkeypatch.chdir(tmp_path)

    def splits(root):
        return [{k: sorted(s.path.relative_to(root).as_posix() for s in v) for k, v in d.splits.items()}
                for d in (read_eyedisease4(root), read_imagefolder(Path(root) / "folder", val_fraction=0.25),
                          read_csv_dataset(Path(root) / "labels.csv", image_root=root))]

    relative, absolute = splits(Path("data")), splits(data.resolve())
    assert relative == absolute
    assert all(len(d["val"]) > 0 for d in relative)


def _write_csv(path, rows, header):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def test_csv_reader_groups_by_patient_on_real_files(shared_data, tmp_path):
    recs = read_records(shared_data, "oct")
    rows = [[str(r.path.relative_to(shared_data)), "DME" if r.dme else "normal", r.patient] for r in recs]
    path = tmp_path / "labels.csv"
    _write_csv(path, rows, ["Path", "Label", "Patient_ID"])
    data = read_csv_dataset(path, image_root=shared_data, seed=3)
    _assert_disjoint(data.splits)
    assert sum(len(v) for v in data.splits.values()) == len(recs)
    assert data.class_names == ["DME", "normal"]
    patients = Counter(r.patient for r in recs)
    assert any(n > 1 for n in patients.values())  # the grouping matters on this data
    by_path = {str(r.path): ("DME" if r.dme else "normal") for r in recs}
    for v in data.splits.values():
        for s in v:
            assert data.class_names[s.label] == by_path[str(s.path)]
    assert "by patient" in data.notes[0]


def test_csv_reader_split_column_multilabel_and_errors(shared_data, tmp_path):
    recs = sorted(read_records(shared_data, "oct"), key=lambda r: r.path.name)[:9]
    rows = [[str(r.path), r.dme, int(r.dr == 2), ["train", "val", "test"][i % 3], f"p{i}"] for i, r in enumerate(recs)]
    path = tmp_path / "ml.csv"
    _write_csv(path, rows, ["image", "dme", "pdr", "split", "patient"])
    data = read_csv_dataset(path, kind="multilabel", label_columns=["dme", "pdr"])
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 3, "val": 3, "test": 3}
    assert data.splits["train"][0].label == (recs[0].dme, int(recs[0].dr == 2))
    ds = LabeledImages(data.splits["train"], "oct", 32, (0.2,) * 3, (0.2,) * 3)
    assert ds[0][1].dtype == torch.float32 and ds[0][1].shape == (2,)
    # A patient in two splits of a given split column is refused.
    rows[1][4] = "p0"
    _write_csv(path, rows, ["image", "dme", "pdr", "split", "patient"])
    with pytest.raises(DataError, match="p0"):
        read_csv_dataset(path, kind="multilabel", label_columns=["dme", "pdr"])
    # Bad values and missing files name the CSV line.
    rows[1][4] = "p1"
    rows[2][1] = "2"
    _write_csv(path, rows, ["image", "dme", "pdr", "split", "patient"])
    with pytest.raises(DataError, match=r"ml.csv:4"):
        read_csv_dataset(path, kind="multilabel", label_columns=["dme", "pdr"])
    _write_csv(path, [["missing.png", "a"], ["x.png", "b"]], ["path", "label"])
    with pytest.raises(ImageReadError, match="missing.png"):
        read_csv_dataset(path)
    _write_csv(path, [["x.png", ""]], ["path", "label"])
    with pytest.raises(DataError, match="empty label"):
        read_csv_dataset(path)
    with pytest.raises(DataError, match="no label column"):
        _write_csv(path, [["x.png", "a"]], ["path", "what"])
        read_csv_dataset(path)


def test_labeled_images_fail_early_on_a_bad_file(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.full((20, 30, 3), 128, np.uint8)).save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ImageReadError, match="bad.png"):
        LabeledImages([LabeledSample(good, 0), LabeledSample(bad, 1)], "cfp", 16, (0.5,) * 3, (0.25,) * 3)
    ds = LabeledImages([LabeledSample(good, 1)], "cfp", 16, (0.5,) * 3, (0.25,) * 3)
    x, y = ds[0]
    assert torch.allclose(x, torch.full_like(x, (128 / 255 - 0.5) / 0.25), atol=1e-5) and int(y) == 1


def test_labeled_images_square_by_the_modality_rule(tmp_path):
    """B-scans are stretched (their edges carry retina); fundus photos keep the central square."""
    arr = np.zeros((20, 60, 3), np.uint8)
    arr[:, :10] = 255  # a bright band at the left edge only
    path = tmp_path / "wide.png"
    Image.fromarray(arr).save(path)
    oct_x, _ = LabeledImages([LabeledSample(path, 0)], "oct", 12, (0.0,) * 3, (1.0,) * 3)[0]
    cfp_x, _ = LabeledImages([LabeledSample(path, 0)], "cfp", 12, (0.0,) * 3, (1.0,) * 3)[0]
    assert oct_x[:, :, 0].mean() > 0.9 and oct_x[:, :, -1].mean() < 0.1
    assert cfp_x.max() < 0.1  # the central square does not reach the band


def test_labeled_images_mirror(tmp_path):
    """``mirror=True`` gives each image flipped left-right (a probe's mirrored training copies), and is refused
    for a modality that does not allow horizontal flips."""
    arr = np.zeros((32, 32, 3), np.uint8)
    arr[:, :8] = 255  # a bright band at the left edge only
    path = tmp_path / "left.png"
    Image.fromarray(arr).save(path)
    plain = LabeledImages([LabeledSample(path, 0)], "cfp", 16, (0.5,) * 3, (0.25,) * 3)[0][0]
    mirrored = LabeledImages([LabeledSample(path, 0)], "cfp", 16, (0.5,) * 3, (0.25,) * 3, mirror=True)[0][0]
    assert plain[:, :, 0].mean() > plain[:, :, -1].mean()
    assert torch.equal(mirrored, plain.flip(-1))
    no_hflip = dataclasses.replace(get_modality("cfp"), augment=dataclasses.replace(get_modality("cfp").augment,
                                                                                   hflip=False))
    with pytest.raises(ValueError, match="horizontal flips"):
        LabeledImages([LabeledSample(path, 0)], no_hflip, 16, (0.5,) * 3, (0.25,) * 3, mirror=True)

"""benchmarks/finetune_cv.py: the folds it compares fine-tuning settings on."""

import csv
import json
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import finetune_cv  # noqa: E402
from visionfm.tasks.classification.data import read_oct_dme  # noqa: E402


def _read(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_folds_split_patients_not_images_and_never_read_test_patients(shared_data, tmp_path):
    data = read_oct_dme(shared_data, "oct")
    samples = finetune_cv.cv_pool(data)  # what main() deals into folds
    paths = finetune_cv.write_folds(tmp_path, samples, 5, 0, data.class_names)  # what main() writes
    assert [p.name for p in paths] == [f"fold{k}_of_5_seed0.csv" for k in range(5)]
    rounds = [_read(p) for p in paths]
    test_fold = {}  # patient -> the round in which it is scored
    for k, rows in enumerate(rounds):
        assert len(rows) == len(samples)
        split_of = {}
        for r in rows:  # a patient's images share one split in every round
            assert split_of.setdefault(r["patient"], r["split"]) == r["split"]
        test = {p for p, sp in split_of.items() if sp == "test"}
        labels = [r["label"] for r in rows if r["split"] == "test"]
        assert set(labels) == set(data.class_names)  # both classes in every scored fold, roughly equal folds
        assert abs(len(labels) - len(samples) / 5) < 10
        test_fold.update({p: k for p in test})
        # the next round's scored fold is this round's validation fold
        assert {p for p, sp in split_of.items() if sp == "val"} == {
            r["patient"] for r in rounds[(k + 1) % 5] if r["split"] == "test"}
    assert set(test_fold) == {s.group for s in samples}  # every patient scored exactly once
    assert not {s.group for s in data.splits["test"]} & set(test_fold)  # OCT DME's own test patients never read
    other = finetune_cv.write_folds(tmp_path / "seed1", samples, 5, 1, data.class_names)
    assert _read(other[0]) != rounds[0]  # the fold seed deals differently


def test_main_fine_tunes_every_fold_and_reads_back_only_matching_runs(shared_data, tmp_path, capsys):
    out = tmp_path / "cv"
    common = ["--data-root", str(shared_data), "--output", str(out), "--epochs", "1", "--warmup-epochs", "0",
              "--folds", "3"]
    assert finetune_cv.main(common + ["--variant", "one=train.max_steps=1", "--json", str(tmp_path / "a.json")]) == 0
    first = json.loads((tmp_path / "a.json").read_text())["table"]["one"]
    assert len(first["per_fold"]) == 3 and all(0.0 <= a <= 1.0 for a in first["per_fold"])
    assert "| one |" in capsys.readouterr().out
    runs = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert runs == [f"one_seed0_foldseed0_fold{k}" for k in range(3)]
    mtime = (out / runs[0] / "metrics.json").stat().st_mtime_ns
    assert finetune_cv.main(common + ["--variant", "one=train.max_steps=1", "--json", str(tmp_path / "b.json")]) == 0
    assert json.loads((tmp_path / "b.json").read_text())["table"]["one"] == first  # read back, not rerun
    assert (out / runs[0] / "metrics.json").stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match="one_seed0_foldseed0_fold0 holds a run of other settings"):
        finetune_cv.main(common + ["--variant", "one=train.max_steps=2"])  # same name, other settings
    # a run folder left from another deal of the folds is refused, not read back
    other = out / "fold0_of_3_seed0.csv"
    rows = _read(other)
    for r in rows:
        r["split"] = {"test": "train", "train": "test"}.get(r["split"], r["split"])
    with open(other, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with pytest.raises(ValueError, match="scored other test images"):
        finetune_cv.read_back(out / runs[0], yaml.safe_load((out / runs[0] / "config.yaml").read_text()), other)

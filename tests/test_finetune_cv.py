"""benchmarks/finetune_cv.py: the folds it compares fine-tuning settings on."""

import csv
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import finetune_cv  # noqa: E402
from visionfm.tasks.classification.data import read_oct_dme  # noqa: E402


def test_folds_split_patients_not_images_and_never_read_test_patients(shared_data, tmp_path):
    data = read_oct_dme(shared_data, "oct")
    samples = finetune_cv.cv_pool(data)  # what main() deals into folds
    fold = finetune_cv.patient_folds(samples, 5, seed=0)
    assert set(fold) == {s.group for s in samples} and set(fold.values()) == set(range(5))
    for k in range(5):  # both classes in every held-out fold, roughly equal folds
        labels = [s.label for s in samples if fold[s.group] == k]
        assert set(labels) == {0, 1} and abs(len(labels) - len(samples) / 5) < 10
    assert finetune_cv.patient_folds(samples, 5, seed=0) == fold != finetune_cv.patient_folds(samples, 5, seed=1)
    finetune_cv.write_fold_csv(tmp_path / "f.csv", samples, fold, 2, data.class_names)
    with open(tmp_path / "f.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    patients = {split: {r["patient"] for r in rows if r["split"] == split} for split in ("train", "val", "test")}
    assert patients["test"] == {p for p, k in fold.items() if k == 2}
    assert patients["val"] == {p for p, k in fold.items() if k == 3}
    assert patients["train"] == {p for p, k in fold.items() if k not in (2, 3)}
    assert len(rows) == len(samples)
    assert not {s.group for s in data.splits["test"]} & set(fold)  # OCT DME's own test patients are never read

#!/usr/bin/env python
"""Fine-tuning settings compared by patient-grouped k-fold cross-validation over OCT DME's train+val images.

::

    python benchmarks/finetune_cv.py --data-root ../shared/data --seed 0 \\
        --variant recipe= --variant "lr0.02,dp0=finetune.lr=0.02 finetune.drop_path=0.0"

OCT DME's validation split holds 30 images (18 / 12): a validation AUROC moves by 1/216 per swapped pair and
cannot tell settings apart that differ by a few hundredths. This script pools the train and val patients (163
images of 121 patients; the test patients are never read), deals the patients into ``--folds`` folds (stratified by
each patient's majority label, seeded by ``--fold-seed``: :func:`grouped_folds`, as ``probe_cv.py``), and fine-tunes each variant once per fold: that fold is
the test split, the next one the validation split that chooses the epoch (as OCT DME's val does; choosing it on the
scored fold itself would favour settings whose validation curve is noisy), the other folds the training images;
through the same runner as ``downstream/cls.py`` (``configs/cls/oct_dme_finetune.yaml`` for ``--epochs`` epochs).

A variant is ``NAME=KEY=VALUE KEY=VALUE ...`` (``--set`` overrides; ``NAME=`` alone: the recipe). The table gives,
per variant, the mean and per-fold AUROC of the test folds, the AUROC of all their predictions pooled, and
the mean difference to the first variant with the number of folds where it is ahead.
"""

import argparse
import csv
import json
import logging
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import numpy as np  # noqa: E402
import yaml  # noqa: E402
from cv_common import fold_roles, parse_variant  # noqa: E402

from visionfm.cli import resolve_data_root  # noqa: E402
from visionfm.config import CONFIG_DIR, build_config  # noqa: E402
from visionfm.data.datasets.labeled import grouped_folds  # noqa: E402
from visionfm.metrics import binary_auroc  # noqa: E402
from visionfm.tasks.classification.data import read_oct_dme  # noqa: E402
from visionfm.tasks.classification.runner import run_classification  # noqa: E402


def cv_pool(data) -> List:
    """The images the folds are dealt from: OCT DME's train and val splits; its test patients are never read."""
    return data.splits["train"] + data.splits["val"]


def write_fold_csv(path: Path, samples, fold: Dict[str, int], k: int, class_names: Sequence[str]) -> None:
    """Fold ``k`` is the test split, the next fold the validation split (epoch selection, as OCT DME's val),
    the rest the training split (:func:`cv_common.fold_role`)."""
    role = fold_roles(fold, k)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "label", "patient", "split"])
        for s in samples:  # absolute paths: the CSV reader resolves relative ones against the CSV's folder
            w.writerow([Path(s.path).resolve(), class_names[s.label], s.group, role[s.group_key]])


def write_folds(output: Path, samples, folds: int, fold_seed: int, class_names: Sequence[str]) -> List[Path]:
    """Deal the patients into ``folds`` folds (:func:`grouped_folds`) and write one CSV per round (round ``k``:
    :func:`write_fold_csv`) under ``output``; returns their paths in round order."""
    fold = grouped_folds(samples, folds, fold_seed)
    output.mkdir(parents=True, exist_ok=True)
    paths = [output / f"fold{k}_of_{folds}_seed{fold_seed}.csv" for k in range(folds)]
    for k, path in enumerate(paths):
        write_fold_csv(path, samples, fold, k, class_names)
    return paths


def read_back(run_dir: Path, cfg: Dict, fold_csv: Path) -> List[Dict[str, str]]:
    """The rows of a finished run's ``predictions_test.csv``, checked to come from a run of exactly ``cfg`` (every
    key: ``train.max_steps`` too, which a resumed run may change) on exactly the test images of ``fold_csv``: a
    run of other settings or of an earlier deal of the folds is refused, not read back.

    Raises:
        ValueError: the run's settings or test images differ (the message names the run folder).
    """
    stored = yaml.safe_load((run_dir / "config.yaml").read_text())
    if stored != yaml.safe_load(yaml.safe_dump(dict(cfg), sort_keys=False)):
        raise ValueError(f"{run_dir} holds a run of other settings than this variant's; remove it or use another "
                         f"--output or variant name")
    with open(run_dir / "predictions_test.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    with open(fold_csv, newline="") as fh:
        expected = sorted(r["image"] for r in csv.DictReader(fh) if r["split"] == "test")
    if sorted(r["path"] for r in rows) != expected:
        raise ValueError(f"{run_dir} scored other test images than {fold_csv} holds (a run of another deal of the "
                         f"folds); remove it or use another --output")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/finetune_cv.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", type=parse_variant, action="append", required=True,
                        help="NAME=KEY=VALUE KEY=VALUE ... (--set overrides; NAME= alone: the recipe); repeat; "
                             "the first is the reference")
    parser.add_argument("--data-root", metavar="DIR", default=None,
                        help="folder holding OCT_AND_EYE_FUNDUS_DME_DR (default: $VISIONFM_DATA or data/)")
    parser.add_argument("--modality", default="oct", help="oct (B-scans) or cfp (fundus photographs of OCT_DME)")
    parser.add_argument("--folds", type=int, default=5, help="folds of patients (default 5)")
    parser.add_argument("--fold-seed", type=int, default=0, help="seed of the patients' fold assignment")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fine-tuning runs")
    parser.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs (the transfer suite's 10)")
    parser.add_argument("--warmup-epochs", type=int, default=1, help="warm-up epochs (the transfer suite's 1)")
    parser.add_argument("--output", default="runs/finetune_cv", help="fold CSVs and one run folder per variant "
                        "and fold (a finished run of the same settings and test images is read back, not rerun; "
                        "one of other settings is an error)")
    parser.add_argument("--json", default=None, help="write the table's figures to this JSON file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    data = read_oct_dme(resolve_data_root(args.data_root), args.modality)
    samples = cv_pool(data)
    output = Path(args.output)
    fold_csvs = write_folds(output, samples, args.folds, args.fold_seed, data.class_names)
    positive = f"p_{data.class_names[1]}"
    results: Dict[str, Dict[int, Dict]] = {}
    for name, overrides in args.variant:
        results[name] = {}
        for k, fold_csv in enumerate(fold_csvs):
            run_dir = output / f"{name}_seed{args.seed}_foldseed{args.fold_seed}_fold{k}"
            start = time.time()
            cfg = build_config(CONFIG_DIR / "cls" / "default.yaml", CONFIG_DIR / "cls" / "oct_dme_finetune.yaml",
                               {"dataset": "csv", "modality": args.modality, "data.csv": str(fold_csv),
                                "data.class_names": list(data.class_names), "finetune.epochs": args.epochs,
                                "finetune.warmup_epochs": args.warmup_epochs, "train.seed": args.seed,
                                "eval.bootstrap": 0, "output.plots": False, "output.save_model": False},
                               overrides)
            if not (run_dir / "metrics.json").is_file():
                run_classification(cfg, run_dir)
            rows = read_back(run_dir, cfg, fold_csv)
            y = np.array([int(r["target"]) for r in rows])
            p = np.array([float(r[positive]) for r in rows])
            results[name][k] = {"auroc": binary_auroc(y, p), "y": y, "p": p}
            print(f"{name} fold {k}: AUROC {results[name][k]['auroc']:.3f} ({time.time() - start:.0f} s)",
                  file=sys.stderr, flush=True)

    reference = args.variant[0][0]
    table = {}
    print(f"| variant | mean AUROC of {args.folds} folds | per fold | pooled | vs {reference} | folds ahead |")
    print("|---|---|---|---|---|---|")
    for name, _ in args.variant:
        ks = range(args.folds)
        aurocs = [results[name][k]["auroc"] for k in ks]
        pooled = binary_auroc(np.concatenate([results[name][k]["y"] for k in ks]),
                              np.concatenate([results[name][k]["p"] for k in ks]))
        diffs = [results[name][k]["auroc"] - results[reference][k]["auroc"] for k in ks]
        table[name] = {"mean": float(np.mean(aurocs)), "per_fold": aurocs, "pooled": pooled,
                       "diff": float(np.mean(diffs)), "folds_ahead": int(sum(d > 0 for d in diffs))}
        print(f"| {name} | {np.mean(aurocs):.3f} | {' / '.join(f'{a:.3f}' for a in aurocs)} | {pooled:.3f} | "
              f"{np.mean(diffs):+.3f} | {table[name]['folds_ahead']}/{args.folds} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"seed": args.seed, "fold_seed": args.fold_seed, "epochs": args.epochs,
                                               "variants": dict(args.variant), "table": table}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

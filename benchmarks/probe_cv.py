#!/usr/bin/env python
"""Linear-probe settings compared by patient-grouped k-fold cross-validation over a dataset's train+val images.

::

    python benchmarks/probe_cv.py --data-root ../shared/data --seed 0 \\
        --variant suite= --variant "mirror=eval.mirror=true"

EyeDisease4's selection carve (369 images) moves its balanced accuracy by 0.01-0.02 from one carve or seed to the
next, as much as the probe settings one would like to compare. This script pools the train and val images of the
dataset (the ``test`` split, for EyeDisease4 the reported carve, is never read), deals their patients into
``--folds`` folds (stratified by label, :func:`grouped_folds`), extracts every image's frozen features once (and
its mirror's), and trains each variant's probe once per fold: that fold is the test fold, the next one the
validation fold that chooses the weight decay and epoch, the other folds train. The base protocol is the transfer
suite's EyeDisease4 probe (``--pool cls+mean``, ``linear.class_weight=balanced``, ``linear.mirror_train=true``,
selection by AUROC); ``--set`` changes it for every variant.

A variant is ``NAME=KEY=VALUE KEY=VALUE ...`` over the probe's own keys (``linear.*``, ``eval.select_metric`` and
``eval.mirror``: the cached features do not depend on them; ``NAME=`` alone: the base). The table gives, per
variant, the mean and per-fold balanced accuracy of the test folds, that of all their predictions pooled, the mean
difference to the first variant with the number of folds where it is ahead, and the mean macro AUROC.
"""

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import numpy as np  # noqa: E402
import torch  # noqa: E402
from cv_common import fold_roles, parse_variant  # noqa: E402

from visionfm.config import CONFIG_DIR, apply_overrides, build_config  # noqa: E402
from visionfm.data.datasets.labeled import LabeledSample, grouped_folds, targets_tensor  # noqa: E402
from visionfm.tasks.classification.probe import train_probe  # noqa: E402
from visionfm.tasks.classification.runner import ClassificationExperiment, probe_config  # noqa: E402
from visionfm.tasks.classification.selection import resolve_select_metric, split_metrics  # noqa: E402

#: The transfer suite's EyeDisease4 probe protocol (visionfm/evaluation/transfer.py), the base of every variant.
SUITE_PROBE = {"model.pool": "cls+mean", "linear.class_weight": "balanced", "linear.mirror_train": True,
               "eval.select_metric": "auroc"}


def probe_key_problem(key: str) -> Optional[str]:
    """Why ``key`` cannot vary between variants (``None``: it can): features are extracted once for all of them."""
    if key.startswith("linear.") or key in ("eval.select_metric", "eval.mirror"):
        return None
    return (f"{key!r} is not a probe setting (linear.*, eval.select_metric, eval.mirror); features are extracted "
            f"once for all variants")


def parse_probe_variant(text: str) -> Tuple[str, List[str]]:
    """A ``--variant`` whose keys are probe settings only (:func:`cv_common.parse_variant`)."""
    return parse_variant(text, probe_key_problem)


def cv_pool(experiment: ClassificationExperiment) -> List[LabeledSample]:
    """The images the folds are dealt from: train and val; the test split is never read."""
    return experiment.data.splits["train"] + experiment.data.splits["val"]


def fold_splits(samples: Sequence[LabeledSample], fold: Dict[str, int], k: int) -> Dict[str, List[LabeledSample]]:
    """Fold ``k`` is the test split, the next fold the validation split (selection), the rest the training split."""
    role = fold_roles(fold, k)
    out: Dict[str, List[LabeledSample]] = {"train": [], "val": [], "test": []}
    for s in samples:
        out[role[s.group_key]].append(s)
    return out


def run_variant(experiment: ClassificationExperiment, cfg: Dict, splits: Dict[str, List[LabeledSample]],
                seed: int) -> Dict[str, object]:
    """One probe of one variant on one fold: its test-fold targets, probabilities, metrics and selection."""
    # the variant's own flags; the cached features (pool, size, weights) are the base config's for every variant
    train_x, train_y = experiment.probe_training_set(splits["train"], bool(cfg["linear"].get("mirror_train", False)))
    mirror = bool(cfg["eval"].get("mirror", False))
    val_x, test_x = experiment.eval_features(splits["val"], mirror), experiment.eval_features(splits["test"], mirror)
    task = experiment.task
    metric = resolve_select_metric(task, cfg["eval"].get("select_metric", "auto"))
    head, selection = train_probe(train_x, train_y, val_x, targets_tensor(splits["val"]), task, probe_config(cfg),
                                  metric, seed, experiment.device)
    with torch.no_grad():
        probs = task.probabilities(head(test_x))
    y = targets_tensor(splits["test"])
    return {"y": y.numpy(), "p": probs.numpy(), "metrics": split_metrics(task, probs, y),
            "selection": {k: selection[k] for k in ("weight_decay", "epoch", f"val_{metric}")}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/probe_cv.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", type=parse_probe_variant, action="append", required=True,
                        help="NAME=KEY=VALUE KEY=VALUE ... (linear.*, eval.select_metric, eval.mirror; NAME= alone: "
                             "the base); repeat; the first is the reference")
    parser.add_argument("--dataset", default="EyeDisease4", help="dataset folder name (default EyeDisease4)")
    parser.add_argument("--modality", default="cfp", help="modality of its images (default cfp)")
    parser.add_argument("--weights", default=None, help="encoder file (default: the modality's shipped encoder)")
    parser.add_argument("--data-root", metavar="DIR", default=None,
                        help="folder holding the dataset (default: $VISIONFM_DATA or data/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="change the base protocol for every variant (e.g. data.img_size=256); repeat")
    parser.add_argument("--folds", type=int, default=5, help="folds of patients (default 5)")
    parser.add_argument("--fold-seed", type=int, default=0, help="seed of the patients' fold assignment")
    parser.add_argument("--seed", type=int, default=0, help="seed of the probes (initialisation, batch order)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    parser.add_argument("--json", default=None, help="write the table's figures to this JSON file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    base = build_config(CONFIG_DIR / "cls" / "default.yaml", None,
                        {"dataset": args.dataset, "modality": args.modality, "mode": "linear",
                         "data.root": args.data_root, "model.weights": args.weights, "train.seed": args.seed,
                         "train.device": args.device, **SUITE_PROBE}, args.overrides)
    experiment = ClassificationExperiment(base)
    samples = cv_pool(experiment)
    fold = grouped_folds(samples, args.folds, args.fold_seed)
    start = time.time()
    experiment.features(samples)
    if experiment.modality.augment.hflip:  # for linear.mirror_train and eval.mirror
        experiment.mirrored_features(samples)
    print(f"features of {len(samples)} images (and mirrors): {time.time() - start:.0f} s", file=sys.stderr,
          flush=True)

    results: Dict[str, Dict[int, Dict]] = {}
    for name, overrides in args.variant:
        cfg = apply_overrides(copy.deepcopy(base), overrides)
        results[name] = {}
        for k in range(args.folds):
            start = time.time()
            results[name][k] = run_variant(experiment, cfg, fold_splits(samples, fold, k), args.seed)
            m = results[name][k]["metrics"]
            print(f"{name} fold {k}: balanced accuracy {m['balanced_accuracy']:.3f}, AUROC {m['auroc']:.3f}, "
                  f"chose {results[name][k]['selection']} ({time.time() - start:.0f} s)", file=sys.stderr, flush=True)

    reference = args.variant[0][0]
    table = {}
    print(f"| variant | mean balanced accuracy of {args.folds} folds | per fold | pooled | vs {reference} "
          f"| folds ahead | mean macro AUROC |")
    print("|---|---|---|---|---|---|---|")
    for name, _ in args.variant:
        ks = range(args.folds)
        bacc = [float(results[name][k]["metrics"]["balanced_accuracy"]) for k in ks]
        auroc = [float(results[name][k]["metrics"]["auroc"]) for k in ks]
        y = np.concatenate([results[name][k]["y"] for k in ks])
        p = np.concatenate([results[name][k]["p"] for k in ks])
        pooled = float(split_metrics(experiment.task, torch.from_numpy(p), torch.from_numpy(y))["balanced_accuracy"])
        diffs = [b - float(results[reference][k]["metrics"]["balanced_accuracy"]) for k, b in zip(ks, bacc)]
        table[name] = {"mean": float(np.mean(bacc)), "per_fold": bacc, "pooled": pooled, "diff": float(np.mean(diffs)),
                       "folds_ahead": int(sum(d > 0 for d in diffs)), "mean_auroc": float(np.mean(auroc)),
                       "selections": [results[name][k]["selection"] for k in ks]}
        print(f"| {name} | {np.mean(bacc):.3f} | {' / '.join(f'{b:.3f}' for b in bacc)} | {pooled:.3f} | "
              f"{np.mean(diffs):+.3f} | {table[name]['folds_ahead']}/{args.folds} | {np.mean(auroc):.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"dataset": args.dataset, "seed": args.seed, "fold_seed": args.fold_seed,
                                               "variants": dict(args.variant), "base": args.overrides,
                                               "images": len(samples), "table": table}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

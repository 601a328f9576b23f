"""Data-efficiency curves: test metrics against the number of training images per class.

For each encoder (the pretrained one and, optionally, a randomly initialised one of the same shape and input
size) one :class:`~visionfm.tasks.classification.runner.ClassificationExperiment` is built, so frozen features
are extracted once per image; each shot count is then run with several seeds (different images drawn), plus
one run on the full training split. Every run writes its own folder; the curve goes to ``fewshot.json`` and a
table to stdout.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from ...metrics import to_jsonable
from .runner import ClassificationExperiment

__all__ = ["fewshot_curve", "format_table"]

log = logging.getLogger(__name__)


def _variants(cfg: Dict[str, Any], compare_random_init: bool) -> Dict[str, Dict[str, Any]]:
    variants = {"random_init" if cfg["model"].get("random_init") else "pretrained": cfg}
    if compare_random_init and not cfg["model"].get("random_init"):
        variants["random_init"] = None  # filled in once the pretrained encoder's shape is known
    return variants


def fewshot_curve(cfg: Dict[str, Any], output: "str | os.PathLike", shots_list: Sequence[int] = (1, 5, 10, 20),
                  repeats: int = 3, compare_random_init: bool = False, include_full: bool = True,
                  n_bootstrap: Optional[int] = None) -> Dict[str, Any]:
    """Run the curve and write ``<output>/fewshot.json``.

    Args:
        cfg: Merged classification config (mode ``linear``, ``knn`` or ``finetune``).
        output: Folder; run ``r`` of ``K`` shots of encoder ``E`` goes to ``<output>/<E>/shots_<K>/seed_<s>``.
        shots_list: Training images per class.
        repeats: Seeds per shot count (``train.seed``, ``train.seed + 1``, ...).
        compare_random_init: Also run a randomly initialised encoder of the same architecture and input size.
        include_full: Also one run on the whole training split (row ``all``).
        n_bootstrap: Bootstrap resamples per run (default ``eval.bootstrap``).

    Returns:
        ``{"metric": name, "rows": [{"encoder", "shots", "runs", "mean", "std", "values", "train_images"}]}``.
    """
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    metric = None
    rows: List[Dict[str, Any]] = []
    variants = _variants(cfg, compare_random_init)
    reference = None
    for name in list(variants):
        vcfg = variants[name]
        if vcfg is None:  # random init, same shape and input size as the pretrained encoder
            vcfg = copy.deepcopy(cfg)
            vcfg["model"].update(random_init=True, weights=reference.info.source, arch=None)
            vcfg["data"]["img_size"] = reference.img_size
        experiment = ClassificationExperiment(vcfg)
        reference = reference or experiment
        if metric is None:  # the curve reports the selection metric (AUROC; kappa for grades)
            metric = experiment.select_metric if experiment.select_metric != "loss" else "auroc"
        base_seed = int(vcfg["train"]["seed"])
        plan = [(int(k), [base_seed + r for r in range(repeats)]) for k in shots_list]
        if include_full:
            plan.append((0, [base_seed]))
        for shots, seeds in plan:
            values, used = [], []
            for seed in seeds:
                label = f"shots_{shots}" if shots else "all"
                summary = experiment.run(output / name / label / f"seed_{seed}", shots=shots or None, seed=seed,
                                         n_bootstrap=n_bootstrap)
                value = summary["test"].get(metric)
                values.append(math.nan if value is None else float(value))
                used.append(summary["data"]["splits"]["train_used"]["images"])
                log.info("%s %s seed %d: test %s %.4f", name, label, seed, metric, values[-1])
            arr = np.asarray(values, dtype=float)
            rows.append({"encoder": name, "shots": shots or "all", "runs": len(values),
                         "mean": float(np.nanmean(arr)) if np.isfinite(arr).any() else None,
                         "std": float(np.nanstd(arr)) if np.isfinite(arr).any() else None,
                         "values": values, "train_images": used})
    result = {"metric": metric, "mode": cfg["mode"], "dataset": cfg["dataset"], "modality": cfg["modality"],
              "rows": rows}
    tmp = output / "fewshot.json.tmp"
    tmp.write_text(json.dumps(to_jsonable(result), indent=2))
    os.replace(tmp, output / "fewshot.json")
    return result


def format_table(result: Dict[str, Any]) -> str:
    """A Markdown table: one row per shot count, one column per encoder (mean ± std over seeds)."""
    encoders = list(dict.fromkeys(r["encoder"] for r in result["rows"]))
    shots = list(dict.fromkeys(r["shots"] for r in result["rows"]))
    cell = {(r["encoder"], r["shots"]): r for r in result["rows"]}
    lines = ["| shots/class | " + " | ".join(f"{e} test {result['metric']}" for e in encoders) + " |",
             "|---" * (len(encoders) + 1) + "|"]
    for k in shots:
        cells = []
        for e in encoders:
            r = cell.get((e, k))
            if r is None or r["mean"] is None:
                cells.append("n/a")
            elif r["runs"] > 1:
                cells.append(f"{r['mean']:.3f} ± {r['std']:.3f} (n={r['runs']})")
            else:
                cells.append(f"{r['mean']:.3f}")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)

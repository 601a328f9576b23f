"""The transfer suite: a fixed set of downstream evaluations of an encoder against its random-init twin.

The twin has the encoder's architecture, patch size, image size and normalisation (the same metadata) and
timm's initial weights drawn with a fixed seed; it is written as a safetensors file and goes through exactly the
same code as the pretrained encoder, so every difference in the table is the pretraining.

Tasks (each a row group of the table; ``FULL`` budget in brackets):

``cfp``
    * ``EyeDisease4 linear probe`` and ``EyeDisease4 k-NN``: frozen features (class token + mean patch token
      of the last block), extracted once per encoder and shared by both; the probe's loss weights the
      classes for balanced accuracy (``class_weight: balanced``) and it also trains on the features of each
      training image's left-right mirror (``linear.mirror_train``; k-NN does not), at
      ``Budget.eyedisease4_probe_lr`` [0.01; the default 0.001 under-trains it]. Evaluated on a 20 % split
      carved from ``train/`` by patient, stratified by class, seed 0 (the release's test split is held back);
      probe weight decay and epoch, and k of k-NN, are chosen on a further 15 % selection carve, so the
      reported split is never used to choose anything (:mod:`visionfm.data.datasets.eyedisease4`). Balanced
      accuracy and macro AUROC.
    * ``fundus DME linear probe``: OCT_DME's fundus photographs, DME yes/no, trained on the patient-level
      train split, selected on val, test AUROC on held-out patients.
    * ``DRIVE vessels``: ``configs/seg/drive_target.yaml`` (UNETR head, fine-tuned encoder) on the short
      schedule of ``Budget.seg_steps`` steps [200; the recipe's own is 1700] without its flip test-time
      augmentation; test Dice (pooled over images) and AUC (mean of per-image AUCs; the pooled AUC is in the
      details) inside the FOV. The checkpoint and the test threshold are chosen on the validation images by
      the Dice at their best threshold (``test.threshold: val``): at 200 steps the foreground probabilities
      rank the vessels well (AUC 0.94) but may all lie under 0.5, and whether they cross it by then depended
      on float rounding (Dice at 0.5 was 0.766 with 2 threads and 0.000 with 1 for the same run).

``oct``
    * ``OCT DME linear probe``: as the fundus probe, on OCT B-scans.
    * ``OCT DME 5-shot probe``: 5 training images per class, ``Budget.shot_draws`` draws [20]; the same draws
      for both encoders; mean and sd over draws (20, not 5: the spread between draws is as large as the
      difference between the encoders, and features are cached, so each draw costs a probe, not an encoder).
    * ``OCT DME fine-tuning``: ``configs/cls/oct_dme_finetune.yaml`` for ``Budget.finetune_epochs`` epochs
      [10; the recipe's own is 30] at ``Budget.finetune_lr`` without drop path, the head started from a linear
      probe on the frozen features (LP-FT, ``Budget.finetune_head_init``), epoch chosen on val, test AUROC.

Every row gives both encoders' values, their difference and a 95 % paired bootstrap interval of the
difference (:func:`visionfm.evaluation.paired.paired_bootstrap`): the test items (images; for segmentation,
test images) are resampled, within each class for classification, and both encoders are scored on the same
resample; for the few-shot row the draws are resampled too.

The encoder's native input size is used throughout (112 px for the shipped ViT-Tiny encoders).
"""

from __future__ import annotations

import csv
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..config import CONFIG_DIR, build_config
from ..data.datasets.labeled import LabeledSample, sample_shots, targets_tensor
from ..metrics import classification_metrics, to_jsonable
from ..modalities import get_modality
from ..tasks.classification.knn import knn_scores
from ..tasks.classification.probe import ProbeConfig, train_probe
from ..tasks.classification.runner import ClassificationExperiment
from ..tasks.classification.selection import Selector, split_metrics
from ..weights import load_encoder, save_encoder
from .paired import BootstrapResult, metric_difference, paired_bootstrap

__all__ = ["ENCODERS", "Budget", "FULL", "QUICK", "Row", "SuiteContext", "TASKS", "make_random_twin",
           "classification_rows", "segmentation_rows", "run_transfer_suite", "format_table"]

log = logging.getLogger(__name__)

#: The two encoders every task compares, in table order.
ENCODERS = ("pretrained", "random_init")
#: Probe and k-NN features: class token and mean patch token of the last block, as the DME probe configs use.
#: DINO's linear evaluation of ViT-S concatenates the last 4 blocks (``model.last_blocks``); for the shipped
#: encoders (2026-12-06, machine (C)) 4 blocks moved the OCT probe 0.891 -> 0.906 and the EyeDisease4 probe
#: 0.738 -> 0.734 (class-balanced), and lowered the fundus DME probe 0.929 -> 0.923 (its CI then touched zero):
#: no consistent gain, so the suite keeps the last block.
POOL = "cls+mean"


@dataclass(frozen=True)
class Budget:
    """How much of each task runs. :data:`FULL` fits 30 minutes per modality on a shared 2-core CPU (measured:
    see ``benchmarks/transfer.py``); :data:`QUICK` is a smoke test of every code path in about a minute."""

    limit: Optional[int] = None             # at most N images per classification split (class-balanced, seeded)
    probe_epochs: int = 100                 # linear probe epochs (configs/cls/default.yaml)
    # EyeDisease4's probe rate: the default 0.001 under-trains its probe in 100 epochs; chosen by patient-grouped
    # 5-fold cross-validation over train + selection carve, seeds 0-2 (benchmarks/probe_cv.py; README): mean balanced
    # accuracy 0.753 at 0.001, 0.767 at 0.003, 0.769 at 0.01, 0.739 at 0.0003
    eyedisease4_probe_lr: float = 0.01
    weight_decays: Tuple[float, ...] = (0.0, 0.01, 0.1, 1.0, 10.0)   # probe grid, chosen on the selection split
    knn_k: Tuple[int, ...] = (10, 20, 50, 100)                        # k-NN grid, chosen on the selection split
    shots: int = 5                          # few-shot: training images per class
    shot_draws: int = 20                    # few-shot: draws of training images (seed, seed + 1, ...)
    finetune_epochs: int = 10               # OCT DME fine-tuning epochs (the recipe's 30, cut)
    finetune_warmup_epochs: int = 1
    # the short budget's own rate and regularisation (the recipe's 0.005 and 0.1 are for its 30 epochs), chosen by
    # patient-grouped 5-fold cross-validation over train+val, seeds 0-2 (benchmarks/finetune_cv.py; README)
    finetune_lr: float = 0.01               # base lr per 256 images
    finetune_drop_path: float = 0.0
    # LP-FT: the head starts from a linear probe on the frozen features instead of near zero, so the first steps do
    # not push a random head's gradients into the encoder; chosen by the same cross-validation, seeds 0-4 (README)
    finetune_head_init: str = "probe"
    finetune_max_steps: Optional[int] = None
    seg_steps: int = 200                    # DRIVE training steps (the recipe's 1700, cut; schedule fitted to it)
    seg_val_every: int = 100                # validations (best.pth selection) every N steps
    seg_val_count: int = 4                  # validation images carved from DRIVE's 20 training images
    seg_limit: Optional[int] = None         # at most N DRIVE training and test images
    seg_flip: bool = False                  # the recipe's flip test-time augmentation (3 views: 3x the test time)
    bootstrap: int = 1000                   # paired bootstrap resamples


FULL = Budget()
QUICK = Budget(limit=16, probe_epochs=5, weight_decays=(0.0, 1.0), knn_k=(5,), shots=2, shot_draws=2,
               finetune_epochs=1, finetune_max_steps=2, seg_steps=2, seg_val_every=2, seg_val_count=1, seg_limit=2,
               seg_flip=False, bootstrap=200)


@dataclass
class Row:
    """One line of the table: a task's metric for both encoders and their paired difference.

    Attributes:
        ci95: Paired bootstrap interval of ``diff`` (``None`` where it is undefined).
        n: Test items the bootstrap resamples (images).
        pretrained_sd, random_init_sd: Spread over draws (few-shot rows only).
    """

    task: str
    metric: str
    pretrained: float
    random_init: float
    diff: float
    ci95: Optional[Tuple[float, float]]
    n: int
    pretrained_sd: Optional[float] = None
    random_init_sd: Optional[float] = None
    note: str = ""


@dataclass
class SuiteContext:
    """Everything a task needs: the modality, the two encoder files, where data and run folders are, the budget
    and the seed (of the twin's weights, probe and training runs, few-shot draws and the bootstrap; the dataset
    splits have fixed seeds of their own)."""

    modality: str
    encoders: Dict[str, str]
    data_root: Path
    output: Path
    budget: Budget
    seed: int = 0
    device: Optional[str] = None


# ------------------------------------------------------------------------------------------------ encoders

def make_random_twin(modality: str, weights: Optional[str], path: "str | Path", seed: int = 0) -> Tuple[str, str]:
    """Write a randomly initialised twin of an encoder and return ``(encoder file, twin file)``.

    Args:
        modality: The encoder's modality (picks the shipped weights when ``weights`` is ``None``).
        weights: Encoder weights (any format :func:`visionfm.load_encoder` reads), or ``None``.
        path: Where to write the twin (safetensors).
        seed: Seed of timm's initialisation.
    """
    encoder, info = load_encoder(modality, weights=weights)
    torch.manual_seed(seed)
    encoder.init_weights()
    metadata = {"modality": info.modality, "arch": info.arch, "patch_size": info.patch_size,
                "img_size": info.img_size, "embed_dim": info.embed_dim, "mean": list(info.mean),
                "std": list(info.std), "objective": "random_init", "seed": seed, "shape_from": info.source,
                "data": "none: random initialisation"}
    save_encoder(encoder.state_dict(), path, metadata)
    log.info("random-init twin of %s (seed %d): %s", info.source, seed, path)
    return str(info.source), str(path)


# ---------------------------------------------------------------------------------------------- statistics

def _per_draw(targets: np.ndarray, scores: np.ndarray, metrics: Sequence[str]) -> np.ndarray:
    """``(D, M)``: each metric of each draw's ``(N, C)`` scores on all items."""
    return np.array([[classification_metrics(targets, s, "multiclass", per_class=False)[m] for m in metrics]
                     for s in scores], dtype=float)


def _sd(values: np.ndarray) -> Optional[float]:
    """Sample standard deviation over draws (``None`` for a single run)."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else None


def _row(task: str, metric: str, a: np.ndarray, b: np.ndarray, result: BootstrapResult, j: int, n: int,
         note: str = "") -> Row:
    """A row from per-draw values of both encoders and component ``j`` of a paired bootstrap of their
    difference."""
    ci = (float(result.low[j]), float(result.high[j])) if np.isfinite(result.low[j]) else None
    return Row(task, metric, float(np.mean(a)), float(np.mean(b)), float(result.estimate[j]), ci, n, _sd(a), _sd(b),
               note)


def classification_rows(task: str, targets: np.ndarray, scores: Dict[str, np.ndarray], metrics: Sequence[str],
                        n_resamples: int, seed: int, note: str = "") -> List[Row]:
    """One row per metric from both encoders' class probabilities on the same test items.

    Args:
        task: Row label.
        targets: ``(N,)`` class indices.
        scores: ``{"pretrained": (D, N, C), "random_init": (D, N, C)}`` for ``D`` draws (1 for a single run);
            draw ``d`` of both encoders was trained on the same images.
        metrics: :func:`visionfm.metrics.classification_metrics` names (``balanced_accuracy``, ``auroc``...).
        n_resamples: Bootstrap rounds (items resampled within each class; draws resampled too when ``D > 1``).
        seed: Bootstrap seed.
    """
    targets = np.asarray(targets)
    a, b = (np.asarray(scores[e], dtype=float) for e in ENCODERS)
    result = paired_bootstrap(metric_difference(targets, a, b, metrics), len(targets), strata=targets,
                              n_draws=a.shape[0], n_resamples=n_resamples, seed=seed)
    va, vb = _per_draw(targets, a, metrics), _per_draw(targets, b, metrics)
    return [_row(task, m, va[:, j], vb[:, j], result, j, len(targets), note) for j, m in enumerate(metrics)]


def segmentation_rows(task: str, results: Dict[str, Dict[str, Any]], n_resamples: int, seed: int) -> List[Row]:
    """Dice pooled over the test images and the mean of per-image AUCs, from both encoders' segmentation
    ``metrics.json`` (their ``per_image`` entries), with test images resampled for the interval.

    Raises:
        ValueError: the two runs were tested on different images.
    """
    per_image = {e: results[e]["per_image"] for e in ENCODERS}
    names = [[r["name"] for r in per_image[e]] for e in ENCODERS]
    if names[0] != names[1]:
        raise ValueError(f"{task}: the two encoders were tested on different images: {names[0]} vs {names[1]}")
    counts = {e: np.array([[r["tp"], r["fp"], r["fn"]] for r in per_image[e]], dtype=float) for e in ENCODERS}
    aucs = {e: np.array([math.nan if r["auc"] is None else r["auc"] for r in per_image[e]], dtype=float)
            for e in ENCODERS}

    def values(encoder: str, items: np.ndarray) -> np.ndarray:
        tp, fp, fn = counts[encoder][items].sum(axis=0)
        dice = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 1.0
        auc = aucs[encoder][items]
        return np.array([dice, np.nanmean(auc) if np.isfinite(auc).any() else math.nan])

    def statistic(items: np.ndarray, draws: np.ndarray) -> np.ndarray:
        return values("pretrained", items) - values("random_init", items)

    n = len(names[0])
    result = paired_bootstrap(statistic, n, n_resamples=n_resamples, seed=seed)
    everything = np.arange(n)
    va, vb = values("pretrained", everything), values("random_init", everything)
    return [_row(task, metric, va[j:j + 1], vb[j:j + 1], result, j, n)
            for j, metric in enumerate(("dice_pooled", "auc_mean_per_image"))]


# ----------------------------------------------------------------------------------------------- frozen

def _frozen_experiments(ctx: SuiteContext, dataset: str, **flags: Any) -> Dict[str, ClassificationExperiment]:
    """One classification experiment per encoder (data, encoder, feature cache), on the same items."""
    experiments = {}
    for encoder in ENCODERS:
        cfg = build_config(CONFIG_DIR / "cls" / "default.yaml", None, {
            "dataset": dataset, "modality": ctx.modality, "mode": "linear", "data.root": str(ctx.data_root),
            "data.limit": ctx.budget.limit, "model.weights": ctx.encoders[encoder], "model.random_init": False,
            "model.pool": POOL, "train.seed": ctx.seed, "train.device": ctx.device, **flags})
        experiments[encoder] = ClassificationExperiment(cfg)
    _same_items({e: x.data.splits["test"] for e, x in experiments.items()}, dataset)
    return experiments


def _same_items(tests: Dict[str, Sequence[LabeledSample]], where: str) -> None:
    paths = {e: [str(s.path) for s in samples] for e, samples in tests.items()}
    if paths["pretrained"] != paths["random_init"]:
        raise ValueError(f"{where}: the two encoders' test splits differ; the comparison would not be paired")


def _probe_scores(experiment: ClassificationExperiment, train: Sequence[LabeledSample], budget: Budget,
                  seed: int, class_weight: str = "none",
                  lr: float = ProbeConfig.lr) -> Tuple[np.ndarray, Dict[str, Any]]:
    """Test probabilities of a linear probe trained on ``train``'s cached features, weight decay and epoch
    chosen on the ``val`` split by AUROC; and what was chosen."""
    val, test = experiment.data.splits["val"], experiment.data.splits["test"]
    cfg = ProbeConfig(epochs=budget.probe_epochs, lr=lr, weight_decays=budget.weight_decays,
                      class_weight=class_weight)
    head, selection = train_probe(*experiment.probe_training_set(train), experiment.eval_features(val),
                                  targets_tensor(val), experiment.task, cfg, "auroc", seed, experiment.device)
    with torch.no_grad():
        probs = experiment.task.probabilities(head(experiment.eval_features(test)))
    chosen = {**{k: selection[k] for k in ("weight_decay", "epoch", "val_auroc", "class_weight")}, "lr": lr}
    return probs.numpy(), chosen


def _knn_scores(experiment: ClassificationExperiment, ks: Sequence[int],
                temperature: float = 0.07) -> Tuple[np.ndarray, Dict[str, Any]]:
    """Test scores of DINO's weighted k-NN over the training features, k chosen on ``val`` by AUROC."""
    splits, task = experiment.data.splits, experiment.task
    bank, bank_targets = experiment.features(splits["train"]), targets_tensor(splits["train"])
    val_x, val_y = experiment.features(splits["val"]), targets_tensor(splits["val"])
    selector = Selector("auroc")
    for k in dict.fromkeys(min(int(k), len(splits["train"])) for k in ks):
        probs = knn_scores(bank, bank_targets, val_x, task, k, temperature)
        selector.offer(split_metrics(task, probs, val_y), None, {"k": k})
    k = selector.best["k"]
    probs = knn_scores(bank, bank_targets, experiment.features(splits["test"]), task, k, temperature)
    return probs.numpy(), {"k": k, "val_auroc": selector.best["val_auroc"], "temperature": temperature}


def _test_targets(experiment: ClassificationExperiment) -> np.ndarray:
    return targets_tensor(experiment.data.splits["test"]).numpy()


def eyedisease4_frozen(ctx: SuiteContext) -> Tuple[List[Row], Dict[str, Any]]:
    """EyeDisease4 linear probe and k-NN on one feature extraction per encoder (balanced accuracy, AUROC)."""
    # the probe also trains on each training image's left-right mirror (fundus photographs of left and right eyes
    # mirror each other): on the selection carve, seeds 0-2, balanced accuracy 0.793 -> 0.810 (2026-12-06, (B))
    experiments = _frozen_experiments(ctx, "EyeDisease4", **{"linear.mirror_train": True})
    probe, knn, details = {}, {}, {}
    for encoder, experiment in experiments.items():
        # balanced class weights: the headline metric is balanced accuracy and the classes are imbalanced
        # (329 glaucoma vs 877 diabetic retinopathy images); an unweighted probe under-predicts glaucoma
        probe_probs, probe_choice = _probe_scores(experiment, experiment.data.splits["train"], ctx.budget, ctx.seed,
                                                  class_weight="balanced", lr=ctx.budget.eyedisease4_probe_lr)
        knn_probs, knn_choice = _knn_scores(experiment, ctx.budget.knn_k)
        probe[encoder], knn[encoder] = probe_probs[None], knn_probs[None]
        details[encoder] = {"probe": probe_choice, "knn": knn_choice,
                            "feature_seconds": round(experiment.features.seconds, 1)}
    reference = experiments["pretrained"]
    targets, metrics, b = _test_targets(reference), ("balanced_accuracy", "auroc"), ctx.budget.bootstrap
    note = "carved 20 % validation split"
    rows = (classification_rows("EyeDisease4 linear probe", targets, probe, metrics, b, ctx.seed, note)
            + classification_rows("EyeDisease4 k-NN", targets, knn, metrics, b, ctx.seed, note))
    details["data"] = {"splits": reference.data.summary(), "notes": reference.data.notes,
                       "classes": reference.data.class_names}
    return rows, details


def _dme_probe(ctx: SuiteContext, label: str, fewshot: bool) -> Tuple[List[Row], Dict[str, Any]]:
    """OCT_DME DME yes/no probe (this modality's images, patient-level split): all training images, and
    optionally ``budget.shots`` per class over ``budget.shot_draws`` draws."""
    experiments = _frozen_experiments(ctx, "OCT_DME", task="dme")
    reference = experiments["pretrained"]
    train = reference.data.splits["train"]
    draws = [sample_shots(train, ctx.budget.shots, reference.task.kind, reference.task.num_classes, ctx.seed + d)
             for d in range(ctx.budget.shot_draws)] if fewshot else []
    full, few, details = {}, {}, {}
    for encoder, experiment in experiments.items():
        probs, choice = _probe_scores(experiment, train, ctx.budget, ctx.seed)
        full[encoder] = probs[None]
        details[encoder] = {"probe": choice}
        if fewshot:
            few[encoder] = np.stack([_probe_scores(experiment, shots, ctx.budget, ctx.seed + d)[0]
                                     for d, shots in enumerate(draws)])
        details[encoder]["feature_seconds"] = round(experiment.features.seconds, 1)
    targets, b = _test_targets(reference), ctx.budget.bootstrap
    rows = classification_rows(label, targets, full, ("auroc",), b, ctx.seed, "held-out patients")
    if fewshot:
        rows += classification_rows(f"OCT DME {ctx.budget.shots}-shot probe", targets, few, ("auroc",), b, ctx.seed,
                                    f"{ctx.budget.shot_draws} draws: mean, sd; CI resamples draws too")
        details["shot_draws"] = [[str(s.path.name) for s in shots] for shots in draws]
    details["data"] = {"splits": reference.data.summary(), "notes": reference.data.notes}
    return rows, details


def fundus_dme_probe(ctx: SuiteContext) -> Tuple[List[Row], Dict[str, Any]]:
    """Fundus photographs of OCT_DME, DME yes/no linear probe, test AUROC on held-out patients."""
    return _dme_probe(ctx, "fundus DME linear probe", fewshot=False)


def oct_dme_frozen(ctx: SuiteContext) -> Tuple[List[Row], Dict[str, Any]]:
    """OCT B-scans of OCT_DME: linear probe on all training images and the few-shot probe."""
    return _dme_probe(ctx, "OCT DME linear probe", fewshot=True)


# ------------------------------------------------------------------------------------------ trained runs

def read_test_predictions(path: "str | Path", class_names: Sequence[str]) -> Tuple[List[str], np.ndarray, np.ndarray]:
    """``(paths, targets (N,), probabilities (N, C))`` from a classification run's ``predictions_test.csv``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the classification run wrote no test predictions")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    columns = [f"p_{c}" for c in class_names]
    missing = [c for c in ["path", "target", *columns] if rows and c not in rows[0]]
    if not rows or missing:
        raise ValueError(f"{path}: expected columns path, target, {', '.join(columns)}; missing {missing or 'rows'}")
    probs = np.array([[float(r[c]) for c in columns] for r in rows])
    return [r["path"] for r in rows], np.array([int(r["target"]) for r in rows]), probs


def oct_dme_finetune(ctx: SuiteContext) -> Tuple[List[Row], Dict[str, Any]]:
    """``configs/cls/oct_dme_finetune.yaml`` for ``budget.finetune_epochs`` epochs per encoder, through the
    classification runner; test AUROC from its ``predictions_test.csv``."""
    b = ctx.budget
    scores, paths, details, targets = {}, {}, {}, None
    for encoder in ENCODERS:
        cfg = build_config(CONFIG_DIR / "cls" / "default.yaml", CONFIG_DIR / "cls" / "oct_dme_finetune.yaml", {
            "modality": ctx.modality, "data.root": str(ctx.data_root), "data.limit": b.limit,
            "model.weights": ctx.encoders[encoder], "model.random_init": False, "finetune.epochs": b.finetune_epochs,
            "finetune.warmup_epochs": b.finetune_warmup_epochs, "finetune.lr": b.finetune_lr,
            "finetune.drop_path": b.finetune_drop_path, "finetune.head_init": b.finetune_head_init,
            "train.max_steps": b.finetune_max_steps,
            "train.seed": ctx.seed, "train.device": ctx.device, "eval.bootstrap": 0, "output.plots": False,
            "output.save_model": False})
        run_dir = ctx.output / "oct_dme_finetune" / encoder
        experiment = ClassificationExperiment(cfg)
        summary = experiment.run(run_dir)
        paths[encoder], targets, probs = read_test_predictions(run_dir / "predictions_test.csv",
                                                               experiment.task.class_names)
        scores[encoder] = probs[None]
        details[encoder] = {"run": str(run_dir), "epoch": summary["selection"].get("epoch"),
                            "val_auroc": summary["selection"].get("val_auroc"),
                            "head_init_probe": summary["selection"].get("head_init_probe"),
                            "seconds": summary["seconds"]["total"]}
    if paths["pretrained"] != paths["random_init"]:
        raise ValueError("OCT DME fine-tuning: the two runs were tested on different images")
    rows = classification_rows("OCT DME fine-tuning", targets, scores, ("auroc",), b.bootstrap, ctx.seed,
                               f"{b.finetune_epochs} epochs, held-out patients")
    return rows, details


def drive_segmentation(ctx: SuiteContext) -> Tuple[List[Row], Dict[str, Any]]:
    """``configs/seg/drive_target.yaml`` for ``budget.seg_steps`` steps (its schedule fitted to them) per
    encoder through the segmentation runner; Dice and AUC inside the FOV on DRIVE's test images."""
    from ..cli import resolve_device
    from ..tasks.segmentation.runner import train as train_segmentation

    b = ctx.budget
    results, details = {}, {}
    for encoder in ENCODERS:
        cfg = build_config(CONFIG_DIR / "seg" / "default.yaml", CONFIG_DIR / "seg" / "drive_target.yaml", {
            "modality": ctx.modality, "model.weights": ctx.encoders[encoder], "model.random_init": False,
            "optim.steps": b.seg_steps, "optim.warmup_steps": max(1, b.seg_steps // 10),
            "train.val_every": b.seg_val_every, "data.val_count": b.seg_val_count, "data.limit": b.seg_limit,
            "test.flip": b.seg_flip, "test.threshold": "val", "train.seed": ctx.seed, "train.device": ctx.device})
        run_dir = ctx.output / "drive" / encoder
        results[encoder] = train_segmentation(cfg, run_dir, ctx.data_root, resolve_device(ctx.device))
        result = results[encoder]
        details[encoder] = {"run": str(run_dir), "best_step": result["best_step"],
                            "dice_pooled": result["pooled"]["dice"], "auc_pooled": result["pooled"]["auc"],
                            "dice_mean_per_image": result["mean"]["dice"],
                            "train_seconds": result["train"]["seconds"], "eval_seconds": result["eval_seconds"]}
    rows = segmentation_rows(f"DRIVE vessels ({b.seg_steps} steps)", results, b.bootstrap, ctx.seed)
    return rows, details


# ------------------------------------------------------------------------------------------------- suite

Task = Callable[[SuiteContext], Tuple[List[Row], Dict[str, Any]]]
#: The tasks of each modality, in table order.
TASKS: Dict[str, List[Tuple[str, Task]]] = {
    "cfp": [("EyeDisease4", eyedisease4_frozen), ("fundus DME", fundus_dme_probe), ("DRIVE", drive_segmentation)],
    "oct": [("OCT DME frozen", oct_dme_frozen), ("OCT DME fine-tuning", oct_dme_finetune)],
}


def run_transfer_suite(modality: str, weights: Optional[str], data_root: "str | Path", output: "str | Path",
                       budget: Budget = FULL, seed: int = 0, device: Optional[str] = None) -> Dict[str, Any]:
    """Run a modality's tasks for an encoder and its random-init twin.

    Args:
        modality: ``cfp`` or ``oct`` (or an alias).
        weights: Encoder weights; ``None``: the shipped encoder of the modality (``weights/``).
        data_root: Folder holding the datasets (``EyeDisease4``, ``OCT_AND_EYE_FUNDUS_DME_DR``, ``DRIVE``).
        output: Folder for the twin's weights and every run folder.
        budget: :data:`FULL` or :data:`QUICK` (or your own).
        seed: Seed of the twin, the probes and training runs, few-shot draws and the bootstrap.
        device: ``cpu``, ``cuda``... (default: CUDA when available).

    Returns:
        ``{"rows": [Row as dict], "weights", "random_init", "ci", "budget", "tasks", "seconds", ...}``.
    """
    start = time.perf_counter()
    modality = get_modality(modality).name
    if modality not in TASKS:
        raise ValueError(f"the transfer suite covers modalities {', '.join(TASKS)}, not {modality!r}")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    source, twin = make_random_twin(modality, weights,
                                    output / "encoders" / f"{modality}_random_init_seed{seed}.safetensors", seed)
    ctx = SuiteContext(modality, {"pretrained": source, "random_init": twin}, Path(data_root), output, budget, seed,
                       device)
    rows: List[Row] = []
    tasks: Dict[str, Any] = {}
    for name, task in TASKS[modality]:
        t0 = time.perf_counter()
        log.info("transfer suite: %s", name)
        task_rows, details = task(ctx)
        rows.extend(task_rows)
        tasks[name] = {"seconds": round(time.perf_counter() - t0, 1), **details}
        log.info("transfer suite: %s done in %.0f s", name, tasks[name]["seconds"])
    return to_jsonable({
        "modality": modality,
        "weights": source,
        "random_init": {"weights": twin, "seed": seed,
                        "how": "timm init_weights of the same architecture, patch size, image size and normalisation"},
        "ci": {"method": "paired bootstrap of the difference (pretrained - random_init): test items resampled "
                         "(within each class for classification; draws too for few-shot), both encoders scored on "
                         "each resample", "level": 0.95, "resamples": budget.bootstrap},
        "budget": asdict(budget),
        "rows": [asdict(r) for r in rows],
        "tasks": tasks,
        "output": str(output),
        "seconds": round(time.perf_counter() - start, 1),
    })


_METRIC_LABELS = {"balanced_accuracy": "balanced accuracy", "auroc": "AUROC", "dice_pooled": "Dice (pooled)",
                  "auc_mean_per_image": "AUC (mean per image)"}


def format_table(result: Dict[str, Any]) -> str:
    """The suite's Markdown table: one row per task and metric."""
    def value(v: Optional[float], sd: Optional[float]) -> str:
        if v is None:
            return "n/a"
        return f"{v:.3f} ± {sd:.3f}" if sd is not None else f"{v:.3f}"

    lines = ["| task | metric | pretrained | random init | difference | 95 % CI of difference (paired bootstrap) | n |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        ci = f"[{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}]" if r.get("ci95") and None not in r["ci95"] else "n/a"
        diff = f"{r['diff']:+.3f}" if r.get("diff") is not None else "n/a"
        lines.append(f"| {r['task']} | {_METRIC_LABELS.get(r['metric'], r['metric'])} | "
                     f"{value(r['pretrained'], r.get('pretrained_sd'))} | "
                     f"{value(r['random_init'], r.get('random_init_sd'))} | {diff} | {ci} | {r['n']} |")
    return "\n".join(lines)

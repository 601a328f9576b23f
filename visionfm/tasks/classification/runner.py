"""One classification experiment: data, encoder, the chosen mode, final evaluation and the run folder.

:class:`ClassificationExperiment` loads the dataset and encoder once; :meth:`~ClassificationExperiment.run`
trains and evaluates one configuration (optionally few-shot) and writes ``metrics.json``, the plots,
per-image test predictions, TensorBoard logs and the trained head. Frozen features are cached across runs
of one experiment, so a few-shot curve reads each image through the encoder once.

The flow of :meth:`run`: select on validation (probe weight decay and epoch, k of k-NN, or fine-tuning
epoch), then evaluate the selected model once on validation and once on test, with bootstrap intervals.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ...cli import resolve_data_root, resolve_device
from ...config import write_run_config
from ...data.datasets.labeled import (SPLITS, LabeledImages, LabeledSample, limit_samples, sample_shots,
                                      targets_tensor)
from ...engine.checkpoint import atomic_save
from ...engine.loading import loader_settings
from ...engine.loop import RunContext
from ...engine.precision import enable_tf32, resolve_precision
from ...metrics import evaluate_split, plot_confusion_matrix, plot_roc_curves, to_jsonable
from ...modalities import get_modality
from ...weights.loader import WeightsNotFoundError, load_encoder, resolve_weights
from .data import canonical_dataset, load_classification_data
from .features import FeatureCache, extract_features, feature_dim
from .finetune import HEAD_INITS, EncoderClassifier, FinetuneConfig, finetune, interpolate_weights, predict_logits
from .heads import build_head, load_probe_into_head
from .knn import knn_scores
from .probe import ProbeConfig, train_probe
from .selection import Selector, resolve_select_metric, split_metrics
from .task import ClassificationTask

__all__ = ["MODES", "ClassificationExperiment", "probe_config", "run_classification", "evaluate_checkpoint"]

log = logging.getLogger(__name__)

#: Fine-tuning's resume state in the run folder (rerunning the command continues from it).
FINETUNE_STATE = "finetune_state.pt"

MODES = ("linear", "finetune", "knn")


def probe_config(cfg: Dict[str, Any], dropout: Optional[float] = None) -> ProbeConfig:
    """The ``linear`` section of a merged classification config (and the head's shape from ``model``) as a
    :class:`ProbeConfig`; ``dropout`` overrides ``model.dropout``."""
    linear, model = cfg["linear"], cfg["model"]
    return ProbeConfig(head=model.get("head", "linear"), epochs=int(linear["epochs"]), lr=float(linear["lr"]),
                       min_lr=float(linear.get("min_lr", 0.0)), warmup_epochs=int(linear.get("warmup_epochs", 0)),
                       batch_size=int(linear["batch_size"]), weight_decays=[float(w) for w in linear["weight_decays"]],
                       hidden_dim=int(model.get("hidden_dim", 512)),
                       dropout=float(model.get("dropout", 0.0)) if dropout is None else dropout,
                       standardize_prior=float(linear.get("standardize_prior", 10.0)),
                       class_weight=str(linear.get("class_weight") or "none"),
                       max_steps=cfg["train"].get("max_steps"))


class ClassificationExperiment:
    """Dataset, task and (for frozen modes) encoder of a merged classification config.

    Args:
        cfg: Merged config (``configs/cls/default.yaml`` layout).
    """

    def __init__(self, cfg: Dict[str, Any]) -> None:
        self.cfg = cfg
        self.mode = cfg["mode"]
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        self.seed = int(cfg["train"]["seed"])
        self.device = resolve_device(cfg["train"].get("device"))
        self.amp_dtype, self.use_scaler = resolve_precision(cfg["train"].get("precision", "auto"), self.device)
        # Under torchrun fine-tuning trains one model across the ranks; the frozen-feature modes (cheap) run on every
        # rank alike. Rank 0 alone writes the run folder.
        self.ctx = RunContext.start(self.device)
        # data.num_workers auto: loader workers on a GPU, none on the CPU (visionfm.engine.loading)
        self.num_workers = loader_settings(cfg["data"], self.device)["num_workers"]
        enable_tf32(self.device)  # feature caching and linear probes run in fp32
        self.modality = get_modality(cfg["modality"])
        self.dataset_name = canonical_dataset(cfg["dataset"])
        data_root = resolve_data_root(cfg["data"].get("root"))
        self.data = load_classification_data(cfg, data_root)
        limit = cfg["data"].get("limit")
        if limit:
            self.data.splits = {s: limit_samples(v, int(limit), self.seed) for s, v in self.data.splits.items()}
        self.task = ClassificationTask(self.data.kind, self.data.class_names,
                                       float(cfg["finetune"].get("label_smoothing", 0.0)))
        self.select_metric = resolve_select_metric(self.task, cfg["eval"].get("select_metric", "auto"))
        # The frozen encoder (linear, knn) is loaded once; fine-tuning loads a fresh one per run.
        self.encoder, self.info = self._load_encoder(drop_path=0.0)
        self.img_size = self.info.img_size
        model = cfg["model"]
        cache = functools.partial(FeatureCache, self.encoder, pool=model.get("pool", "cls"),
                                  last_blocks=int(model.get("last_blocks", 1)),
                                  batch_size=int(cfg["data"].get("batch_size", 64)), device=self.device,
                                  amp_dtype=self.amp_dtype, num_workers=self.num_workers)
        self.features = cache(self.make_dataset)
        # the left-right mirror of each image, for probes trained on both (``linear.mirror_train``)
        self.mirrored_features = cache(functools.partial(self.make_dataset, mirror=True))
        self._image_sets: Dict[Tuple[str, ...], LabeledImages] = {}
        for split in SPLITS:
            counts = self.data.class_counts(split)
            log.info("%s: %d images, per class %s", split, len(self.data.splits[split]),
                     dict(zip(self.data.class_names, counts)))

    # -- pieces -------------------------------------------------------------------------------------------

    def _load_encoder(self, drop_path: float):
        """The encoder through :func:`load_encoder`. With ``random_init`` the encoder gets the shape, input size
        and normalisation of the weights file (``model.weights``, else the modality's default weights when
        present) and fresh timm initial weights: a like-for-like baseline for encoders of any width and depth.
        Without any weights file it is :func:`load_encoder`'s random ``vit_tiny`` (or ``model.arch``)."""
        model = self.cfg["model"]
        random_init, weights = bool(model.get("random_init")), model.get("weights")
        if random_init and not weights:
            try:  # the baseline takes the shape and input size of the modality's default weights, if any
                weights = str(resolve_weights(self.modality.name, model.get("arch")))
            except WeightsNotFoundError:
                weights = None
        encoder, info = load_encoder(self.modality.name, weights=weights, arch=model.get("arch"),
                                     img_size=self.cfg["data"].get("img_size"),
                                     random_init=random_init and not weights, drop_path_rate=drop_path)
        if random_init and weights:
            encoder.init_weights()
            info = dataclasses.replace(info, source=None, metadata={"shape_from": str(weights)}, key_report=None)
            log.info("random-init baseline with the shape of %s", weights)
        return encoder, info

    def make_dataset(self, samples: Sequence[LabeledSample], cache: bool = False,
                     mirror: bool = False) -> LabeledImages:
        """Encoder-ready images of some samples (size and normalisation from the encoder), optionally mirrored."""
        return LabeledImages(samples, self.modality, self.img_size, self.info.mean, self.info.std, cache=cache,
                             mirror=mirror)

    def probe_training_set(self, train: Sequence[LabeledSample],
                           mirror: Optional[bool] = None) -> Tuple[Tensor, Tensor]:
        """Frozen features and targets a probe trains on: ``train``'s, and with ``mirror`` (default
        ``linear.mirror_train``) also those of each image's left-right mirror (twice the rows)."""
        x, y = self.features(train), targets_tensor(train)
        if not (self.cfg["linear"].get("mirror_train", False) if mirror is None else mirror):
            return x, y
        return torch.cat([x, self.mirrored_features(train)]), torch.cat([y, y])  # LabeledImages checks the modality

    @property
    def mirror_eval(self) -> bool:
        """``eval.mirror``: validation and test images are scored with their left-right mirror, averaged."""
        return bool(self.cfg["eval"].get("mirror", False))

    def eval_features(self, samples: Sequence[LabeledSample], mirror: Optional[bool] = None) -> Tensor:
        """Frozen features of validation and test images (probe, k-NN queries): each image's, or with ``mirror``
        (default ``eval.mirror``) the mean of each image's and its left-right mirror's (for a linear head on them,
        the mean of the two views' logits, as the head is affine)."""
        x = self.features(samples)
        if not (self.mirror_eval if mirror is None else mirror):
            return x
        return (x + self.mirrored_features(samples)) / 2  # LabeledImages refuses modalities without flips

    def _cached_images(self, samples: Sequence[LabeledSample]) -> LabeledImages:
        key = tuple(str(s.path) for s in samples)
        if key not in self._image_sets:
            self._image_sets[key] = self.make_dataset(samples, cache=bool(self.cfg["data"].get("cache", True)))
        return self._image_sets[key]

    def train_samples(self, shots: Optional[int], seed: int) -> List[LabeledSample]:
        train = self.data.splits["train"]
        if not shots:
            return list(train)
        return sample_shots(train, int(shots), self.task.kind, self.task.num_classes, seed)

    # -- modes --------------------------------------------------------------------------------------------

    def _run_linear(self, train: List[LabeledSample], seed: int, writer) -> Tuple[Tensor, Tensor, Dict, Dict]:
        model = self.cfg["model"]
        probe_cfg = probe_config(self.cfg)
        val, test = self.data.splits["val"], self.data.splits["test"]
        head, selection = train_probe(*self.probe_training_set(train), self.eval_features(val), targets_tensor(val),
                                      self.task, probe_cfg, self.select_metric, seed, self.device, writer)
        with torch.no_grad():
            val_probs = self.task.probabilities(head(self.eval_features(val)))
            test_probs = self.task.probabilities(head(self.eval_features(test)))
        state = {"head": head.state_dict(), "feature_dim": feature_dim(self.encoder, model.get("pool", "cls"),
                                                                        int(model.get("last_blocks", 1))),
                 "mirror_eval": self.mirror_eval}
        return val_probs, test_probs, selection, state

    def _run_knn(self, train: List[LabeledSample], writer) -> Tuple[Tensor, Tensor, Dict, Dict]:
        cfg = self.cfg["knn"]
        ks = cfg["k"] if isinstance(cfg["k"], (list, tuple)) else [cfg["k"]]
        temperature = float(cfg.get("temperature", 0.07))
        val, test = self.data.splits["val"], self.data.splits["test"]
        xtr, ytr = self.features(train), targets_tensor(train)
        xv, yv = self.eval_features(val), targets_tensor(val)
        selector = Selector(self.select_metric)
        tried = []
        for k in dict.fromkeys(min(int(k), len(train)) for k in ks):
            probs = knn_scores(xtr, ytr, xv, self.task, k, temperature)
            metrics = split_metrics(self.task, probs, yv)
            tried.append({"k": k, "val_" + self.select_metric: metrics.get(self.select_metric)})
            selector.offer(metrics, None, {"k": k}, state_fn=lambda p=probs: p)
            if writer is not None and metrics.get(self.select_metric) is not None:
                writer.add_scalar(f"knn/val_{self.select_metric}", metrics[self.select_metric], k)
        k = selector.best["k"]
        test_probs = knn_scores(xtr, ytr, self.eval_features(test), self.task, k, temperature)
        selection = {"select_metric": self.select_metric, **selector.best, "temperature": temperature,
                     "candidates": tried}
        return selector.state, test_probs, selection, {}

    def _run_finetune(self, train: List[LabeledSample], seed: int, writer, resume_path: Optional[Path] = None,
                      ctx: Optional[RunContext] = None) -> Tuple[Tensor, Tensor, Dict, Dict]:
        cfg, model_cfg = self.cfg["finetune"], self.cfg["model"]
        torch.manual_seed(seed)
        encoder, _ = self._load_encoder(drop_path=float(cfg.get("drop_path", 0.0)))
        if int(model_cfg.get("last_blocks", 1)) != 1:
            raise ValueError("model.last_blocks applies to frozen features; fine-tuning pools the last block only")
        pool = model_cfg.get("pool", "cls")
        head = build_head(model_cfg.get("head", "linear"), feature_dim(encoder, pool, 1), self.task,
                          int(model_cfg.get("hidden_dim", 512)), float(model_cfg.get("dropout", 0.0)),
                          init_std=cfg.get("head_init_std"))
        head_init = str(cfg.get("head_init") or "random")
        if head_init not in HEAD_INITS:
            raise ValueError(f"finetune.head_init must be one of {', '.join(HEAD_INITS)}, got {head_init!r}")
        wise_alpha = float(cfg.get("wise_alpha", 1.0))
        if not 0.0 < wise_alpha <= 1.0:
            raise ValueError(f"finetune.wise_alpha must lie in (0, 1] (1: the fine-tuned weights), got {wise_alpha}")
        extra = None
        if head_init == "probe":
            if resume_path is not None and resume_path.is_file() and wise_alpha == 1.0:
                # the head comes back from the resume state with the rest: a probe trained now would be overwritten
                log.info("LP-FT: resuming from %s; the head and its probe's record come from there", resume_path)
            else:
                extra = {"head_init_probe": self._probe_into_head(encoder, pool, train, seed, head)}
        if self.mirror_eval and not self.modality.augment.hflip:
            raise ValueError(f"eval.mirror: modality {self.modality.name!r} does not allow horizontal flips")
        model = EncoderClassifier(encoder, head, pool, mirror_eval=self.mirror_eval)
        ft_cfg = FinetuneConfig(epochs=int(cfg["epochs"]), batch_size=int(cfg["batch_size"]), lr=float(cfg["lr"]),
                                min_lr=float(cfg["min_lr"]), warmup_epochs=int(cfg["warmup_epochs"]),
                                weight_decay=float(cfg["weight_decay"]), layer_decay=float(cfg["layer_decay"]),
                                mixup=float(cfg.get("mixup", 0.0)), cutmix=float(cfg.get("cutmix", 0.0)),
                                mixup_prob=float(cfg.get("mixup_prob", 1.0)),
                                mixup_switch_prob=float(cfg.get("mixup_switch_prob", 0.5)),
                                clip_grad=cfg.get("clip_grad"), augment=bool(cfg.get("augment", True)),
                                crop_scale=tuple(cfg.get("crop_scale", (0.6, 1.0))),
                                max_steps=self.cfg["train"].get("max_steps"),
                                num_workers=self.num_workers,
                                checkpoint_every_steps=int(self.cfg["train"].get("checkpoint_every_steps", 25) or 0))
        val_set = self._cached_images(self.data.splits["val"])
        test_set = self._cached_images(self.data.splits["test"])
        # WiSE-FT needs the weights fine-tuning starts from; a resumed run rebuilds them the same way (same seed,
        # same probe), the resume state only holds later ones
        start = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()} if wise_alpha < 1.0 else None
        model, selection = finetune(model, self._cached_images(train), val_set, self.task, ft_cfg, self.modality,
                                    self.img_size, self.device, self.amp_dtype, self.use_scaler,
                                    self.select_metric, seed, writer, resume_path=resume_path, ctx=ctx,
                                    extra=extra)
        if start is not None:
            ended = {k: v.detach().cpu() for k, v in model.state_dict().items()}
            model.load_state_dict(interpolate_weights(start, ended, wise_alpha))
            selection["wise_alpha"] = wise_alpha
            log.info("WiSE-FT: weights %.2f of the way from the start to the chosen epoch's", wise_alpha)
        batch = int(self.cfg["data"].get("batch_size", 64))
        val_logits, _ = predict_logits(model, val_set, batch, self.device, self.amp_dtype, ctx)
        test_logits, _ = predict_logits(model, test_set, batch, self.device, self.amp_dtype, ctx)
        state = {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "pool": pool,
                 "mirror_eval": self.mirror_eval}
        return self.task.probabilities(val_logits), self.task.probabilities(test_logits), selection, state

    def _probe_into_head(self, encoder: torch.nn.Module, pool: str, train: List[LabeledSample], seed: int,
                         head: torch.nn.Sequential) -> Dict[str, Any]:
        """LP-FT (Kumar et al., ICLR 2022): train a probe on the frozen encoder's features of ``train`` (the
        ``linear`` section's optimiser, grid and class weights, selected on the validation split; unmirrored
        images only) and start ``head`` from it, so fine-tuning does not begin by pushing a random head's
        gradients into the pretrained features. Every process of a ``torchrun`` job trains the same probe (same
        weights, images and seed). Returns what the probe selection chose."""
        batch = int(self.cfg["data"].get("batch_size", 64))
        val = self.data.splits["val"]
        features = {}
        for name, samples in (("train", train), ("val", val)):
            features[name], _ = extract_features(encoder, self._cached_images(samples), pool, 1, batch, self.device,
                                                 self.amp_dtype, self.num_workers)
        probe, selection = train_probe(features["train"], targets_tensor(train), features["val"], targets_tensor(val),
                                       self.task, probe_config(self.cfg, dropout=0.0), self.select_metric, seed,
                                       self.device)
        load_probe_into_head(probe.cpu(), head)
        metric = selection["select_metric"]
        log.info("LP-FT: head initialised from a linear probe (weight decay %s, epoch %s, val %s %s)",
                 selection.get("weight_decay"), selection.get("epoch"), metric, selection.get(f"val_{metric}"))
        return selection

    # -- one run ------------------------------------------------------------------------------------------

    def run(self, output: "str | os.PathLike", shots: Optional[int] = None, seed: Optional[int] = None,
            n_bootstrap: Optional[int] = None) -> Dict[str, Any]:
        """Train (selecting on validation), evaluate once on validation and test, and write the run folder.

        Args:
            output: Run folder.
            shots: Few-shot: training images per class (default ``data.shots``).
            seed: Seed of the shot sampling and training (default ``train.seed``).
            n_bootstrap: Bootstrap resamples (default ``eval.bootstrap``).

        Returns:
            The content of ``metrics.json``.
        """
        start = time.perf_counter()
        feature_seconds = self.features.seconds
        output = Path(output)
        ctx = dataclasses.replace(self.ctx, output=output)
        if ctx.is_main:
            output.mkdir(parents=True, exist_ok=True)
        shots = shots if shots is not None else self.cfg["data"].get("shots")
        seed = self.seed if seed is None else int(seed)
        n_bootstrap = int(self.cfg["eval"].get("bootstrap", 1000) if n_bootstrap is None else n_bootstrap)
        cfg = {**self.cfg, "data": {**self.cfg["data"], "shots": shots}, "train": {**self.cfg["train"], "seed": seed}}
        if ctx.is_main:
            write_run_config(cfg, output)
        train = self.train_samples(shots, seed)
        if shots:
            log.info("few-shot: %d shots per class -> %d training images (seed %d)", shots, len(train), seed)
        writer = ctx.writer()
        try:
            if self.mode == "linear":
                val_probs, test_probs, selection, state = self._run_linear(train, seed, writer)
            elif self.mode == "knn":
                val_probs, test_probs, selection, state = self._run_knn(train, writer)
            else:
                val_probs, test_probs, selection, state = self._run_finetune(train, seed, writer,
                                                                             output / FINETUNE_STATE, ctx)
            results = {}
            confidence = float(self.cfg["eval"].get("confidence", 0.95))
            for split, probs in (("val", val_probs), ("test", test_probs)):
                targets = targets_tensor(self.data.splits[split])
                preds = self.task.predict(probs)
                results[split] = evaluate_split(targets.numpy(), probs.numpy(), self.task.kind,
                                                self.task.class_names, preds.numpy(), n_bootstrap, confidence, seed)
                for name in ("accuracy", "balanced_accuracy", "auroc", "aupr", "f1_macro", "kappa"):
                    value = results[split].get(name)
                    if isinstance(value, float) and value == value:
                        writer.add_scalar(f"{split}/{name}", value, 0)
        finally:
            writer.close()
        summary = self._summary(train, shots, seed, selection, results, start, feature_seconds)
        if ctx.is_main:
            self._write(output, summary, test_probs, state)
        return summary

    def _summary(self, train, shots, seed, selection, results, start, feature_seconds) -> Dict[str, Any]:
        model = self.cfg["model"]
        data_summary = self.data.summary()
        data_summary["train_used"] = {"images": len(train),
                                      **dict(zip(self.data.class_names, _counts(train, self.task)))}
        return {
            "dataset": self.dataset_name,
            "task": self.cfg.get("task") if self.dataset_name == "OCT_DME" else self.task.kind,
            "label_kind": self.task.kind,
            "classes": list(self.task.class_names),
            "modality": self.modality.name,
            "mode": self.mode,
            "head": model.get("head", "linear") if self.mode != "knn" else None,
            "shots": shots,
            "seed": seed,
            "limit": self.cfg["data"].get("limit"),
            "max_steps": self.cfg["train"].get("max_steps"),
            "encoder": {"source": self.info.source, "pretrained": self.info.pretrained, "arch": self.info.arch,
                        "img_size": self.img_size, "patch_size": self.info.patch_size,
                        "pool": model.get("pool", "cls"), "last_blocks": model.get("last_blocks", 1)},
            "data": {"description": self.data.description, "notes": self.data.notes, "splits": data_summary},
            "selection": selection,
            "val": results["val"],
            "test": results["test"],
            "seconds": {"total": round(time.perf_counter() - start, 2),
                        "feature_extraction": round(self.features.seconds - feature_seconds, 2)},
            "device": str(self.device),
            "precision": str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "fp32",
        }

    def _write(self, output: Path, summary: Dict[str, Any], test_probs: Tensor, state: Dict[str, Any]) -> None:
        tmp = output / "metrics.json.tmp"
        tmp.write_text(json.dumps(to_jsonable(summary), indent=2))
        os.replace(tmp, output / "metrics.json")
        test = self.data.splits["test"]
        targets = targets_tensor(test)
        preds = self.task.predict(test_probs)
        with open(output / "predictions_test.csv", "w", newline="") as fh:
            out = csv.writer(fh)
            out.writerow(["path", "group", "target", "prediction"] + [f"p_{c}" for c in self.task.class_names])
            for s, t, p, row in zip(test, targets.tolist(), preds.tolist(), test_probs.tolist()):
                out.writerow([str(s.path), s.group or "", t, p] + [f"{v:.9g}" for v in row])  # float32 exactly: ties would change AUROC
        if self.cfg["output"].get("plots", True):
            title = f"{self.dataset_name} {summary['task']} ({self.mode}, test)"
            plot_confusion_matrix(summary["test"]["confusion_matrix"], self.task.class_names,
                                  output / "confusion_matrix.png", title)
            plot_roc_curves(targets.numpy(), test_probs.numpy(), self.task.kind, self.task.class_names,
                            output / "roc_curves.png", title)
        if self.cfg["output"].get("save_model", True) and state:
            name = "model.pt" if "model" in state else "head.pt"
            atomic_save({**state, "kind": self.task.kind, "class_names": list(self.task.class_names),
                         "modality": self.modality.name, "encoder_source": self.info.source,
                         "img_size": self.img_size, "pool": self.cfg["model"].get("pool", "cls"),
                         "last_blocks": int(self.cfg["model"].get("last_blocks", 1)),
                         "mean": list(self.info.mean), "std": list(self.info.std),
                         # what `downstream/cls.py predict` needs to rebuild the model and to refuse a wrong file
                         "task": "classification", "arch": self.info.arch, "patch_size": self.info.patch_size,
                         "num_heads": int(self.encoder.blocks[0].attn.num_heads),
                         "head_type": self.cfg["model"].get("head", "linear"),
                         "hidden_dim": int(self.cfg["model"].get("hidden_dim", 512)),
                         "dropout": float(self.cfg["model"].get("dropout", 0.0))}, output / name)


def _counts(samples: Sequence[LabeledSample], task: ClassificationTask) -> List[int]:
    counts = [0] * task.num_classes
    for s in samples:
        if task.kind == "multilabel":
            for c, v in enumerate(s.label):
                counts[c] += int(v)
        else:
            counts[int(s.label)] += 1
    return counts


def run_classification(cfg: Dict[str, Any], output: "str | os.PathLike") -> Dict[str, Any]:
    """Build the experiment of a merged config and run it once (what ``downstream/cls.py`` does)."""
    return ClassificationExperiment(cfg).run(output)


def evaluate_checkpoint(cfg: Dict[str, Any], checkpoint: "str | os.PathLike",
                        output: "str | os.PathLike") -> Dict[str, Any]:
    """``--eval-only``: score a saved ``model.pt`` / ``head.pt`` on the configured dataset's validation and test
    splits without training, and write the run folder as a training run does (``metrics.json``,
    ``predictions_test.csv``, plots; the checkpoint itself is not copied).

    Raises:
        WrongCheckpointError: not a classification checkpoint, or one for other classes or another modality.
    """
    from ...inference.checkpoints import WrongCheckpointError  # noqa: PLC0415
    from .predict import load_classifier  # noqa: PLC0415

    start = time.perf_counter()
    exp = ClassificationExperiment(cfg)
    classifier = load_classifier(checkpoint, exp.device)
    if classifier.modality != exp.modality.name:
        raise WrongCheckpointError(f"{checkpoint}: trained on {classifier.modality} images, but the dataset is read "
                                   f"as {exp.modality.name}; pass --modality {classifier.modality}")
    if tuple(classifier.task.class_names) != tuple(exp.task.class_names) or classifier.task.kind != exp.task.kind:
        raise WrongCheckpointError(f"{checkpoint}: a {classifier.task.kind} classifier of classes "
                                   f"{list(classifier.task.class_names)}, but {exp.dataset_name} has "
                                   f"{exp.task.kind} classes {list(exp.task.class_names)}")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    write_run_config(cfg, output)
    batch = int(cfg["data"].get("batch_size", 64))
    n_bootstrap = int(cfg["eval"].get("bootstrap", 1000))
    confidence = float(cfg["eval"].get("confidence", 0.95))
    results, probs = {}, {}
    for split in ("val", "test"):
        samples = exp.data.splits[split]
        images = LabeledImages(samples, exp.modality, classifier.img_size, classifier.mean, classifier.std,
                               cache=False)
        logits, _ = predict_logits(classifier.model, images, batch, exp.device, exp.amp_dtype)
        probs[split] = exp.task.probabilities(logits)
        targets = targets_tensor(samples)
        results[split] = evaluate_split(targets.numpy(), probs[split].numpy(), exp.task.kind, exp.task.class_names,
                                        exp.task.predict(probs[split]).numpy(), n_bootstrap, confidence, exp.seed)
    selection = {"eval_only": str(checkpoint)}
    summary = exp._summary(exp.data.splits["train"], None, exp.seed, selection, results, start, exp.features.seconds)
    exp._write(output, summary, probs["test"], {})
    return summary

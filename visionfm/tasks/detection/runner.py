"""``downstream/det.py``: train an mmdet detector on a modality encoder, keep the best checkpoint on the
validation split, evaluate it on the test split.

Outputs in ``--output``: ``config.yaml`` (the merged config), ``mmdet_config.py`` (the detector as built),
``best.pth`` (``{"model", "step", "val", "classes", "config"}``, written atomically, loadable with
``weights_only=True``), ``metrics.json`` (test metrics; COCO ``map``/``ap50``/``ap75`` and, for od / fovea, the
point distances), ``predictions/*.png`` (green: truth, red: prediction) and TensorBoard logs in ``tensorboard/``.
``last.pth`` holds the training state (model, optimiser, position, RNG), written at every validation and on
SIGTERM/SIGINT: rerunning the same command resumes the run where it stopped.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ...cli import add_common_arguments, resolve_data_root, resolve_device
from ...config import CONFIG_DIR, ConfigError, ConfigMismatchError, build_config, check_resumable, write_run_config
from ...engine.checkpoint import atomic_save, restart_from_checkpoint, safe_load
from ...engine.loading import loader_settings
from ...engine.loop import RunContext, TrainLoop, cosine_schedule
from ...engine.precision import backward_and_step, enable_tf32, precision_for_ops
from ...modalities import get_modality
from ...data.boxes import DetectionRecord

__all__ = ["DEFAULT_CONFIG", "build_parser", "load_records", "build_detector", "compiled_cuda_ops", "run",
           "build_predict_parser", "main"]

log = logging.getLogger("visionfm.det")

DEFAULT_CONFIG = CONFIG_DIR / "det" / "default.yaml"
#: The training state written at every validation and on SIGTERM/SIGINT; a rerun into the same folder resumes it.
RESUME_NAME = "last.pth"
RESUME_FORMAT = "visionfm-det-train-1"
SELECT_METRICS = ("map", "ap50", "ap75", "within_1_8_dd")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="downstream/det.py",
        description="Train an mmdet detector (RetinaNet / FCOS / Faster R-CNN) on a VisionFM encoder; pick the best "
                    "checkpoint on a validation split; report COCO mAP/AP50/AP75 (and point distances) on the test split. "
                    "'downstream/det.py predict --help' detects on a folder of new images.")
    parser.add_argument("--dataset", default=None, help="IDRiD or coco (default from the config: IDRiD)")
    parser.add_argument("--target", default=None, choices=["od", "fovea", "lesions"], help="IDRiD target")
    parser.add_argument("--modality", default=None, help="encoder modality (default cfp)")
    parser.add_argument("--weights", default=None, metavar="PATH", help="encoder weights (default weights/<modality>_*)")
    parser.add_argument("--random-init", action="store_true", default=None,
                        help="randomly initialised encoder of the same architecture (baseline)")
    parser.add_argument("--detector", default=None, help="configs/det/<name>.py or an mmdet config path")
    add_common_arguments(parser, default_output="runs/det")
    return parser


# ------------------------------------------------------------------------------------------------------ data
def _resolve(data_root: Path, value: Optional[str]) -> Optional[Path]:
    if value is None:
        return None
    path = Path(value)
    return path if path.is_absolute() else data_root / path


def _carve_fraction(records: List[DetectionRecord], fractions: Sequence[float]) -> List[List[DetectionRecord]]:
    """Split records by a fixed shuffle into parts of the given fractions, the rest last."""
    order = list(range(len(records)))
    random.Random(0).shuffle(order)
    parts, start = [], 0
    for frac in fractions:
        count = max(1, round(frac * len(records)))
        parts.append([records[i] for i in sorted(order[start:start + count])])
        start += count
    rest = [records[i] for i in sorted(order[start:])]
    if not rest:
        raise ValueError(f"{len(records)} images are too few to carve fractions {list(fractions)} and keep training images")
    return parts + [rest]


def load_records(cfg: Dict[str, Any], data_root: Path, limit: Optional[int]
                 ) -> Tuple[Dict[str, List[DetectionRecord]], Tuple[str, ...]]:
    """The train / val / test records and the class names for the configured dataset."""
    ds = cfg["dataset"]
    name = str(ds["name"]).lower()
    if name == "idrid":
        from ...data.datasets.idrid_det import load_idrid_detection  # noqa: PLC0415

        splits, classes = {}, None
        for split in ("train", "val", "test"):
            splits[split], classes = load_idrid_detection(
                data_root, ds["target"], split, source=ds["source"], val_count=int(ds["val_count"]),
                loc_test_count=int(ds["loc_test_count"]), loc_val_count=int(ds["loc_val_count"]), limit=limit,
                merge_gap=float(ds["lesion_merge_gap"]), min_size=float(ds["lesion_min_size"]),
                box_size=float(ds["point_box_size"]), disc_diameter=float(ds["disc_diameter"]))
        return splits, classes
    if name == "coco":
        from ...data.datasets.coco import load_coco  # noqa: PLC0415

        c = ds["coco"]
        if not c.get("train_ann") or not c.get("train_images"):
            raise ConfigError("--dataset coco needs --set dataset.coco.train_ann=FILE --set dataset.coco.train_images=DIR")
        train, classes = load_coco(_resolve(data_root, c["train_ann"]), _resolve(data_root, c["train_images"]))
        given = {}
        for split in ("val", "test"):
            if c.get(f"{split}_ann"):
                given[split], _ = load_coco(_resolve(data_root, c[f"{split}_ann"]),
                                            _resolve(data_root, c.get(f"{split}_images") or c["train_images"]),
                                            limit=limit, classes=classes)
        missing = [s for s in ("val", "test") if s not in given]
        if missing:
            parts = _carve_fraction(train, [float(c[f"{s}_fraction"]) for s in missing])
            given.update(dict(zip(missing, parts[:-1])))
            train = parts[-1]
            log.info("coco: carved %s from the training images (fixed shuffle)", " and ".join(missing))
        splits = {"train": train[:limit], "val": given["val"][:limit], "test": given["test"][:limit]}
        return splits, classes
    raise ConfigError(f"unknown dataset {ds['name']!r}; choose IDRiD or coco")


# ----------------------------------------------------------------------------------------------------- model
def _detector_config_path(value: str) -> Path:
    path = Path(value)
    if path.suffix == ".py" and path.is_file():
        return path
    named = CONFIG_DIR / "det" / f"{value}.py"
    if named.is_file():
        return named
    available = sorted(p.stem for p in (CONFIG_DIR / "det").glob("*.py"))
    raise ConfigError(f"detector {value!r}: neither an mmdet config file nor one of configs/det/: {', '.join(available)}")


def build_detector(cfg: Dict[str, Any], classes: Sequence[str], img_size: int):
    """Build the mmdet detector of ``cfg['model']`` for ``classes``.

    Returns ``(detector, encoder info, mmengine Config)``.
    """
    from mmdet.registry import MODELS  # noqa: PLC0415
    from mmdet.utils import register_all_modules  # noqa: PLC0415
    from mmengine.config import Config  # noqa: PLC0415
    from mmengine.logging import MMLogger  # noqa: PLC0415
    from mmengine.registry import DefaultScope  # noqa: PLC0415

    from ...weights.loader import WeightsNotFoundError, load_encoder, resolve_weights  # noqa: PLC0415
    from . import models  # noqa: F401,PLC0415 - registers VisionFMViT and SimpleFeaturePyramid

    register_all_modules(init_default_scope=False)
    # mmengine logs one message per parameter in init_weights and a table per COCO evaluation through its
    # "current" logger; our own log reports what matters, so its logger only passes warnings.
    MMLogger.get_instance("visionfm-det", log_level="WARNING")
    mc = cfg["model"]
    modality = get_modality(mc["modality"]).name
    arch = mc.get("arch")
    if mc.get("random_init") and not arch:  # the baseline copies the architecture of the pretrained weights
        try:
            arch = load_encoder(modality, weights=mc.get("weights") or resolve_weights(modality))[1].arch
        except WeightsNotFoundError:
            arch = None  # no weights to compare with: load_encoder's default architecture
    # Load once here for the width, depth and normalisation the detector must be built with.
    encoder, info = load_encoder(modality, weights=mc.get("weights"), arch=arch, img_size=img_size,
                                 random_init=bool(mc.get("random_init")))
    depth = len(encoder.blocks)
    del encoder
    out_indices = []
    for i in mc["out_indices"]:
        j = int(i) + depth if int(i) < 0 else int(i)
        if not 0 <= j < depth:
            raise ConfigError(f"model.out_indices: {i} is not a block of the {depth}-block {info.arch} encoder")
        out_indices.append(j)

    mm = Config.fromfile(str(_detector_config_path(str(mc["detector"]))))
    if mc.get("mmdet"):
        mm.merge_from_dict(dict(mc["mmdet"]))
    model = mm.model
    if model.backbone.get("type") != "VisionFMViT":
        raise ConfigError(f"{mc['detector']}: the detector's backbone must be type='VisionFMViT' (a VisionFM encoder), "
                          f"got {model.backbone.get('type')!r}")
    model.backbone.update(modality=modality, weights=info.source, arch=info.arch, img_size=img_size,
                          random_init=bool(mc.get("random_init")), out_indices=tuple(out_indices),
                          drop_path_rate=float(mc["drop_path_rate"]), frozen=bool(mc["frozen"]))
    if model.get("neck") and model.neck.get("type") == "SimpleFeaturePyramid":
        model.neck.update(in_channels=info.embed_dim, patch_size=info.patch_size)
        # the neck's image path (stem_channels) takes the input image from the backbone, in front of its maps
        model.backbone.with_input = int(model.neck.get("stem_channels", 0)) > 0
    heads = [h for h in (model.get("bbox_head"), (model.get("roi_head") or {}).get("bbox_head")) if h is not None]
    if not heads:
        raise ConfigError("the mmdet config has neither model.bbox_head nor model.roi_head.bbox_head")
    for head in heads:
        head.num_classes = len(classes)
    model.data_preprocessor.update(mean=[255.0 * v for v in info.mean], std=[255.0 * v for v in info.std],
                                   bgr_to_rgb=False)
    test_cfg = model.test_cfg
    (test_cfg.rcnn if "rcnn" in test_cfg else test_cfg).score_thr = float(cfg["eval"]["score_thr"])
    with DefaultScope.overwrite_default_scope("mmdet"):  # nested builds (losses, anchors, assigners) look in mmdet
        detector = MODELS.build(model)
    detector.init_weights()  # heads and neck; the backbone keeps the loaded encoder (VisionFMViT.init_weights)
    return detector, info, mm


def _param_groups(model: torch.nn.Module, lr: float, backbone_mult: float, weight_decay: float) -> List[dict]:
    groups: Dict[Tuple[bool, bool], List[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_backbone = name.startswith("backbone.")
        no_decay = param.ndim <= 1 or name.endswith((".pos_embed", ".cls_token"))
        groups.setdefault((is_backbone, no_decay), []).append(param)
    return [dict(params=params, lr=lr * (backbone_mult if bb else 1.0), base_lr=lr * (backbone_mult if bb else 1.0),
                 weight_decay=0.0 if nd else weight_decay) for (bb, nd), params in groups.items()]


def _save_resume_state(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                       scaler: Optional["torch.amp.GradScaler"], cfg: Dict[str, Any], limit: Optional[int], step: int,
                       best: Dict[str, Any], seconds: float) -> None:
    """Everything the loop needs to continue after ``step`` as if it had not stopped (atomic write)."""
    atomic_save({"format": RESUME_FORMAT, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scaler": scaler.state_dict() if scaler is not None else None, "step": int(step), "best": best,
                 "rng_torch": torch.get_rng_state(), "train_seconds": float(seconds), "limit": limit,
                 "config": cfg}, path)


def _resume(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            scaler: Optional["torch.amp.GradScaler"], cfg: Dict[str, Any], limit: Optional[int]
            ) -> Tuple[int, Dict[str, Any], float]:
    """Restore :func:`_save_resume_state`'s state; returns ``(step, best record, training seconds so far)``."""
    ckpt = safe_load(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != RESUME_FORMAT:
        raise ConfigError(f"{path}: not a VisionFM detection training state; move it away or use a new --output")
    if ckpt.get("limit") != limit:
        raise ConfigMismatchError(f"{path} was written with --limit {ckpt.get('limit')}, not {limit}: use a new "
                                  f"--output for a new run")
    changes = check_resumable(ckpt.get("config") or {}, cfg, path, bool(cfg["train"].get("resume_with_changes")))
    if changes:
        log.warning("resuming under a changed config: %s", changes)
    restart_from_checkpoint(ckpt, model=model, optimizer=optimizer)
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    torch.set_rng_state(ckpt["rng_torch"])
    log.info("resuming %s after step %d (best validation so far: step %s)", path, ckpt["step"], ckpt["best"]["step"])
    return int(ckpt["step"]), dict(ckpt["best"]), float(ckpt.get("train_seconds", 0.0))


def _json_ready(value: Any) -> Any:
    """NaN (e.g. the AP of a class absent from a split) becomes ``null``: strict JSON has no NaN."""
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def _write_json(data: Dict[str, Any], path: Path) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_json_ready(data), indent=2, allow_nan=False))
    os.replace(tmp, path)


def compiled_cuda_ops(model: torch.nn.Module) -> List[str]:
    """The dtype-limited mmcv CUDA kernels (:data:`visionfm.engine.precision.CUDA_OP_DTYPES`) that training
    ``model`` calls: ``sigmoid_focal_loss`` for a sigmoid :class:`mmdet.models.losses.FocalLoss` (RetinaNet and FCOS
    classification heads), which mmdet sends to mmcv's kernel whenever the prediction is on a GPU."""
    from mmdet.models.losses import FocalLoss  # noqa: PLC0415

    ops = set()
    for module in model.modules():
        if isinstance(module, FocalLoss) and getattr(module, "use_sigmoid", False):
            ops.add("sigmoid_focal_loss")
    return sorted(ops)


# ---------------------------------------------------------------------------------------------------- run
def run(cfg: Dict[str, Any], output: Path, data_root: Path, limit: Optional[int] = None) -> Dict[str, Any]:
    """Train, select on validation, test. Returns (and writes) the metrics."""
    from mmengine.dataset import pseudo_collate  # noqa: PLC0415

    from .dataset import DetectionDataset, StepBatchSampler  # noqa: PLC0415
    from .evaluation import draw_predictions, evaluate  # noqa: PLC0415

    t_start = time.time()
    tc, oc, ec, dc = cfg["train"], cfg["optim"], cfg["eval"], cfg["data"]
    device = resolve_device(tc.get("device"))
    ctx = RunContext.start(device, output)  # rank 0 creates the run folder and alone writes into it
    if ctx.is_main:
        write_run_config(cfg, output)
    select = str(ec["select"])
    if select not in SELECT_METRICS:
        raise ConfigError(f"eval.select must be one of {', '.join(SELECT_METRICS)}, got {select!r}")
    seed = int(tc["seed"])
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    enable_tf32(device)  # two-stage detectors and evaluation run in fp32

    splits, classes = load_records(cfg, data_root, limit)
    if select == "within_1_8_dd" and splits["val"][0].point is None:
        raise ConfigError("eval.select=within_1_8_dd needs a point target (IDRiD od or fovea)")
    channels = get_modality(cfg["model"]["modality"]).channels
    max_size = int(dc["max_size"])
    crop_size = None if dc.get("crop_size") is None else int(dc["crop_size"])
    datasets = {s: DetectionDataset(recs, classes, channels, max_size, train=(s == "train"), hflip=float(dc["hflip"]),
                                    color_jitter=float(dc["color_jitter"]), cache=bool(dc["cache"]), seed=seed,
                                    crop_size=crop_size, crop_on_box=float(dc.get("crop_on_box", 0.5)),
                                    min_visible=float(dc.get("crop_min_visible", 0.5)))
                for s, recs in splits.items()}
    for s, ds in datasets.items():
        log.info("%s: %d images, boxes per class %s", s, len(ds), dict(zip(classes, ds.class_counts())))

    # the position embedding is resized once to the training input (other sizes are interpolated on the fly)
    model, info, mm = build_detector(cfg, classes, img_size=min(max_size, crop_size or max_size) // 16 * 16)
    try:
        amp_dtype, needs_scaler, narrowed = precision_for_ops(tc["precision"], device, compiled_cuda_ops(model))
    except ValueError as err:
        raise ConfigError(f"train.precision: {err}") from None
    if narrowed:
        log.info("training precision: %s", narrowed)
    scaler = torch.amp.GradScaler(device.type) if needs_scaler else None  # fp16 (older GPUs, focal-loss heads)
    if amp_dtype is not None and getattr(model, "with_rpn", False):
        # mmcv's nms (run on the RPN proposals during training) accepts only fp32 boxes and scores.
        if str(tc["precision"]).lower() != "auto":
            raise ConfigError(f"train.precision={tc['precision']} does not work with two-stage detectors (mmcv's nms "
                              f"on the RPN proposals needs fp32); use train.precision=fp32 or auto")
        log.info("two-stage detector: training in fp32 (mmcv's nms on RPN proposals needs fp32)")
        amp_dtype, scaler = None, None
    if ctx.is_main:
        mm.dump(str(output / "mmdet_config.py"))
    model.to(device)
    log.info("encoder: %s %s from %s; training precision %s", info.modality, info.arch,
             info.source or "random initialisation", amp_dtype or "fp32")

    # --max-steps stops the run early on the full recipe's schedule, so that rerunning without it resumes the
    # same run rather than a differently scheduled one.
    total = planned = int(oc["steps"])
    if tc.get("max_steps") is not None:
        total = min(total, int(tc["max_steps"]))
    if total < 1:
        raise ConfigError(f"nothing to train: {total} steps")
    optimizer = torch.optim.AdamW(_param_groups(model, float(oc["lr"]), float(oc["backbone_lr_mult"]),
                                                float(oc["weight_decay"])), lr=float(oc["lr"]))
    # Under torchrun every rank takes its slice of a global batch of batch_size per rank (at most the training set).
    global_batch = min(int(oc["batch_size"]) * ctx.world_size, len(datasets["train"]))
    if global_batch < ctx.world_size:
        raise ConfigError(f"{len(datasets['train'])} training images cannot give each of {ctx.world_size} processes "
                          "an image per step")
    writer = ctx.writer()
    best_path, resume_path = output / "best.pth", output / RESUME_NAME
    best: Dict[str, Any] = {"score": -math.inf, "step": None, "val": None}
    warmup = min(int(oc["warmup_steps"]), max(0, planned - 1))
    schedule = cosine_schedule(1.0, float(oc["min_lr_ratio"]), planned, warmup)
    # Evaluation runs in fp32 whatever the training precision: bf16 scores (8-bit mantissa) tie in the ranking
    # that AP and the top-box point depend on, and evaluation is a small part of the time.
    eval_kw = dict(batch_size=int(ec["batch_size"]), amp_dtype=None, classwise=bool(ec["classwise"]))

    step, seconds_before = 0, 0.0
    if resume_path.is_file():
        step, best, seconds_before = _resume(resume_path, model, optimizer, scaler, cfg, limit)
    start = step
    # Batches are a function of the step number (StepBatchSampler); the loader's own generator keeps its worker
    # seed from drawing on the global RNG, which the model's drop-path uses and a resumed run restores.
    loader = iter(torch.utils.data.DataLoader(
        datasets["train"], batch_sampler=StepBatchSampler(len(datasets["train"]), global_batch, seed, step, total,
                                                          ctx.part(global_batch)),
        collate_fn=pseudo_collate, generator=torch.Generator().manual_seed(seed),
        **loader_settings({"num_workers": tc.get("num_workers", "auto")}, device, ctx.world_size)))
    # Gradients averaged across ranks (mmdet's losses are means over each rank's images). Some encoder parameters
    # (the final norm, blocks above the last out index) take no part in the loss: DDP must look for them.
    net = ctx.wrap(model, find_unused_parameters=True)
    loop = TrainLoop(ctx, total, "det train", writer, items_per_step=global_batch, log_every=int(tc["log_every"]),
                     val_every=max(1, int(tc["eval_every"])),
                     hint="lower optim.lr or check the boxes of the training images")

    def train_step(index: int) -> Dict[str, Any]:
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * float(schedule[index])
        data = model.data_preprocessor(next(loader), training=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            losses = net(**data, mode="loss")
        loss, log_vars = model.parse_losses(losses)
        if torch.isfinite(loss):  # a NaN is reported by the loop before anything is saved
            backward_and_step(loss, optimizer, scaler, model.parameters(), oc.get("clip_grad"))
        else:
            log.error("non-finite loss %s on the images %s", dict(log_vars), [s.img_path for s in data["data_samples"]])
        return {**{k: float(torch.as_tensor(v).detach()) for k, v in log_vars.items()},
                "lr": optimizer.param_groups[0]["lr"]}

    def validate(done: int) -> None:
        # mmdet's COCO metric needs every prediction in one place: rank 0 scores the validation split and the
        # others take its decision.
        nonlocal best
        val = None
        if ctx.is_main:
            val, _ = evaluate(model, datasets["val"], **eval_kw)
            for key, value in val.items():
                writer.add_scalar(f"val/{key}", float(value), done)
            log.info("step %d validation: %s", done, ", ".join(f"{k} {v:.4g}" for k, v in val.items()))
        val = ctx.broadcast(val)
        score = float(val[select])
        if score >= best["score"] or best["step"] is None:  # ties go to the later, longer-trained checkpoint
            best = {"score": score, "step": done, "val": val}
            if ctx.is_main:
                atomic_save({"model": model.state_dict(), "step": done, "val": val, "classes": list(classes),
                             "config": cfg}, best_path)
                log.info("step %d: best validation %s %.4g, saved %s", done, select, score, best_path)

    def save(done: int) -> None:
        if ctx.is_main:
            _save_resume_state(resume_path, model, optimizer, scaler, cfg, limit, done, best,
                               seconds_before + time.perf_counter() - t_train)

    t_train = time.perf_counter()
    try:
        loop.run(train_step, validate, save, start)
    finally:
        if not ctx.is_main:
            writer.close()
    train_time = seconds_before + loop.seconds
    best_step, best_val = best["step"], best["val"]
    if not ctx.is_main:  # the test evaluation and its files: rank 0 alone
        return ctx.broadcast(None)

    state = safe_load(best_path)
    model.load_state_dict(state["model"], strict=True)
    test, predictions = evaluate(model, datasets["test"], **eval_kw)
    for key, value in test.items():
        writer.add_scalar(f"test/{key}", float(value), best_step)
    writer.close()
    point_target = datasets["test"].point_truth() is not None
    for i in range(min(int(ec["pngs"]), len(datasets["test"]))):
        name = Path(datasets["test"].records[i].name).stem
        draw_predictions(datasets["test"], i, predictions[i], output / "predictions" / f"{name}.png",
                         float(ec["draw_score_thr"]), always_top=point_target)
    metrics: Dict[str, Any] = dict(test)
    metrics.update({
        "split": "test", "dataset": cfg["dataset"]["name"],
        "target": cfg["dataset"]["target"] if str(cfg["dataset"]["name"]).lower() == "idrid" else None,
        "classes": list(classes), "detector": cfg["model"]["detector"],
        "encoder": {"modality": info.modality, "arch": info.arch, "source": info.source,
                    "pretrained": info.pretrained},
        "images": {s: len(d) for s, d in datasets.items()},
        "best_step": best_step, "steps": total, "select": select, "val": best_val,
        "train_time_s": round(train_time, 1), "wall_time_s": round(time.time() - t_start, 1),
    })
    _write_json(metrics, output / "metrics.json")
    log.info("test: %s", ", ".join(f"{k} {v:.4g}" for k, v in test.items()))
    return ctx.broadcast(metrics)


def build_predict_parser() -> argparse.ArgumentParser:
    """``downstream/det.py predict``: boxes for a folder of new images with a trained ``best.pth``."""
    from ...cli import output_folder, positive_int  # noqa: PLC0415
    from ...inference.embed_cli import add_input_arguments  # noqa: PLC0415

    parser = argparse.ArgumentParser(
        prog="downstream/det.py predict",
        description="Detect with a trained best.pth on every image of a folder (or CSV): <output>/boxes.csv (path, "
                    "class, score, x1 y1 x2 y2 at the image's own resolution), boxes.json (per image) and <name>.png "
                    "with the boxes drawn. Images are resized as in training (data.max_size of the checkpoint).")
    parser.add_argument("--checkpoint", required=True, metavar="PATH", help="a best.pth written by downstream/det.py")
    parser.add_argument("--output", default="runs/det_predict", metavar="DIR", type=output_folder,
                        help="folder for boxes.csv, boxes.json and the PNGs")
    parser.add_argument("--score-thr", type=float, default=None,
                        help="keep and draw boxes with at least this score (default: the checkpoint's "
                             "eval.draw_score_thr; the top box is always kept for the optic disc and the fovea)")
    parser.add_argument("--batch-size", type=positive_int, default=2, help="images per forward pass")
    add_input_arguments(parser)
    return parser


def _predict(argv: List[str]) -> int:
    args = build_predict_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from .predict import predict_folder  # noqa: PLC0415

    summary = predict_folder(args.checkpoint, args.images, args.output, resolve_device(args.device), args.limit,
                             args.skip_corrupt, args.recursive, args.score_thr, args.batch_size)
    print(json.dumps(summary))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["predict"]:
        return _predict(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    flags = {"dataset.name": args.dataset, "dataset.target": args.target, "model.modality": args.modality,
             "model.weights": args.weights, "model.random_init": args.random_init, "model.detector": args.detector,
             "train.device": args.device, "train.seed": args.seed, "train.max_steps": args.max_steps}
    cfg = build_config(DEFAULT_CONFIG, args.config, flags, args.overrides)
    run(cfg, Path(args.output), resolve_data_root(args.data_root), args.limit)
    return 0

"""``downstream/det.py``: train an mmdet detector on a modality encoder, keep the best checkpoint on the
validation split, evaluate it on the test split.

Outputs in ``--output``: ``config.yaml`` (the merged config), ``mmdet_config.py`` (the detector as built),
``best.pth`` (``{"model", "step", "val", "classes", "config"}``, written atomically, loadable with
``weights_only=True``), ``metrics.json`` (test metrics; COCO ``map``/``ap50``/``ap75`` and, for od / fovea, the
point distances), ``predictions/*.png`` (green: truth, red: prediction) and TensorBoard logs in ``tensorboard/``.
``last.pth`` holds the training state (model, optimiser, position, RNG), written every
``train.checkpoint_every_steps`` steps, at every validation and on SIGTERM/SIGINT: rerunning the same command
resumes the run where it stopped, with the weights an uninterrupted run would have (also after a SIGKILL).

The command line is :mod:`.cli`; the config layout is ``configs/det/default.yaml``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ...cli import resolve_device
from ...config import CONFIG_DIR, ConfigError, ConfigMismatchError, check_resumable, load_yaml, write_run_config
from ...data.boxes import DetectionRecord
from ...engine.checkpoint import atomic_save, restart_from_checkpoint, safe_load
from ...engine.distributed import load_on_every_rank
from ...engine.loading import loader_settings
from ...engine.loop import RunContext, TrainLoop, cosine_schedule
from ...engine.precision import backward_and_step, enable_tf32, precision_for_ops
from ...modalities import get_modality
from .cli import DEFAULT_CONFIG, LEGACY_KEYS

__all__ = ["DEFAULT_CONFIG", "load_records", "build_detector", "param_groups", "compiled_cuda_ops", "train", "main"]

log = logging.getLogger("visionfm.det")

#: The training state written at every validation and on SIGTERM/SIGINT; a rerun into the same folder resumes it.
RESUME_NAME = "last.pth"
RESUME_FORMAT = "visionfm-det-train-2"
SELECT_METRICS = ("map", "ap50", "ap75", "within_1_8_dd")


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


def load_records(cfg: Dict[str, Any], data_root: Path
                 ) -> Tuple[Dict[str, List[DetectionRecord]], Tuple[str, ...]]:
    """The train / val / test records and the class names for the configured dataset (``dataset``, ``target`` and
    the dataset's options in ``data``; at most ``data.limit`` images of each split)."""
    ds = cfg["data"]
    limit = None if ds.get("limit") is None else int(ds["limit"])
    name = str(cfg["dataset"]).lower()
    if name == "idrid":
        from ...data.datasets.idrid_det import load_idrid_detection  # noqa: PLC0415

        splits, classes = {}, None
        for split in ("train", "val", "test"):
            splits[split], classes = load_idrid_detection(
                data_root, cfg["target"], split, source=ds["source"], val_count=int(ds["val_count"]),
                loc_test_count=int(ds["loc_test_count"]), loc_val_count=int(ds["loc_val_count"]), limit=limit,
                merge_gap=float(ds["lesion_merge_gap"]), min_size=float(ds["lesion_min_size"]),
                box_size=float(ds["point_box_size"]), disc_diameter=float(ds["disc_diameter"]))
        return splits, classes
    if name == "coco":
        from ...data.datasets.coco import load_coco  # noqa: PLC0415

        c = ds["coco"]
        if not c.get("train_ann") or not c.get("train_images"):
            raise ConfigError("--dataset coco needs --set data.coco.train_ann=FILE --set data.coco.train_images=DIR")
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
    raise ConfigError(f"unknown dataset {cfg['dataset']!r}; choose IDRiD or coco")


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
    modality = get_modality(cfg["modality"]).name
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


class _DetectorLayers(nn.Module):
    """A detector as timm's layer-wise lr decay counts a ViT classifier's layers (BEiT / MAE, as
    :meth:`visionfm.tasks.classification.finetune.EncoderClassifier.group_matcher`): the encoder's embeddings are
    layer 0, block ``i`` is layer ``i + 1``, and everything else (the encoder's final norm, the pyramid, the heads)
    is the top layer ``depth + 1`` at the full rate. Used for grouping only."""

    def __init__(self, detector: nn.Module, depth: int) -> None:
        super().__init__()
        self.detector = detector
        self.depth = depth

    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        encoder = r"^detector\.backbone\.encoder\."
        return {"stem": encoder + r"(?:cls_token|reg_token|pos_embed|patch_embed|norm_pre)",
                "blocks": [(encoder + r"blocks\.(\d+)\.", None), (r"^detector\.", (self.depth,))]}


def param_groups(model: nn.Module, lr: float, backbone_mult: float, weight_decay: float,
                 layer_decay: float = 1.0) -> List[dict]:
    """AdamW parameter groups of a detector: timm's ``param_groups_layer_decay`` over :class:`_DetectorLayers`
    (the pyramid and heads at ``lr``; encoder block ``i`` of ``depth`` at ``lr * layer_decay ** (depth - i)``, the
    embeddings one step below block 0), with every backbone parameter's rate further times ``backbone_mult``.
    No weight decay on 1-D parameters, position embeddings and class tokens. With ``layer_decay`` 1 this is one
    rate for the backbone and one for the rest, as before layer decay existed (the same floats).

    Each group carries ``lr`` = ``base_lr`` = ``lr * lr_scale``; the schedule multiplies ``base_lr``.
    """
    from timm.optim import param_groups_layer_decay  # noqa: PLC0415

    backbone = getattr(model, "backbone", None)
    encoder = getattr(backbone, "encoder", None)
    depth = len(encoder.blocks) if encoder is not None and hasattr(encoder, "blocks") else 0
    in_backbone = {id(p) for p in backbone.parameters()} if backbone is not None else set()
    groups = []
    for group in param_groups_layer_decay(_DetectorLayers(model, depth), weight_decay=weight_decay,
                                          no_weight_decay_list=("*.pos_embed", "*.cls_token"),
                                          layer_decay=layer_decay):
        for is_backbone in (True, False):
            params = [p for p in group["params"] if (id(p) in in_backbone) == is_backbone]
            if params:
                scale = group["lr_scale"] * backbone_mult if is_backbone else group["lr_scale"]
                groups.append(dict(params=params, lr=lr * scale, base_lr=lr * scale, lr_scale=scale,
                                   weight_decay=group["weight_decay"]))
    return groups


def _rng_state(device: torch.device) -> Dict[str, Any]:
    """Every random stream training may draw on (drop-path, mmdet's samplers), as plain objects."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [name, np.asarray(keys).tolist(), int(pos), int(has_gauss),
                                                      float(cached)], "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: Dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    random.setstate(tuple(tuple(v) if isinstance(v, list) else v for v in state["python"]))
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def _save_resume_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                       scaler: Optional["torch.amp.GradScaler"], cfg: Dict[str, Any], step: int, best: Dict[str, Any],
                       seconds: float, device: torch.device) -> None:
    """Everything the loop needs to continue after ``step`` as if it had not stopped (atomic write)."""
    atomic_save({"format": RESUME_FORMAT, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scaler": scaler.state_dict() if scaler is not None else None, "step": int(step), "best": best,
                 "rng": _rng_state(device), "train_seconds": float(seconds), "config": cfg}, path)


def _resume(ckpt: Any, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
            scaler: Optional["torch.amp.GradScaler"], cfg: Dict[str, Any], device: torch.device
            ) -> Tuple[int, Dict[str, Any], float]:
    """Restore :func:`_save_resume_state`'s state; returns ``(step, best record, training seconds so far)``."""
    if not isinstance(ckpt, dict) or ckpt.get("format") != RESUME_FORMAT:
        earlier = isinstance(ckpt, dict) and str(ckpt.get("format", "")).startswith("visionfm-det-train-")
        raise ConfigError(f"{path}: not a detection training state of this version"
                          f"{' (written before the config keys were renamed)' if earlier else ''}; move it away or "
                          "use a new --output")
    changes = check_resumable(ckpt.get("config") or {}, cfg, path, bool(cfg["train"].get("resume_with_changes")))
    if changes:
        log.warning("resuming under a changed config: %s", changes)
    restart_from_checkpoint(ckpt, model=model, optimizer=optimizer)
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    _set_rng_state(ckpt["rng"], device)
    log.info("resuming %s after step %d (best validation so far: step %s)", path, ckpt["step"], ckpt["best"]["step"])
    return int(ckpt["step"]), dict(ckpt["best"]), float(ckpt.get("train_seconds", 0.0))


def _refuse_earlier_layout(output: Path) -> None:
    """A run folder of a version before the key rename cannot be continued: say so, rather than listing every
    moved key as a difference of settings."""
    path = output / "config.yaml"
    if not path.is_file():
        return
    try:
        earlier = load_yaml(path)
    except ConfigError:
        return  # write_run_config names the broken file
    if isinstance(earlier.get("dataset"), dict) or "modality" in (earlier.get("model") or {}):
        raise ConfigMismatchError(f"{output} holds a detection run of an earlier version (its config.yaml has "
                                  f"{len(LEGACY_KEYS)} keys renamed since, such as dataset.name and "
                                  "model.modality); it cannot be resumed. Use a new --output")


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
def train(cfg: Dict[str, Any], output: Path, data_root: Path) -> Dict[str, Any]:
    """Train, select on validation, test. Returns (and writes) the metrics.

    Args:
        cfg: The merged config (``configs/det/default.yaml`` layout, :func:`.cli.config_from_args`).
        output: The run folder (rank 0 writes it).
        data_root: Where the datasets are.
    """
    from mmengine.dataset import pseudo_collate  # noqa: PLC0415

    from .dataset import DetectionDataset, StepBatchSampler  # noqa: PLC0415
    from .evaluation import draw_predictions, evaluate  # noqa: PLC0415

    t_start = time.time()
    tc, oc, ec, dc = cfg["train"], cfg["optim"], cfg["eval"], cfg["data"]
    device = resolve_device(tc.get("device"))
    ctx = RunContext.start(device, output)  # rank 0 creates the run folder and alone writes into it
    if ctx.is_main:
        _refuse_earlier_layout(output)
        write_run_config(cfg, output)
    select = str(ec["select"])
    if select not in SELECT_METRICS:
        raise ConfigError(f"eval.select must be one of {', '.join(SELECT_METRICS)}, got {select!r}")
    seed = int(tc["seed"])
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    enable_tf32(device)  # two-stage detectors and evaluation run in fp32

    splits, classes = load_records(cfg, data_root)
    if select == "within_1_8_dd" and splits["val"][0].point is None:
        raise ConfigError("eval.select=within_1_8_dd needs a point target (IDRiD od or fovea)")
    channels = get_modality(cfg["modality"]).channels
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
    layer_decay = float(oc.get("layer_decay", 1.0))
    if not 0.0 < layer_decay <= 1.0:
        raise ConfigError(f"optim.layer_decay must be in (0, 1], got {layer_decay}")
    optimizer = torch.optim.AdamW(param_groups(model, float(oc["lr"]), float(oc["backbone_lr_mult"]),
                                               float(oc["weight_decay"]), layer_decay), lr=float(oc["lr"]))
    if layer_decay != 1.0 and not cfg["model"].get("frozen"):
        scales = sorted({round(g["lr_scale"], 6) for g in optimizer.param_groups})
        log.info("layer-wise lr decay %g: lr x %s (heads x 1, backbone x %g x decay ** depth)", layer_decay,
                 ", ".join(f"{v:g}" for v in scales), float(oc["backbone_lr_mult"]))
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
    # rank 0's state on every rank, also where only rank 0's disk holds it
    state = load_on_every_rank(resume_path, safe_load)
    if state is not None:
        step, best, seconds_before = _resume(state, resume_path, model, optimizer, scaler, cfg, device)
    del state
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
                     val_every=max(1, int(tc["eval_every"])), save_every=int(tc.get("checkpoint_every_steps") or 0),
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
                "lr": float(oc["lr"]) * float(schedule[index])}  # the heads' rate

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
            _save_resume_state(resume_path, model, optimizer, scaler, cfg, done, best,
                               seconds_before + time.perf_counter() - t_train, device)

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
        "split": "test", "dataset": cfg["dataset"],
        "target": cfg["target"] if str(cfg["dataset"]).lower() == "idrid" else None,
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


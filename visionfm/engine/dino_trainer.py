"""DINO and iBOT pretraining: data, multi-crop augmentation, student/teacher steps, schedules, the resume state and
export. The steps run on :class:`~visionfm.engine.loop.TrainLoop`, which owns the progress bar, TensorBoard, the
NaN/inf guard, stop requests (SIGTERM/SIGINT, ``train.max_seconds``) and the atomic checkpoints every
``train.checkpoint_every_steps`` steps, at the end and on a stop."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from ..errors import NonFiniteLossError
from ..config import check_resumable, write_run_config
from ..data.augment import MultiCropAugmentation
from ..data.synthetic import SyntheticImages
from ..data.unlabeled import SharedCache, UnlabeledImages, list_images, parse_size
from ..modalities import AugmentationRecipe, Modality, get_modality
from ..models.vit import create_encoder, set_fused_attention
from ..objectives.dino import DINOLoss, DINOModel, DINOSchedules, collapse_monitors
from ..objectives.ibot import IBOTLoss, IBOTModel, MaskConfig, sample_masks
from ..weights.export import save_encoder, update_index
from .checkpoint import atomic_save, restart_from_checkpoint, safe_load
from .distributed import DistInfo, barrier, init_distributed, load_on_every_rank
from .loading import loader_settings
from .loop import RunContext, TrainLoop
from .precision import autocast, enable_tf32, resolve_precision
from .threads import ThreadChooser, fastest_cpu_threads

__all__ = ["OBJECTIVES", "NonFiniteLossError", "DINOTrainer", "param_groups", "make_adamw", "fastest_cpu_threads",
           "step_seed", "check_world_size", "loader_settings"]

log = logging.getLogger("visionfm.dino")
CHECKPOINT_NAME = "checkpoint.pt"
#: Objectives of ``pretrain/dino.py`` (MAE has its own command, ``pretrain/mae.py``).
OBJECTIVES = ("dino", "ibot")


def check_objective(cfg: Dict[str, Any]) -> str:
    """The config's ``objective`` (``dino`` or ``ibot``), checked before anything is built or written.

    Raises:
        ValueError: an unknown objective, or iBOT mask settings out of range.
    """
    objective = str(cfg.get("objective") or "dino").lower()
    if objective not in OBJECTIVES:
        hint = " (MAE has its own command: pretrain/mae.py)" if objective == "mae" else ""
        raise ValueError(f"unknown objective {cfg.get('objective')!r}: choose one of {', '.join(OBJECTIVES)}{hint}")
    if objective == "ibot":
        mask_config(cfg)
    return objective


def augmented_modality(modality: Modality, overrides: Optional[Dict[str, Any]]) -> Modality:
    """``modality`` with the config's ``augment`` settings (the non-null ones) in place of its own recipe.

    Why: invariances the crops teach are features the encoder drops. A recipe that blurs and recolours every crop
    teaches invariance to haze and colour, which in a fundus photograph are signs of disease (cataract, exudates).
    """
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    known = {f.name for f in dataclasses.fields(AugmentationRecipe)} - {"hflip", "vflip", "fov_crops", "square_crop"}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ValueError(f"unknown augment setting(s) {unknown}; known: {sorted(known)}")
    if not given:
        return modality
    return dataclasses.replace(modality, augment=dataclasses.replace(modality.augment, **given))


def check_crop_sizes(cfg: Dict[str, Any]) -> Tuple[int, int]:
    """The ``(height, width)`` images are cached at (``data.load_size``: a side, ``[height, width]``, or null for
    1.15 x the global crop), checked against the crop sizes.

    Raises:
        ValueError: a crop larger than the cached image (it would only be upsampled), or a scale range outside
            (0, 1].
    """
    crops = cfg["crops"]
    load = cfg["data"].get("load_size") or int(round(int(crops["global_size"]) * 1.15))
    height, width = parse_size(load)
    for name in ("global", "local"):
        if f"{name}_size" not in crops:  # MAE has global-size views only
            continue
        size = int(crops[f"{name}_size"])
        if size > min(height, width):
            raise ValueError(f"crops.{name}_size {size} is larger than the cached image (data.load_size {height}x"
                             f"{width}): crops would only be upsampled; raise data.load_size or lower the crop size")
        lo, hi = (float(v) for v in crops[f"{name}_scale"])
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"crops.{name}_scale must be a range [low, high] with 0 < low <= high <= 1, got "
                             f"{crops[f'{name}_scale']}")
    return height, width


def mask_config(cfg: Dict[str, Any]) -> MaskConfig:
    """The ``ibot`` section's masking settings (validated)."""
    ibot = cfg.get("ibot") or {}
    ratio = ibot.get("mask_ratio", [0.1, 0.5])
    if not isinstance(ratio, (list, tuple)) or len(ratio) != 2:
        raise ValueError(f"ibot.mask_ratio must be a range [low, high], got {ratio!r}")
    return MaskConfig(probability=float(ibot.get("mask_probability", 0.5)), ratio=(float(ratio[0]), float(ratio[1])),
                      min_block=int(ibot.get("min_block", 4)))


def init_encoder_from(encoder: torch.nn.Module, path: "str | Path", modality: str, arch: str,
                      img_size: int) -> Dict[str, Any]:
    """Copy an exported encoder's weights into ``encoder`` (``model.init_from``: continued pretraining, for
    example of a shipped 112-px encoder at a higher resolution, or on new data).

    The file is read by :func:`visionfm.load_encoder` (safetensors, or a checkpoint it can map, loaded safely,
    every key accounted for), its position embedding resized to ``img_size``, then loaded strictly.

    Returns:
        What the export records about the starting point: path, SHA-256, steps, objective, data, image size.

    Raises:
        FileNotFoundError: no such file.
        ValueError: another architecture or patch size, or keys that do not map exactly (the message names the file).
    """
    from ..weights.export import sha256_file
    from ..weights.loader import load_encoder

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model.init_from: no encoder file at {path}")
    source, info = load_encoder(modality, path, arch=arch, img_size=img_size)
    source_patch = source.patch_embed.patch_size[0]
    target_patch = encoder.patch_embed.patch_size[0]
    if source_patch != target_patch:
        raise ValueError(f"model.init_from: {path} has {source_patch}-px patches, the run's encoder "
                         f"{target_patch}-px (model.patch_size)")
    try:
        encoder.load_state_dict(source.state_dict(), strict=True)  # names every missing, unexpected or resized key
    except RuntimeError as err:
        raise ValueError(f"model.init_from: {path} does not load into the run's {arch} encoder: {err}") from None
    meta = info.metadata or {}
    return {"path": str(path), "sha256": sha256_file(path), "steps": meta.get("steps"),
            "objective": meta.get("objective"), "data": meta.get("data"), "img_size": meta.get("img_size")}


def param_groups(model: torch.nn.Module) -> List[Dict[str, Any]]:
    """Two groups as in DINO: weights with decay; biases, norm parameters (1-D tensors) and iBOT's mask token
    without."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") or name.endswith("mask_token") else decay).append(p)
    return [{"params": decay, "apply_wd": True}, {"params": no_decay, "apply_wd": False, "weight_decay": 0.0}]


def make_adamw(groups: List[Dict[str, Any]], betas: Tuple[float, float] = (0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW with the fused kernel (one pass over each tensor for the whole update, on CUDA and, since torch 2.4,
    on the CPU: about 4x faster than ``foreach`` on the ~20M-parameter DINO head), ``foreach`` where the fused
    kernel is not available. ``betas``: torch's default for DINO, ``(0.9, 0.95)`` for MAE."""
    try:
        return torch.optim.AdamW(groups, lr=0.0, betas=betas, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, lr=0.0, betas=betas, foreach=True)


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of one step's randomness (crops, flips, colour, drop-path): a function of the run's seed, the
    global step and the rank only, so a resumed run repeats exactly what an uninterrupted run does."""
    return ((seed * 1_000_003 + step) * 1_009 + rank) % (2 ** 63)


def _tensors(obj: Any) -> List[Tensor]:
    """The tensors in a (nested) tuple/list/dict, or ``obj`` itself."""
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _tensors(item)]
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in _tensors(item)]
    return []


def check_world_size(ckpt: Dict[str, Any], world_size: int, global_batch: int, path: "str | Path") -> Optional[str]:
    """Whether a checkpoint written by ``ckpt["world_size"]`` processes can be resumed by ``world_size``.

    The step counters and schedules (lr, weight decay, momentum, one entry per step) are laid out for the global
    batch ``batch_size x world_size``. At the same global batch another number of processes sees the very same
    batches (:class:`~visionfm.engine.sampler.EpochBatchSampler` cuts the same global batches) and the run goes on
    as before; at another global batch the saved step would index schedules of another length, so it is refused.
    Checkpoints from before the world size was recorded are not checked.

    Returns:
        A note for the log when the number of processes changed at the same global batch, else ``None``.

    Raises:
        ValueError: the global batch differs from the checkpoint's.
    """
    saved_world, saved_batch = ckpt.get("world_size"), ckpt.get("global_batch")
    if saved_world is None or (int(saved_world) == world_size and saved_batch in (None, global_batch)):
        return None
    if saved_batch is not None and int(saved_batch) == global_batch:
        return (f"resuming with {world_size} process(es) where the checkpoint had {saved_world}, at the same global "
                f"batch {global_batch}: the same batches and schedules")
    per_rank = int(saved_batch) // world_size if saved_batch is not None else None
    hint = (f"--batch-size {per_rank} keeps it with {world_size} process(es)" if per_rank and
            per_rank * world_size == int(saved_batch) else f"run with {saved_world} process(es)")
    raise ValueError(f"{path}: written by {saved_world} process(es) with global batch {saved_batch}; this run has "
                     f"{world_size} with global batch {global_batch}, so the saved step counters would index "
                     f"schedules laid out for another number of steps per epoch. Resume at the same global batch "
                     f"({hint}) or start in a new --output")


class DINOTrainer:
    """Runs one DINO pretraining from a merged config (see ``configs/pretrain/default.yaml``).

    Args:
        cfg: The merged config dict.
        output: Run folder (checkpoint, config.yaml, TensorBoard events, encoder.safetensors).
    """

    def __init__(self, cfg: Dict[str, Any], output: "str | Path") -> None:
        self.cfg = cfg
        self.output = Path(output)
        self.objective = self._check_objective(cfg)
        cfg["objective"] = self.objective
        self.modality = get_modality(cfg["modality"])
        cfg["modality"] = self.modality.name
        train = cfg["train"]
        from ..cli import resolve_device

        self.device = resolve_device(train.get("device"))
        self.dist: DistInfo = init_distributed(self.device)
        self.is_main = self.dist.rank == 0
        self.seed = int(train["seed"])
        self.amp_dtype, use_scaler = resolve_precision(train.get("precision", "auto"), self.device)
        # On a CPU shared with other busy jobs, fewer threads than cores avoid OpenMP threads stalling at every
        # op's barrier while a sibling is descheduled (see fastest_cpu_threads); auto is timed again every epoch.
        self.threads = ThreadChooser(train.get("threads"), self.device, self.amp_dtype)
        self.threads.apply()
        self.scaler = torch.amp.GradScaler(self.device.type) if use_scaler else None
        enable_tf32(self.device)  # what autocast leaves in fp32 (the loss, the EMA, an fp32 run)
        self._side_stream: Optional["torch.cuda.Stream"] = None  # see on_side_stream
        # The data position of the next step (train() sets it from the checkpoint; _run_step advances it).
        self.epoch = 0
        self.step_in_epoch = 0
        self._batches: Optional[Any] = None  # the current epoch's loader iterator
        self._wait = {"steps": 0, "wait": 0.0, "busy": 0.0, "max_fraction": 0.0}
        # Where the encoder started (model.init_from): set on a fresh run, restored from the checkpoint on a resume.
        self.init_record: Optional[Dict[str, Any]] = None

    # ----------------------------------------------------------------------------------------- setup
    def _check_objective(self, cfg: Dict[str, Any]) -> str:
        """Check the objective's settings before anything is built; returns the objective's name (a hook for
        trainers of other objectives, e.g. :class:`visionfm.engine.mae_trainer.MAETrainer`)."""
        return check_objective(cfg)

    def _build_augmentation(self) -> torch.nn.Module:
        """The batched augmentation on the training device: DINO's multi-crop (global and local views)."""
        crops = self.cfg["crops"]
        return MultiCropAugmentation(augmented_modality(self.modality, self.cfg.get("augment")), crops["global_size"],
                                     crops["local_size"], crops["local_number"], crops["global_scale"],
                                     crops["local_scale"]).to(self.device)

    def _build_data(self) -> None:
        cfg, data = self.cfg, self.cfg["data"]
        self.load_size = check_crop_sizes(cfg)
        if data.get("source"):
            files = list_images(data["source"], limit=data.get("limit"))
            shared = None
            if self.dist.world_size > 1:  # one decoded copy per machine, not one per rank
                folder = Path(data["cache_dir"]) if data.get("cache_dir") else SharedCache.default_folder()
                shared = SharedCache(folder, leader=self.dist.local_rank == 0, wait=barrier)
            self.dataset = UnlabeledImages(files, self.modality, self.load_size,
                                           skip_corrupt=bool(data.get("skip_corrupt")),
                                           cache=bool(data.get("cache", True)),
                                           min_side=int(self.cfg["model"]["patch_size"]), shared_cache=shared)
        else:
            count = data.get("synthetic_count", 64)
            if data.get("limit"):
                count = min(count, int(data["limit"]))
            side = min(self.load_size)  # the procedural images are square
            self.dataset = SyntheticImages(self.modality, count=count, size=side, seed=self.seed)
        self.data_description = self.cfg["export"].get("data_description") or self.dataset.describe()
        self.sampler = self._make_sampler()
        self.loader = DataLoader(self.dataset, batch_sampler=self.sampler,
                                 **loader_settings(data, self.device, self.dist.world_size))
        self.augment = self._build_augmentation()

    def _make_sampler(self):
        from .sampler import EpochBatchSampler

        return EpochBatchSampler(len(self.dataset), int(self.cfg["optim"]["batch_size"]), self.seed,
                                 self.dist.rank, self.dist.world_size)

    def _build_model(self, steps_per_epoch: Optional[int] = None) -> None:
        """Encoder, student/teacher, loss, optimiser and schedules. ``steps_per_epoch`` defaults to the data
        sampler's (given explicitly, the model can be built without data, as the benchmarks do)."""
        cfg = self.cfg
        torch.manual_seed(self.seed)
        encoder = create_encoder(cfg["model"]["arch"], cfg["model"]["patch_size"], cfg["crops"]["global_size"],
                                 drop_path_rate=cfg["model"].get("drop_path_rate", 0.0))
        self.embed_dim = encoder.embed_dim
        set_fused_attention(encoder, self._fused_attention())
        if cfg["model"].get("grad_checkpointing"):
            # Recompute block activations in the backward pass (student only: the teacher runs without grad):
            # about a third more compute for far less activation memory, for large models on GPUs.
            encoder.set_grad_checkpointing(True)
        head = cfg["head"]
        dino = cfg["dino"]
        if self.objective == "ibot":
            ibot = cfg.get("ibot") or {}
            self.mask_config = mask_config(cfg)
            self.model = IBOTModel(encoder, encoder.embed_dim, head["out_dim"], head["hidden_dim"],
                                   head["bottleneck_dim"], head["norm_last_layer"], head["freeze_last_layer_epochs"],
                                   shared_head=bool(ibot.get("shared_head", True)),
                                   patch_out_dim=int(ibot.get("patch_out_dim") or head["out_dim"])).to(self.device)
            self.loss_fn = IBOTLoss(head["out_dim"], self.model.patch_out_dim, student_temp=dino["student_temp"],
                                    center_momentum=dino["center_momentum"],
                                    cls_weight=float(ibot.get("cls_weight", 1.0)),
                                    patch_weight=float(ibot.get("patch_weight", 1.0)),
                                    koleo_weight=float(ibot.get("koleo_weight", 0.0))).to(self.device)
        else:
            self.model = DINOModel(encoder, encoder.embed_dim, head["out_dim"], head["hidden_dim"],
                                   head["bottleneck_dim"], head["norm_last_layer"],
                                   head["freeze_last_layer_epochs"]).to(self.device)
            self.loss_fn = DINOLoss(head["out_dim"], student_temp=dino["student_temp"],
                                    center_momentum=dino["center_momentum"]).to(self.device)
        self.student: torch.nn.Module = self.model.student
        if self.dist.enabled:
            self.student = DistributedDataParallel(self.model.student,
                                                   device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.optimizer = make_adamw(param_groups(self.model.student))
        optim = cfg["optim"]
        self.epochs = int(optim["epochs"])
        self.steps_per_epoch = int(steps_per_epoch) if steps_per_epoch else self.sampler.steps_per_epoch
        self.global_batch = int(optim["batch_size"]) * self.dist.world_size
        self.schedules = DINOSchedules.build(optim, dino, self.epochs, self.steps_per_epoch, self.global_batch)

    def _encoders(self) -> List[torch.nn.Module]:
        """The ViT encoders ``model.init_from`` initialises: the student's and the teacher's backbones."""
        return [self.model.student.backbone, self.model.teacher.backbone]

    def _initialise_encoder(self) -> None:
        """Start a fresh run from ``model.init_from`` (if set): every encoder of :meth:`_encoders` gets its weights."""
        source = self.cfg["model"].get("init_from")
        if not source:
            return
        encoders = self._encoders()
        self.init_record = init_encoder_from(encoders[0], source, self.modality.name, self.cfg["model"]["arch"],
                                             int(self.cfg["crops"]["global_size"]))
        for other in encoders[1:]:
            other.load_state_dict(encoders[0].state_dict(), strict=True)
        if self.is_main:
            log.info("encoder initialised from %s (%s steps of %s on: %s)", source, self.init_record["steps"],
                     self.init_record["objective"], self.init_record["data"])

    def _fused_attention(self) -> bool:
        """``model.attention``: ``sdpa`` (fused ``F.scaled_dot_product_attention``), ``explicit``
        (``softmax(q k^T) v`` as two matmuls) or ``auto``: fused on GPUs, explicit on the CPU, where it measured
        faster for ViT sequence lengths (see :func:`visionfm.models.vit.set_fused_attention`)."""
        choice = str(self.cfg["model"].get("attention", "auto")).lower()
        if choice not in ("auto", "sdpa", "explicit"):
            raise ValueError(f"model.attention must be auto, sdpa or explicit, got {choice!r}")
        return choice == "sdpa" or (choice == "auto" and self.device.type != "cpu")

    # ----------------------------------------------------------------------------------------- state
    def state_dict(self, epoch: int, step_in_epoch: int, global_step: int) -> Dict[str, Any]:
        return {
            "student": self.model.student.state_dict(),
            "teacher": self.model.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "dino_loss": self.loss_fn.state_dict(),
            "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": global_step,
            "rng_torch": torch.get_rng_state(),
            "config": self.cfg,
        }

    def save_checkpoint(self, epoch: int, step_in_epoch: int, global_step: int) -> None:
        """Write the resume state atomically (rank 0). The loop calls it only after it found every loss since the
        last save finite, so a checkpoint never holds weights updated from a NaN loss. No barrier: the other ranks
        read nothing of it and meet rank 0 in the next step's gradient all-reduce."""
        if self.is_main:
            state = self.state_dict(epoch, step_in_epoch, global_step)
            state.update(world_size=self.dist.world_size, global_batch=self.global_batch, init_from=self.init_record)
            atomic_save(state, self.output / CHECKPOINT_NAME)

    def _load_checkpoint(self) -> Optional[Dict[str, Any]]:
        """The run folder's checkpoint (``None`` when there is none), on every rank, also where only rank 0's disk
        holds it, checked against this run's number of processes (see :func:`check_world_size`)."""
        path = self.output / CHECKPOINT_NAME
        # Loaded to the CPU: load_state_dict copies into the tensors on the device, and an object broadcast from
        # rank 0 must not carry rank 0's GPU in its tensors.
        ckpt = load_on_every_rank(path, lambda p: safe_load(p, map_location="cpu"))
        if ckpt is not None:
            self.init_record = ckpt.get("init_from")
            note = check_world_size(ckpt, self.dist.world_size, self.global_batch, path)
            if note and self.is_main:
                log.warning("%s", note)
        return ckpt

    def _maybe_resume(self) -> Dict[str, int]:
        position = {"epoch": 0, "step_in_epoch": 0, "global_step": 0}
        path = self.output / CHECKPOINT_NAME
        ckpt = self._load_checkpoint()
        if ckpt is None:
            return position
        changes = check_resumable(ckpt.get("config") or {}, self.cfg, path,
                                  bool(self.cfg["train"].get("resume_with_changes")))
        if changes:
            log.warning("resuming under a changed config: %s", changes)
        restart_from_checkpoint(ckpt, position, student=self.model.student,
                                teacher=self.model.teacher, optimizer=self.optimizer, dino_loss=self.loss_fn)
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.is_main:
            log.info("resuming from %s at epoch %d, step %d (global step %d)", path, position["epoch"],
                     position["step_in_epoch"], position["global_step"])
        return position

    # ----------------------------------------------------------------------------------------- loop
    def train_step(self, images: torch.Tensor, global_step: int, epoch: int) -> Dict[str, float]:
        """One optimiser step on a batch of ``uint8`` images: multi-crop augmentation, then
        :meth:`train_step_views`."""
        torch.manual_seed(step_seed(self.seed, global_step, self.dist.rank))
        start = time.perf_counter()
        global_views, local_views = self.on_side_stream(lambda: self.augment(images.to(self.device, non_blocking=True)))
        augment_s = time.perf_counter() - start  # on a GPU: the launch time (the kernels run asynchronously)
        stats = self.train_step_views(global_views, local_views, global_step, epoch)
        stats["augment_s"] = augment_s
        return stats

    def on_side_stream(self, work: Callable[[], Any]) -> Any:
        """``work()`` (the batch's copy to the GPU and its augmentation) on a CUDA stream of its own; its tensors
        are handed to the training stream, which waits for them. Elsewhere: ``work()``.

        Why: kornia synchronises with the host inside the augmentation (``linalg.solve``/``inv`` for the crop
        warps, value checks in colour jitter and blur). On the training stream each such wait would last until the
        previous step's kernels had finished, leaving the GPU idle while the host prepares the next batch; on a
        side stream it waits for the augmentation's own kernels only, so the next batch is prepared while the
        previous step still runs.
        """
        if self.device.type != "cuda":
            return work()
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(self.device)
        main = torch.cuda.current_stream(self.device)
        self._side_stream.wait_stream(main)  # buffers freed by the previous step may be reused here
        with torch.cuda.stream(self._side_stream):
            out = work()
        main.wait_stream(self._side_stream)
        for tensor in _tensors(out):
            tensor.record_stream(main)  # the allocator must not reuse them before the training stream is done
        return out

    def train_step_views(self, global_views: List[torch.Tensor], local_views: List[torch.Tensor], global_step: int,
                         epoch: int) -> Dict[str, float]:
        """One optimiser step on augmented crops: student forward on all crops, teacher forward on the global
        crops, DINO loss, backward, gradient clipping, optimiser step and the teacher's EMA update."""
        s = self.schedules
        for group in self.optimizer.param_groups:
            group["lr"] = float(s.lr[global_step])
            if group["apply_wd"]:
                group["weight_decay"] = float(s.weight_decay[global_step])
        teacher_temp = float(s.teacher_temp[global_step])
        extra: Dict[str, Tensor] = {}
        if self.objective == "ibot":
            loss, teacher_out, extra = self._ibot_loss(global_views, local_views, global_step, teacher_temp)
        else:
            with autocast(self.device, self.amp_dtype):
                with torch.no_grad():
                    teacher_out = self.model.teacher(global_views, stack=True)
                student_out = self.student(global_views + local_views, stack=True)
            # (views, batch, K) outputs straight from the head; the loss computes in fp32
            loss = self.loss_fn(teacher_out, student_out, teacher_temp=teacher_temp)
        # The loss stays on the device: TrainLoop(lazy=True) checks it is finite without a host synchronisation
        # and reads it at logging steps (where it is a float) and before checkpoints.
        log_now = self._is_log_step(global_step)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        clip = self.cfg["optim"].get("clip_grad")
        grad_norm = None
        if clip:
            grads = [p.grad for p in self.model.student.parameters() if p.grad is not None]
            grad_norm = torch.nn.utils.get_total_norm(grads, foreach=True)
            if self.scaler is None and self.optimizer.defaults.get("fused"):
                # The fused AdamW kernel divides each gradient by `grad_scale` as it reads it (the hook GradScaler
                # uses), so clipping costs no extra pass over all gradients (same result as clip_grad_norm_).
                self.optimizer.grad_scale = ((grad_norm + 1e-6) / clip).clamp(min=1.0).to(torch.float32)
            else:
                torch.nn.utils.clip_grads_with_norm_(grads, clip, grad_norm, foreach=True)
        self.model.cancel_last_layer_gradients(epoch)
        try:
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
        finally:
            self.optimizer.grad_scale = None
        self.model.update_teacher(float(s.momentum[global_step]))
        stats: Dict[str, Any] = {"loss": loss.detach(), "lr": float(s.lr[global_step]),
                                 "weight_decay": float(s.weight_decay[global_step]),
                                 "momentum": float(s.momentum[global_step]), "teacher_temp": teacher_temp}
        if grad_norm is not None:
            stats["grad_norm"] = grad_norm
        stats.update({k: v.detach() if isinstance(v, Tensor) else v for k, v in extra.items()})
        if log_now:
            center = self.loss_fn.cls_loss.center if self.objective == "ibot" else self.loss_fn.center
            stats.update(collapse_monitors(teacher_out, center, teacher_temp))
        return self._host_stats(stats, log_now)

    # ----------------------------------------------------------------------------------------- host syncs
    def _is_log_step(self, global_step: int) -> bool:
        """Steps whose loss and monitors are read on the host (``train.log_every``; 0 or null: none but the
        checks before checkpoints). Reading a GPU value makes the host wait for the step to finish, which leaves
        the GPU idle while the next batch is prepared, so the other steps read nothing."""
        every = self.cfg["train"].get("log_every", 10)
        return bool(every) and global_step % int(every) == 0

    @staticmethod
    def _host_stats(stats: Dict[str, Any], log_now: bool) -> Dict[str, Any]:
        """Tensors of ``stats`` as floats on logging steps; on the others they stay tensors (on the device, no
        synchronisation) and the loop does not log them."""
        if not log_now:
            return stats
        return {k: float(v) if isinstance(v, Tensor) else v for k, v in stats.items()}

    def _ibot_loss(self, global_views: List[Tensor], local_views: List[Tensor], global_step: int,
                   teacher_temp: float):
        """iBOT's forward passes and loss: block masks for the student's global views (a function of the step's
        seed), teacher on the unmasked global views, student on the masked global and the local views."""
        patch = int(self.cfg["model"]["patch_size"])
        height, width = global_views[0].shape[-2:]
        masks = sample_masks(len(global_views) * global_views[0].shape[0], (height // patch, width // patch),
                             self.mask_config, step_seed(self.seed, global_step, self.dist.rank))
        masks = masks.to(self.device, non_blocking=True)
        temp = (self.cfg.get("ibot") or {}).get("teacher_temp")
        with autocast(self.device, self.amp_dtype):
            with torch.no_grad():
                teacher = self.model.teacher(global_views, (), masks=None, patch_positions=masks)
            student = self.student(global_views, local_views, masks=masks)
        loss, terms = self.loss_fn(teacher, student, masks, teacher_temp,
                                   patch_teacher_temp=None if temp is None else float(temp))
        terms["masked_fraction"] = masks.float().mean()
        return loss, teacher.cls, terms

    def _set_train_mode(self) -> None:
        """Training mode for the student; the teacher stays in evaluation mode."""
        self.model.train()
        self.model.teacher.eval()

    def train(self) -> Dict[str, Any]:
        """Run (or resume) the whole pretraining on :class:`~visionfm.engine.loop.TrainLoop` and export the teacher
        backbone. Returns a summary."""
        if self.is_main:
            self.output.mkdir(parents=True, exist_ok=True)
        self._build_data()
        self._build_model()
        position = self._maybe_resume()
        if position["global_step"] == 0:
            self._initialise_encoder()
        if self.is_main:
            write_run_config(self.cfg, self.output)
            log.info("modality %s | data: %s | %s, %d steps/epoch x %d epochs, global batch %d, %s on %s",
                     self.modality.name, self.data_description, self.cfg["model"]["arch"], self.steps_per_epoch,
                     self.epochs, self.global_batch, str(self.amp_dtype or "fp32").replace("torch.", ""), self.device)
        train = self.cfg["train"]
        max_steps = train.get("max_steps")
        total_steps = len(self.schedules) if not max_steps else min(len(self.schedules), int(max_steps))
        self.epoch, self.step_in_epoch, self._batches = position["epoch"], position["step_in_epoch"], None
        self._wait = {"steps": 0, "wait": 0.0, "busy": 0.0, "max_fraction": 0.0}
        ctx = RunContext(self.device, self.dist, self.output)
        writer = ctx.writer()  # <output>/tensorboard on rank 0
        # Checkpoints every train.checkpoint_every_steps steps, after the last step and on a stop request (a
        # signal, or train.max_seconds: a wall-clock budget for this invocation, e.g. a lent GPU's minutes, after
        # which the run checkpoints and exports like --max-steps and a rerun continues the schedule).
        loop = TrainLoop(ctx, total_steps, f"{self.objective} pretraining", writer, items_per_step=self.global_batch,
                         save_every=int(train.get("checkpoint_every_steps") or 0),
                         hint="try a lower --lr, a longer warm-up, or --set train.precision=fp32",
                         lazy=True, max_seconds=train.get("max_seconds"), items="images")
        start = position["global_step"]
        start_time = time.perf_counter()
        try:
            self._set_train_mode()
            global_step = loop.run(self._run_step, None,
                                   lambda done: self.save_checkpoint(self.epoch, self.step_in_epoch, done), start=start)
        finally:
            self._batches = None
            self.threads.restore()  # a later run in this process starts from the count found before this one
            writer.close()
        summary = {"global_step": global_step, "epoch": self.epoch, "final_loss": loop.last.get("loss"),
                   "steps_this_run": global_step - start, "seconds_this_run": round(time.perf_counter() - start_time, 2),
                   "data": self.data_description}
        if self._wait["steps"] > 1:
            summary["data_wait_fraction"] = round(self._wait["wait"] / max(self._wait["busy"], 1e-9), 4)
            summary["data_wait_fraction_max"] = round(self._wait["max_fraction"], 4)
        if self.is_main:
            self.export(global_step)
        return summary

    def _run_step(self, global_step: int) -> Dict[str, Any]:
        """The loop's step: the epoch's next batch (the sampler starts mid-epoch on a resume), :meth:`train_step`,
        and what the model waited for the data. After an epoch's last batch the position moves to the next epoch
        and ``train.threads: auto`` is timed again."""
        ready = time.perf_counter()
        if self._batches is None:
            self.sampler.set_epoch(self.epoch, self.step_in_epoch)
            self._batches = iter(self.loader)
        images = next(self._batches)
        t0 = time.perf_counter()
        stats = self.train_step(images, global_step, self.epoch)
        t1 = time.perf_counter()
        # What the model waits for: the loader's next batch plus the (synchronous) augmentation.
        wait = (t0 - ready) + stats.pop("augment_s")
        stats["data_wait_s"] = wait
        stats["data_wait_fraction"] = wait / max(t1 - ready, 1e-9)
        stats["images_per_s"] = self.global_batch / max(t1 - t0, 1e-9)  # the step itself, without the loader wait
        self._wait["steps"] += 1
        if self._wait["steps"] > 1:  # the first step of a run includes one-time warm-up
            self._wait["wait"] += wait
            self._wait["busy"] += t1 - ready
            self._wait["max_fraction"] = max(self._wait["max_fraction"], stats["data_wait_fraction"])
        self.step_in_epoch += 1
        if self.step_in_epoch >= self.steps_per_epoch:
            next(self._batches, None)  # the epoch's iterator ends (and shuts its loader workers down)
            self._batches = None
            self.epoch += 1
            self.step_in_epoch = 0
            self.threads.recheck()
        return stats

    # ----------------------------------------------------------------------------------------- export
    def export_metadata(self, global_step: int) -> Dict[str, Any]:
        cfg = self.cfg
        return {"format": "visionfm-encoder/1", "modality": self.modality.name, "arch": cfg["model"]["arch"].split("_patch")[0],
                "patch_size": int(cfg["model"]["patch_size"]), "img_size": int(cfg["crops"]["global_size"]),
                "embed_dim": int(self.embed_dim), "mean": list(self.modality.mean), "std": list(self.modality.std),
                "steps": int(global_step), "objective": self.objective, **self._data_and_origin(),
                "crops": self.crop_scheme(),
                "timm_class": "timm.models.vision_transformer.VisionTransformer"}

    def _data_and_origin(self) -> Dict[str, Any]:
        """The exported ``data`` (everything the encoder saw: this run's images and, after ``model.init_from``,
        the starting encoder's) and ``init_from`` (the starting file, its SHA-256, steps and data)."""
        record = self.init_record
        if not record:
            return {"data": self.data_description}
        name = Path(record["path"]).name
        data = (f"{self.data_description}; continued from {name} ({record.get('steps')} {record.get('objective')} "
                f"steps at {record.get('img_size')} px on: {record.get('data') or 'unrecorded data'})")
        return {"data": data, "init_from": dict(record)}

    def crop_scheme(self) -> Dict[str, Any]:
        """What the encoder's crops were cut from and how (recorded in the exported metadata)."""
        crops = self.cfg["crops"]
        recipe = augmented_modality(self.modality, self.cfg.get("augment")).augment
        scheme = {"cached_size": list(self.load_size), "augment": dataclasses.asdict(recipe), "global_size": int(crops["global_size"]),
                  "global_scale": [float(v) for v in crops["global_scale"]], "local_number": int(crops["local_number"]),
                  "local_size": int(crops["local_size"]), "local_scale": [float(v) for v in crops["local_scale"]]}
        if self.objective == "ibot":
            ibot = self.cfg.get("ibot") or {}
            scheme["ibot"] = {k: ibot.get(k) for k in ("mask_probability", "mask_ratio", "shared_head", "cls_weight",
                                                       "patch_weight", "koleo_weight")}
        return scheme

    def encoder_state_dict(self) -> Dict[str, Tensor]:
        """What is exported: the teacher's backbone (a timm ViT ``state_dict``)."""
        return self.model.teacher.backbone.state_dict()

    def export(self, global_step: int) -> Path:
        """Write the teacher backbone to ``<output>/encoder.safetensors`` (fp32) and, with ``export.to``, to
        ``<dir>/<modality>_<arch>.safetensors`` (fp16) with an index entry."""
        state = self.encoder_state_dict()
        meta = self.export_metadata(global_step)
        path = self.output / "encoder.safetensors"
        save_encoder(state, path, meta)
        log.info("exported the %s encoder to %s", meta.get("objective", "pretrained"), path)
        target_dir = self.cfg["export"].get("to")
        if target_dir:
            name = f"{meta['modality']}_{meta['arch']}.safetensors"
            sha = save_encoder(state, Path(target_dir) / name, {**meta, "dtype": "float16"}, dtype=torch.float16)
            update_index(target_dir, name, {**meta, "dtype": "float16"}, sha)
            log.info("exported fp16 encoder to %s", Path(target_dir) / name)
        return path


def export_only(cfg: Dict[str, Any], output: "str | Path", trainer_cls: "type | None" = None) -> Path:
    """Export the encoder of an existing run folder's checkpoint without training (``--export``); ``trainer_cls``:
    the trainer of the run's objective (default :class:`DINOTrainer`)."""
    trainer = (trainer_cls or DINOTrainer)(cfg, output)
    trainer._build_data()
    trainer._build_model()
    position = trainer._maybe_resume()
    if position["global_step"] == 0:
        raise FileNotFoundError(f"no checkpoint with progress in {output}: nothing to export")
    return trainer.export(position["global_step"])

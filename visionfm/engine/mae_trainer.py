"""Masked-autoencoder (MAE) pretraining: :class:`MAETrainer` runs :mod:`visionfm.objectives.mae` through the DINO
pretraining loop.

Everything but the objective is :class:`~visionfm.engine.dino_trainer.DINOTrainer`'s: the data (folders, CSVs,
named sources, the built-in synthetic set, the resumable epoch sampler), the loop (:class:`~visionfm.engine.loop.TrainLoop`:
progress bar, TensorBoard under ``<output>/tensorboard``, the NaN/inf guard, atomic checkpoints every
``train.checkpoint_every_steps`` steps, at the end and on SIGTERM/SIGINT, automatic resume, ``max_steps``,
``max_seconds``), thread choice, precision and export. This class replaces the augmentation (one MAE view per image), the model and
step, what a checkpoint holds and restores, and what is exported: the encoder alone (timm keys, no decoder, no mask
token), so that :func:`visionfm.load_encoder` loads it exactly like a DINO encoder.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from ..config import check_resumable
from ..data.augment import MAEAugmentation
from ..models.vit import create_encoder, set_fused_attention
from ..objectives.mae import MAELoss, MAEModel, MAESchedules, check_mask_ratio
from .checkpoint import restart_from_checkpoint
from .dino_trainer import (CHECKPOINT_NAME, DINOTrainer, check_crop_sizes, make_adamw,
                           param_groups, step_seed)
from .precision import autocast, backward_and_step

__all__ = ["MAETrainer", "check_mae_config"]

log = logging.getLogger("visionfm.mae")


def check_mae_config(cfg: Dict[str, Any]) -> float:
    """Check an MAE config before anything is built or written; returns the mask ratio.

    Raises:
        ValueError: a config of another objective, a mask ratio outside ``(0, 1)`` (the message names
            ``--mask-ratio`` and ``mae.mask_ratio``), a decoder width its heads do not divide, an input size that is
            not a multiple of the patch size, or crops the cached images cannot give.
    """
    objective = str(cfg.get("objective") or "mae").lower()
    if objective != "mae":
        raise ValueError(f"objective {cfg.get('objective')!r} in an MAE run: pretrain/mae.py trains MAE only "
                         "(configs/pretrain/mae.yaml); DINO and iBOT run with pretrain/dino.py")
    mae = cfg.get("mae") or {}
    try:
        ratio = check_mask_ratio(mae.get("mask_ratio"))
    except ValueError as err:
        raise ValueError(f"--mask-ratio / mae.mask_ratio: {err}") from None
    dim, heads = int(mae["decoder_dim"]), int(mae["decoder_num_heads"])
    if dim <= 0 or heads <= 0 or int(mae["decoder_depth"]) <= 0 or dim % heads:
        raise ValueError(f"mae.decoder_dim ({dim}) must be a positive multiple of mae.decoder_num_heads ({heads}), "
                         f"and mae.decoder_depth ({mae['decoder_depth']}) positive")
    size, patch = int(cfg["crops"]["global_size"]), int(cfg["model"]["patch_size"])
    if size % patch:
        raise ValueError(f"crops.global_size (--img-size) {size} is not a multiple of the patch size {patch}: MAE "
                         "masks whole patches of a fixed grid")
    check_crop_sizes(cfg)
    return ratio


class MAETrainer(DINOTrainer):
    """Runs one MAE pretraining from a merged config (see ``configs/pretrain/mae.yaml``).

    Per step: one random resized crop and flip per image (:class:`~visionfm.data.augment.MAEAugmentation`), a
    fresh random mask per image hiding ``mae.mask_ratio`` of its patches, the encoder on the kept patches, the
    decoder on all positions, the normalised-pixel loss on the masked patches, AdamW (betas ``optim.betas``), with
    the learning rate warmed up and then cosine-annealed per iteration. All randomness of a step (crops, flips,
    masks, drop-path) comes from :func:`~visionfm.engine.dino_trainer.step_seed`, so a resumed run repeats exactly
    what an uninterrupted one does.

    Args:
        cfg: The merged config dict.
        output: Run folder (checkpoint, config.yaml, TensorBoard events, encoder.safetensors).
    """

    # ----------------------------------------------------------------------------------------- setup
    def _check_objective(self, cfg: Dict[str, Any]) -> str:
        self.mask_ratio = check_mae_config(cfg)
        return "mae"

    def _build_augmentation(self) -> torch.nn.Module:
        crops = self.cfg["crops"]
        return MAEAugmentation(self.modality, crops["global_size"], crops["global_scale"]).to(self.device)

    def _build_model(self, steps_per_epoch: Optional[int] = None) -> None:
        """Encoder and decoder, loss, optimiser and schedules. ``steps_per_epoch`` defaults to the data sampler's."""
        cfg, mae, optim = self.cfg, self.cfg["mae"], self.cfg["optim"]
        torch.manual_seed(self.seed)
        encoder = create_encoder(cfg["model"]["arch"], cfg["model"]["patch_size"], cfg["crops"]["global_size"],
                                 drop_path_rate=cfg["model"].get("drop_path_rate", 0.0))
        self.embed_dim = encoder.embed_dim
        self.model = MAEModel(encoder, decoder_dim=int(mae["decoder_dim"]), decoder_depth=int(mae["decoder_depth"]),
                              decoder_num_heads=int(mae["decoder_num_heads"]))
        set_fused_attention(self.model, self._fused_attention())  # encoder and decoder blocks
        if cfg["model"].get("grad_checkpointing"):
            self.model.backbone.set_grad_checkpointing(True)
        self.model.to(self.device)
        self.network: torch.nn.Module = self.model
        if self.dist.enabled:
            self.network = DistributedDataParallel(self.model, device_ids=[self.device.index]
                                                   if self.device.type == "cuda" else None)
        self.loss_fn = MAELoss(norm_pix_loss=bool(mae.get("norm_pix_loss", True)))
        self.trainable: List[Tensor] = [p for p in self.model.parameters() if p.requires_grad]
        betas = tuple(float(b) for b in optim.get("betas", (0.9, 0.95)))
        self.optimizer = make_adamw(param_groups(self.model), betas=betas)
        self.epochs = int(optim["epochs"])
        self.steps_per_epoch = int(steps_per_epoch) if steps_per_epoch else self.sampler.steps_per_epoch
        self.global_batch = int(optim["batch_size"]) * self.dist.world_size
        self.schedules = MAESchedules.build(optim, self.epochs, self.steps_per_epoch, self.global_batch)

    def _encoders(self) -> List[torch.nn.Module]:
        """The ViT encoder ``model.init_from`` initialises (the decoder starts fresh)."""
        return [self.model.encoder]

    # ----------------------------------------------------------------------------------------- state
    def state_dict(self, epoch: int, step_in_epoch: int, global_step: int) -> Dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": global_step,
            "rng_torch": torch.get_rng_state(),
            "config": self.cfg,
        }

    def _maybe_resume(self) -> Dict[str, int]:
        position = {"epoch": 0, "step_in_epoch": 0, "global_step": 0}
        path = self.output / CHECKPOINT_NAME
        ckpt = self._load_checkpoint()
        if ckpt is None:
            return position
        if "model" not in ckpt:
            raise ValueError(f"{path} is not an MAE checkpoint (it holds {', '.join(sorted(ckpt))}): use another "
                             "--output, or pretrain/dino.py to resume a DINO or iBOT run")
        changes = check_resumable(ckpt.get("config") or {}, self.cfg, path,
                                  bool(self.cfg["train"].get("resume_with_changes")))
        if changes:
            log.warning("resuming under a changed config: %s", changes)
        restart_from_checkpoint(ckpt, position, model=self.model, optimizer=self.optimizer)
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.is_main:
            log.info("resuming from %s at epoch %d, step %d (global step %d)", path, position["epoch"],
                     position["step_in_epoch"], position["global_step"])
        return position

    # ----------------------------------------------------------------------------------------- loop
    def _set_train_mode(self) -> None:
        self.model.train()

    def train_step(self, images: Tensor, global_step: int, epoch: int) -> Dict[str, float]:
        """One optimiser step on a batch of ``uint8`` images: crop and flip, mask, reconstruct, normalised-pixel
        loss on the masked patches, backward (optional gradient clipping: ``optim.clip_grad``), AdamW step."""
        torch.manual_seed(step_seed(self.seed, global_step, self.dist.rank))
        start = time.perf_counter()
        def prepare():  # on a side CUDA stream (see DINOTrainer.on_side_stream)
            views = self.augment(images.to(self.device, non_blocking=True))
            return (views, *self.model.random_mask(views.shape[0], self.mask_ratio, device=views.device))

        views, idx_keep, idx_mask = self.on_side_stream(prepare)
        augment_s = time.perf_counter() - start  # on a GPU: the launch time (the kernels run asynchronously)
        lr = float(self.schedules.lr[global_step])
        weight_decay = float(self.schedules.weight_decay[global_step])
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            if group["apply_wd"]:
                group["weight_decay"] = weight_decay
        with autocast(self.device, self.amp_dtype):
            predictions = self.network(views, idx_keep, idx_mask)
        loss = self.loss_fn(predictions, self.model.patch_targets(views, idx_mask))  # in fp32
        # The loss stays on the device: TrainLoop(lazy=True) checks it is finite without a host synchronisation and
        # reads it at logging steps (where it is a float) and before checkpoints.
        log_now = self._is_log_step(global_step)
        grad_norm = backward_and_step(loss, self.optimizer, self.scaler, self.trainable,
                                      self.cfg["optim"].get("clip_grad"), as_tensor=True)
        stats: Dict[str, Any] = {"loss": loss.detach(), "lr": lr, "weight_decay": weight_decay, "augment_s": augment_s}
        if grad_norm is not None:
            stats["grad_norm"] = grad_norm
        return self._host_stats(stats, log_now)

    # ----------------------------------------------------------------------------------------- export
    def encoder_state_dict(self) -> Dict[str, Tensor]:
        """The encoder alone: timm's ``VisionTransformer`` keys, as a DINO export (no decoder, no mask token)."""
        return self.model.encoder.state_dict()

    def crop_scheme(self) -> Dict[str, Any]:
        """One view per image: crop and the modality's flips, no photometric changes (recorded in the metadata)."""
        crops, recipe = self.cfg["crops"], self.modality.augment
        return {"cached_size": list(self.load_size), "global_size": int(crops["global_size"]),
                "global_scale": [float(v) for v in crops["global_scale"]],
                "augment": {"hflip": recipe.hflip, "vflip": recipe.vflip, "fov_crops": recipe.fov_crops,
                            "square_crop": recipe.square_crop, "photometric": False}}

    def export_metadata(self, global_step: int) -> Dict[str, Any]:
        mae = self.cfg["mae"]
        meta = super().export_metadata(global_step)
        meta.update({"objective": "mae", "mask_ratio": self.mask_ratio,
                     "mae": {"mask_ratio": self.mask_ratio, "norm_pix_loss": bool(mae.get("norm_pix_loss", True)),
                             "decoder_dim": int(mae["decoder_dim"]), "decoder_depth": int(mae["decoder_depth"]),
                             "decoder_num_heads": int(mae["decoder_num_heads"])}})
        return meta

"""CLIP alignment training (``python pretrain/clip.py``): image + caption batches, the image-text loss (FLAIR's
label-aware loss or CLIP's InfoNCE) and, with a paired modality, the cross-modal image-image loss.

With a frozen image encoder (the default) each image's features are computed once for ``image.cache_views`` views
(the clean image and random resized crops/flips/colour changes), and with a frozen text encoder each distinct caption
is encoded once; a step then only runs the projections, so a run takes minutes on a CPU. When only the top blocks
are tuned (``image.tune: last_blocks``) the tokens entering them are cached the same way and a step runs those
blocks only; with ``image.cache_views: 0`` or a fully tuned encoder the views are augmented on the fly and the whole
encoder runs every step.

Checkpoints (``checkpoint.pt``: trainable tensors, optimiser, step, config) are written atomically every
``train.checkpoint_every_epochs`` epochs, at the end and on SIGTERM/SIGINT; rerunning the same command resumes. The
randomness of a step is a function of the seed and the step only, so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import random
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from ...errors import NonFiniteLossError
from ...config import write_run_config
from ...data.augment import ViewAugmentation
from ...data.unlabeled import DataError
from ...engine.checkpoint import atomic_save, safe_load
from ...engine.loop import RunContext, TrainLoop, cosine_schedule
from ...engine.precision import autocast, backward_and_step, resolve_precision
from ...modalities import get_modality
from ...models.clip import CLIPModel
from ...models.text import TextEncoder
from ...objectives.contrastive import CLIPLoss, cross_modal_loss
from ...weights.export import sha256_file, update_index
from ...weights.loader import load_encoder
from .data import CaptionedImage, load_pixels, load_source, stratified_limit
from ...data.knowledge import KnowledgeBase

__all__ = ["NonFiniteLossError", "CLIPTrainer", "set_image_trainable", "step_seed", "DME_CLASS_NAMES"]

log = logging.getLogger("visionfm.clip")
CHECKPOINT_NAME = "checkpoint.pt"
#: Zero-shot class names of the OCT_DME validation check (label 0, label 1).
DME_CLASS_NAMES = ("no diabetic macular edema", "diabetic macular edema")


def step_seed(seed: int, step: int, stream: int = 0) -> int:
    """Seed of one step's randomness (batches, views, captions): a function of the run's seed and the step."""
    return ((seed * 1_000_003 + step) * 1_009 + stream) % (2 ** 63)


def set_image_trainable(encoder: nn.Module, tune: str, blocks: int = 1) -> None:
    """``frozen``: nothing trains; ``last_blocks``: the top ``blocks`` transformer blocks and the final norm;
    ``full``: everything."""
    if tune not in ("frozen", "last_blocks", "full"):
        raise ValueError(f"image.tune must be frozen, last_blocks or full, got {tune!r}")
    for p in encoder.parameters():
        p.requires_grad_(tune == "full")
    if tune == "last_blocks":
        depth = len(encoder.blocks)
        if not 1 <= blocks <= depth:
            raise ValueError(f"image.tune_blocks must be between 1 and {depth}, got {blocks}")
        for module in list(encoder.blocks)[-blocks:] + [encoder.norm]:
            for p in module.parameters():
                p.requires_grad_(True)


def _batch_indices(n: int, batch: int, seed: int, step: int, stream: int) -> List[int]:
    """The ``step``-th batch of an endless sequence of shuffled epochs over ``n`` items (a pure function)."""
    per_epoch = max(1, n // batch)
    epoch, k = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(step_seed(seed, epoch, 100 + stream))).tolist()
    return order[k * batch:(k + 1) * batch]


class _Tower:
    """What the trainer keeps per modality: the model, its records, pixels and cached features."""

    def __init__(self, modality: str, model: CLIPModel, encoder_path: Optional[str], records: List[CaptionedImage],
                 val_records: List[CaptionedImage]) -> None:
        self.modality = modality
        self.model = model
        self.encoder_path = encoder_path
        # Hashed when the encoder is loaded: the file may be replaced while training runs, and the exported weights
        # must name the encoder they were trained on.
        self.encoder_sha256 = sha256_file(encoder_path) if encoder_path else None
        self.records = records
        self.val_records = val_records
        self.pixels: Optional[Tensor] = None  # uint8 (N, C, S, S)
        self.features: Optional[Tensor] = None  # (views, N, F) when the image encoder is frozen
        self.tokens: Optional[Tensor] = None  # (views, N, T, D) entering block `tokens_from` when its top blocks train
        self.tokens_from = 0
        self.val_pixels: Optional[Tensor] = None
        self.augment: Optional[ViewAugmentation] = None


class CLIPTrainer:
    """Runs one CLIP alignment from a merged config (see ``configs/clip/default.yaml``).

    Args:
        cfg: The merged config dict.
        output: Run folder (config.yaml, checkpoint.pt, tensorboard/, <modality>_clip.safetensors, metrics.json).
        data_root: Folder holding the datasets.
        text_encoder: An already loaded text encoder to use instead of ``text.encoder`` (tests).
    """

    def __init__(self, cfg: Dict[str, Any], output: "str | Path", data_root: "str | Path",
                 text_encoder: Optional[TextEncoder] = None) -> None:
        from ...cli import resolve_device  # noqa: PLC0415

        self.cfg = cfg
        self.output = Path(output)
        self.data_root = Path(data_root)
        cfg["modality"] = get_modality(cfg["modality"]).name
        if cfg.get("paired_modality"):
            cfg["paired_modality"] = get_modality(cfg["paired_modality"]).name
            if cfg["paired_modality"] == cfg["modality"]:
                raise ValueError("paired_modality must differ from modality")
        self.modalities = [cfg["modality"]] + ([cfg["paired_modality"]] if cfg.get("paired_modality") else [])
        cross = float(cfg["loss"].get("cross_weight", 0)) if len(self.modalities) > 1 else 0.0
        if float(cfg["loss"].get("text_weight", 1.0)) <= 0 and cross <= 0:
            raise ValueError("nothing to train: loss.text_weight is 0 and there is no cross-modal loss "
                             "(it needs paired_modality and loss.cross_weight > 0)")
        self.device = resolve_device(cfg["train"].get("device"))
        self.amp_dtype, use_scaler = resolve_precision(cfg["train"].get("precision", "auto"), self.device)
        self.scaler = torch.amp.GradScaler(self.device.type) if use_scaler else None
        self.seed = int(cfg["train"]["seed"])
        # Under torchrun each rank embeds its share of every global batch; the losses see the gathered global batch.
        self.ctx = RunContext.start(self.device, self.output)
        self._given_text = text_encoder
        self._resumed = False
        self.towers: Dict[str, _Tower] = {}
        self.text_cache: Dict[str, Tensor] = {}

    # ------------------------------------------------------------------------------------------ setup
    def _records(self, modality: str, split: Optional[str], primary: bool) -> List[CaptionedImage]:
        if not split:
            return []
        data = self.cfg["data"]
        sources = data["sources"] if primary or not data.get("paired_sources") else data["paired_sources"]
        if isinstance(sources, str):
            sources = [sources]
        out: List[CaptionedImage] = []
        for source in sources:
            try:
                out += load_source(source, modality, split, self.data_root, self.knowledge, data.get("labels", ["dme"]),
                                   int(data.get("split_seed", 0)))
            except DataError as err:
                if split == data.get("val_split") and split != data["train_split"]:
                    log.info("no validation images from %s: %s", source, err)  # validation is optional
                    continue
                raise
        return out

    def _limited(self, split: Optional[str]) -> List[List[CaptionedImage]]:
        """The records of every modality for ``split`` under ``data.limit``.

        With a paired modality the limit counts pairs, not images of each modality: the primary modality's
        records are first restricted to eyes the other modality also shows, the limit picks among those, and
        the paired modality keeps the images of the chosen eyes (at most ``limit`` of them). Limiting each
        modality separately leaves a quick trial with no pair at all."""
        limit = self.cfg["data"].get("limit")
        records = [self._records(m, split, i == 0) for i, m in enumerate(self.modalities)]
        if len(records) < 2 or not limit:
            return [stratified_limit(r, limit) for r in records]
        primary, paired = records
        shared = {r.pair_key for r in primary if r.pair_key} & {r.pair_key for r in paired if r.pair_key}
        primary = stratified_limit([r for r in primary if r.pair_key in shared] or primary, limit)
        chosen = {r.pair_key for r in primary}
        return [primary, [r for r in paired if r.pair_key in chosen][: int(limit)]]

    def build(self) -> None:
        cfg = self.cfg
        text_cfg, image_cfg, model_cfg = cfg["text"], cfg["image"], cfg["model"]
        self.knowledge = KnowledgeBase.load(text_cfg.get("knowledge"))
        if self._given_text is not None:
            text = self._given_text
            text.set_trainable(not text_cfg.get("freeze", True), int(text_cfg.get("tune_last_layers", 0)))
        else:
            text = TextEncoder.from_pretrained(text_cfg["encoder"], freeze=bool(text_cfg.get("freeze", True)),
                                               tune_last_layers=int(text_cfg.get("tune_last_layers", 0)),
                                               max_length=int(text_cfg.get("max_length", 77)))
        self.text_frozen = text.frozen
        torch.manual_seed(self.seed)
        first: Optional[CLIPModel] = None
        train_records = self._limited(cfg["data"]["train_split"])
        val_records = self._limited(cfg["data"].get("val_split"))
        for i, modality in enumerate(self.modalities):
            weights = image_cfg.get("weights") if i == 0 else image_cfg.get("paired_weights")
            encoder, info = load_encoder(modality, weights=weights, img_size=cfg["data"].get("img_size"))
            set_image_trainable(encoder, image_cfg.get("tune", "frozen"), int(image_cfg.get("tune_blocks", 1)))
            model = CLIPModel(encoder, info, text, int(model_cfg["embed_dim"]), image_cfg.get("pool", "token"),
                              int(model_cfg.get("projection_hidden", 0)), float(model_cfg.get("dropout", 0.0)),
                              float(model_cfg.get("init_temperature", 0.07)), float(model_cfg.get("max_logit_scale", 100)),
                              int(image_cfg.get("blocks", 1)))
            model.knowledge = self.knowledge
            if first is not None:
                model.share_text_tower(first)
            first = first or model
            records, val = train_records[i], val_records[i]
            self.towers[modality] = _Tower(modality, model.to(self.device), info.source, records, val)
            log.info("%s: %d training images (%s), %d validation images, encoder %s (%s, %d px)", modality,
                     len(records), ", ".join(sorted({r.label_key for r in records}))[:200], len(val), info.source,
                     info.arch, info.img_size)
        self.image_frozen = image_cfg.get("tune", "frozen") == "frozen"
        self.net = nn.ModuleDict({m: t.model for m, t in self.towers.items()})
        self.loss_fn = CLIPLoss(cfg["loss"]["text"])
        self.label_ids: Dict[str, int] = {}
        for tower in self.towers.values():
            for r in tower.records:
                self.label_ids.setdefault(r.label_key, len(self.label_ids))
        self._build_pairs()
        self._build_optimizer()

    def _build_pairs(self) -> None:
        """Index pairs ``(i, j, group)`` of images of the same eye in the two modalities."""
        self.pairs: Optional[Tensor] = None
        if len(self.modalities) < 2 or float(self.cfg["loss"].get("cross_weight", 0)) <= 0:
            return
        a, b = (self.towers[m].records for m in self.modalities)
        by_key: Dict[str, List[int]] = {}
        for j, r in enumerate(b):
            if r.pair_key:
                by_key.setdefault(r.pair_key, []).append(j)
        groups: Dict[str, int] = {}
        pairs = [(i, j, groups.setdefault(r.pair_key, len(groups)))
                 for i, r in enumerate(a) if r.pair_key for j in by_key.get(r.pair_key, [])]
        if len(pairs) < 2:
            raise DataError(f"cross-modal loss: only {len(pairs)} image pairs of the same eye between {self.modalities[0]} "
                            f"and {self.modalities[1]}; the sources need patient and eye ids (or set loss.cross_weight=0)")
        self.pairs = torch.tensor(pairs, dtype=torch.long)
        log.info("cross-modal pairs: %d image pairs over %d eyes", len(pairs), len(groups))

    def _build_optimizer(self) -> None:
        optim = self.cfg["optim"]
        lr = float(optim["lr"])
        head_decay, head_plain, encoder_params = [], [], []
        for name, p in self.net.named_parameters():
            if not p.requires_grad:
                continue
            if ".image_encoder." in f".{name}" or ".text_encoder." in f".{name}":
                encoder_params.append(p)
            elif p.ndim <= 1:
                head_plain.append(p)
            else:
                head_decay.append(p)
        wd = float(optim.get("weight_decay", 0.0))
        groups = [{"params": head_decay, "weight_decay": wd, "lr_scale": 1.0},
                  {"params": head_plain, "weight_decay": 0.0, "lr_scale": 1.0}]
        if encoder_params:
            groups.append({"params": encoder_params, "weight_decay": wd,
                           "lr_scale": float(optim.get("encoder_lr_scale", 0.1))})
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)
        if any(len(t.records) < 2 for t in self.towers.values()):
            raise DataError("CLIP training needs at least 2 training images per modality")
        world = self.ctx.world_size
        # The global batch: batch_size per rank, at most the smallest training set, cut into equal rank shares.
        wanted = int(optim["batch_size"]) * world
        self.batch_size = min(wanted, min(len(t.records) for t in self.towers.values()))
        self.batch_size -= self.batch_size % world
        if self.batch_size < max(2, world):
            raise DataError(f"CLIP training needs at least {max(2, world)} training images per modality for "
                            f"{world} process(es)")
        if self.batch_size < wanted:
            log.warning("global batch lowered to %d (the smallest training set)", self.batch_size)
        self.steps_per_epoch = max(1, len(self.towers[self.modalities[0]].records) // self.batch_size)
        self.epochs = int(optim["epochs"])
        total = self.epochs * self.steps_per_epoch
        self.lr_schedule = cosine_schedule(lr, float(optim.get("min_lr", 0.0)), total,
                                           int(optim.get("warmup_epochs", 0)) * self.steps_per_epoch,
                                           warmup_start=0.0)
        max_steps = self.cfg["train"].get("max_steps")
        self.total_steps = min(total, int(max_steps)) if max_steps else total

    # ------------------------------------------------------------------------------------------ features
    def prepare_images(self) -> None:
        """Decode the training images once and, with a frozen image encoder, cache their features."""
        if not self._resumed:
            captions = sorted({c for t in self.towers.values() for r in t.records
                               for c in ([r.caption] if r.caption else self._enumerable_captions(r, t.modality))})
            text = self.towers[self.modalities[0]].model
            text.text_proj.set_standardisation(text.text_encoder.encode(captions))
        for tower in self.towers.values():
            info = tower.model.image_info
            t0 = time.perf_counter()
            tower.pixels = load_pixels([r.path for r in tower.records], tower.modality, info.img_size)
            aug = ViewAugmentation(tower.modality, info.img_size, tuple(self.cfg["image"]["augment_scale"]), blur_p=0.0)
            aug.mean.copy_(torch.tensor(info.mean).view(1, 3, 1, 1))
            aug.std.copy_(torch.tensor(info.std).view(1, 3, 1, 1))
            tower.augment = aug.to(self.device)
            image = self.cfg["image"]
            if self.image_frozen:
                tower.features = self._stored_features(tower)
            elif image.get("tune") == "last_blocks" and int(image.get("cache_views", 0)) > 0:
                depth = len(tower.model.image_encoder.blocks)
                tower.tokens_from = depth - max(int(image.get("tune_blocks", 1)), tower.model.image_blocks)
                tower.tokens = self._stored_features(tower, tokens_from=tower.tokens_from)
            if not self._resumed:  # a resumed run has them from its checkpoint
                if tower.features is not None:
                    clean = tower.features[0]
                elif tower.tokens is not None:
                    with torch.no_grad():
                        clean = torch.cat([tower.model.features_from_tokens(tower.tokens[0, i:i + 32].to(self.device),
                                                                            tower.tokens_from)
                                           for i in range(0, len(tower.records), 32)])
                else:
                    clean = self._clean_features(tower)
                tower.model.image_proj.set_standardisation(clean)
            cached = tower.features if tower.features is not None else tower.tokens
            log.info("%s: %d images loaded%s in %.1fs", tower.modality, len(tower.records),
                     "" if cached is None else f", {'features' if tower.features is not None else 'block inputs'} of "
                     f"{cached.shape[0]} views cached", time.perf_counter() - t0)

    def _stored_features(self, tower: _Tower, tokens_from: Optional[int] = None) -> Tensor:
        """Cached view features (or, with ``tokens_from``, the tokens entering that block), reused from
        ``image.feature_cache`` (default: the run folder) when they were computed for the same encoder file, images,
        size, pooling, views and seed; otherwise computed and stored there."""
        import hashlib  # noqa: PLC0415

        image = self.cfg["image"]
        key = {"encoder_sha256": tower.encoder_sha256,
               "images": hashlib.sha256("\n".join(str(r.path) for r in tower.records).encode()).hexdigest(),
               "img_size": tower.model.image_info.img_size, "pool": tower.model.image_pool,
               "blocks": tower.model.image_blocks, "views": int(image.get("cache_views", 1)),
               "augment_scale": [float(x) for x in image["augment_scale"]], "seed": self.seed,
               "tokens_from": tokens_from}
        folder = Path(image.get("feature_cache") or self.output)
        path = folder / f"features_{tower.modality}_{hashlib.sha256(repr(sorted(key.items())).encode()).hexdigest()[:16]}.pt"
        if path.is_file():
            stored = safe_load(path)
            if stored.get("key") == key:
                log.info("%s: reusing cached features from %s", tower.modality, path)
                return stored["features"]
        features = self._cache_features(tower, tokens_from)
        if self.ctx.is_main:  # every rank computed the same features; one writes them
            atomic_save({"key": key, "features": features}, path)
        return features

    def _enumerable_captions(self, record: CaptionedImage, modality: str) -> List[str]:
        if len(record.categories) == 1:
            return self.knowledge.all_captions(record.categories, modality)
        rng = random.Random(0)  # multi-category captions: a sample is enough for the statistics
        return [self.knowledge.caption(record.categories, modality, rng) for _ in range(8)]

    @torch.no_grad()
    def _clean_features(self, tower: _Tower, batch: int = 32) -> Tensor:
        modes = {m: m.training for m in tower.model.modules()}
        tower.model.eval()
        try:
            return torch.cat([tower.model.image_features(self._views(tower, tower.pixels[i:i + batch], True)).float()
                              for i in range(0, len(tower.records), batch)])
        finally:
            for module, mode in modes.items():
                module.training = mode

    def _views(self, tower: _Tower, pixels: Tensor, clean: bool) -> Tensor:
        """Normalised ``(B, 3, S, S)`` views of uint8 images: unchanged (``clean``) or randomly augmented."""
        x = pixels.to(self.device).float().div_(255.0)
        if clean:
            info = tower.model.image_info
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            mean = torch.tensor(info.mean, device=x.device).view(1, 3, 1, 1)
            std = torch.tensor(info.std, device=x.device).view(1, 3, 1, 1)
            return (x - mean) / std
        return tower.augment(x)

    @torch.no_grad()
    def _cache_features(self, tower: _Tower, tokens_from: Optional[int] = None, batch: int = 32) -> Tensor:
        model = tower.model

        def compute(pixels: Tensor) -> Tensor:
            if tokens_from is None:
                return model.image_features(pixels)
            return model.image_tokens(pixels, tokens_from)

        modes = {m: m.training for m in model.modules()}
        model.eval()
        views = max(1, int(self.cfg["image"].get("cache_views", 1)))
        out = []
        try:
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                torch.manual_seed(step_seed(self.seed, 0, 7))
                for v in range(views):
                    feats = [compute(self._views(tower, tower.pixels[i:i + batch], clean=v == 0)).float().cpu()
                             for i in range(0, len(tower.records), batch)]
                    out.append(torch.cat(feats))
        finally:
            for module, mode in modes.items():
                module.training = mode
        return torch.stack(out)

    def _text_features(self, captions: Sequence[str]) -> Tensor:
        text = self.towers[self.modalities[0]].model.text_encoder
        if not self.text_frozen:
            with autocast(self.device, self.amp_dtype):
                return text(captions).float()
        missing = list(dict.fromkeys(c for c in captions if c not in self.text_cache))
        if missing:
            # One caption per batch: padding to a batch's longest caption changes the kernels' rounding, and a
            # caption's features must not depend on its batch-mates, or a resumed run drifts from an uninterrupted one.
            feats = text.encode(missing, batch_size=1)
            for caption, f in zip(missing, feats):
                self.text_cache[caption] = f
        return torch.stack([self.text_cache[c] for c in captions]).to(self.device)

    def _image_embeddings(self, tower: _Tower, idx: Tensor, generator: torch.Generator) -> Tensor:
        """Joint-space embeddings of a global batch of training images (a random cached view each, or a fresh
        augmentation), gathered from the ranks' shares with gradients. The random draws are made for the whole
        global batch on every rank, so they do not depend on the number of processes. Tuned encoder blocks run under
        the configured autocast; projections and losses stay in fp32."""
        model, part = tower.model, self.ctx.part(len(idx))
        if tower.features is not None:
            view = torch.randint(0, tower.features.shape[0], (len(idx),), generator=generator)
            local = model.embed_image_features(tower.features[view[part], idx[part]].to(self.device))
            return self.ctx.gather_with_grad(local.float())
        with autocast(self.device, self.amp_dtype):
            if tower.tokens is not None:
                view = torch.randint(0, tower.tokens.shape[0], (len(idx),), generator=generator)
                features = model.features_from_tokens(tower.tokens[view[part], idx[part]].to(self.device),
                                                      tower.tokens_from)
            else:
                features = model.image_features(self._views(tower, tower.pixels[idx], clean=False)[part])
        return self.ctx.gather_with_grad(model.embed_image_features(features.float()).float())

    # ------------------------------------------------------------------------------------------ step
    def train_step(self, step: int) -> Dict[str, float]:
        """One optimiser step; everything random in it is seeded by ``(seed, step)``."""
        cfg = self.cfg
        lr = float(self.lr_schedule[step])
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        rng = random.Random(step_seed(self.seed, step, 1))
        generator = torch.Generator().manual_seed(step_seed(self.seed, step, 2))
        torch.manual_seed(step_seed(self.seed, step, 3))  # dropout and on-the-fly augmentation
        first = self.towers[self.modalities[0]].model
        stats: Dict[str, float] = {}
        text_losses = []
        text_weight = float(cfg["loss"].get("text_weight", 1.0))
        # Encoders run under autocast inside _image_embeddings/_text_features; projections and losses in fp32.
        scale = first.logit_scale_value
        for modality, tower in (self.towers.items() if text_weight > 0 else ()):
            idx = torch.tensor(_batch_indices(len(tower.records), self.batch_size, self.seed, step,
                                              self.modalities.index(modality)))
            records = [tower.records[i] for i in idx.tolist()]
            captions = [r.caption or self.knowledge.caption(r.categories, modality, rng,
                                                             float(cfg["text"].get("description_prob", 0.5)))
                        for r in records]
            image = self._image_embeddings(tower, idx, generator).float()
            local = tower.model.embed_text_features(self._text_features(captions[self.ctx.part(len(captions))]))
            text = self.ctx.gather_with_grad(local.float())
            labels = torch.tensor([self.label_ids[r.label_key] for r in records], device=image.device)
            loss = self.loss_fn(image, text, scale, labels)
            stats[f"loss_text_{modality}"] = loss.item()
            text_losses.append(loss)
        total = text_weight * torch.stack(text_losses).mean() if text_losses else torch.zeros((), device=self.device)
        if self.pairs is not None:
            a, b = self.modalities
            size = min(self.batch_size, len(self.pairs))
            pick = torch.tensor(_batch_indices(len(self.pairs), size - size % self.ctx.world_size, self.seed, step, 9))
            pairs = self.pairs[pick]
            emb_a = self._image_embeddings(self.towers[a], pairs[:, 0], generator).float()
            emb_b = self._image_embeddings(self.towers[b], pairs[:, 1], generator).float()
            cross = cross_modal_loss(emb_a, emb_b, scale, pairs[:, 2].to(emb_a.device))
            stats["loss_cross"] = cross.item()
            total = total + float(cfg["loss"].get("cross_weight", 1.0)) * cross
        stats.update(loss=total.item(), lr=lr)
        if not torch.isfinite(total):  # the loop stops every rank with NonFiniteLossError before anything is saved
            return stats
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        # Every rank's loss is the global batch's; the gathered embeddings carry the other ranks' gradients back
        # summed, and averaging over the ranks leaves exactly the one-process gradient.
        grad_norm = backward_and_step(total, self.optimizer, self.scaler, params, self.cfg["optim"].get("clip_grad"),
                                      after_backward=lambda: self.ctx.average_gradients(params))
        if grad_norm is not None:
            stats["grad_norm"] = grad_norm
        first.clamp_logit_scale_()
        stats["logit_scale"] = first.logit_scale_value.item()
        return stats

    # ------------------------------------------------------------------------------------------ state
    def trainable_state(self) -> Dict[str, Tensor]:
        """Every trained tensor: the trainable parameters and the projections' standardisation buffers."""
        state = {name: p.detach().clone() for name, p in self.net.named_parameters() if p.requires_grad}
        state.update({name: b.detach().clone() for name, b in self.net.named_buffers()
                      if name.rsplit(".", 1)[-1] in ("shift", "scale") and "_proj." in name})
        return state

    def save_checkpoint(self, step: int) -> None:
        if not self.ctx.is_main:
            return
        atomic_save({"trainable": self.trainable_state(), "optimizer": self.optimizer.state_dict(),
                     "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                     "global_step": step, "config": self.cfg,
                     "encoders": {m: t.encoder_sha256 for m, t in self.towers.items()}}, self.output / CHECKPOINT_NAME)

    def _maybe_resume(self) -> int:
        path = self.output / CHECKPOINT_NAME
        if not path.is_file():
            return 0
        ckpt = safe_load(path, map_location=self.device)
        for modality, tower in self.towers.items():
            before = (ckpt.get("encoders") or {}).get(modality)
            if before and before != tower.encoder_sha256:
                raise ValueError(f"{path}: the run was started with another {modality} image encoder (sha256 "
                                 f"{before[:12]}..., now {str(tower.encoder_sha256)[:12]}... in {tower.encoder_path}); "
                                 "start a new run with another --output")
        params = {**dict(self.net.named_parameters()), **dict(self.net.named_buffers())}
        expected = set(self.trainable_state())
        stored = set(ckpt["trainable"])
        if stored != expected:
            raise ValueError(f"{path}: the checkpoint's trainable tensors do not match this config's (missing "
                             f"{sorted(expected - stored)[:5]}, unexpected {sorted(stored - expected)[:5]}); use another "
                             "--output or the config the run was started with")
        with torch.no_grad():
            for name, value in ckpt["trainable"].items():
                if params[name].shape != value.shape:
                    raise ValueError(f"{path}: {name} has shape {tuple(value.shape)}, the model {tuple(params[name].shape)}")
                params[name].copy_(value)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        for key in ("modality", "paired_modality", "data", "image", "text", "model", "loss"):
            if ckpt["config"].get(key) != self.cfg.get(key):
                log.warning("config section %r differs from the checkpoint's", key)
        log.info("resuming from %s at step %d", path, ckpt["global_step"])
        self._resumed = True
        return int(ckpt["global_step"])

    # ------------------------------------------------------------------------------------------ evaluation
    def validate(self) -> Dict[str, Any]:
        """Zero-shot DME metrics on the validation records that carry DME labels (OCT_DME); empty otherwise."""
        from .evaluate import zero_shot_metrics  # noqa: PLC0415

        out: Dict[str, Any] = {}
        for modality, tower in self.towers.items():
            records = [r for r in tower.val_records if r.label is not None]
            if len({r.label for r in records}) < 2:
                continue
            if tower.val_pixels is None:
                tower.val_pixels = load_pixels([r.path for r in records], modality, tower.model.image_info.img_size)
            metrics = zero_shot_metrics(tower.model, tower.val_pixels, [r.label for r in records], DME_CLASS_NAMES)
            out[modality] = {k: metrics[k] for k in ("accuracy", "balanced_accuracy", "auroc", "n")}
        return out

    # ------------------------------------------------------------------------------------------ loop
    def train(self) -> Dict[str, Any]:
        """Run (or resume) the alignment on :class:`~visionfm.engine.loop.TrainLoop`, export the CLIP weights and
        return a summary (also in metrics.json)."""
        if not self.towers:
            self.build()
        step = self._maybe_resume()
        if self.ctx.is_main:
            write_run_config(self.cfg, self.output)
        if any(t.pixels is None for t in self.towers.values()):
            self.prepare_images()
        writer = self.ctx.writer()
        every_eval = int(self.cfg["train"].get("eval_every_epochs") or 0) * self.steps_per_epoch
        every_ckpt = int(self.cfg["train"].get("checkpoint_every_epochs") or 1) * self.steps_per_epoch
        start, t0, val = step, time.perf_counter(), {}
        log.info("training %s for %d steps (%d per epoch, global batch %d over %d process(es)) on %s",
                 "+".join(self.modalities), self.total_steps, self.steps_per_epoch, self.batch_size,
                 self.ctx.world_size, self.device)
        loop = TrainLoop(self.ctx, self.total_steps, "clip train", writer, items_per_step=self.batch_size,
                         log_every=1, val_every=every_eval, save_every=every_ckpt,
                         hint="try a lower --lr or --set train.precision=fp32")

        def validate(done: int) -> None:
            nonlocal val
            val = self.validate()  # every rank scores the (small) validation split alike
            for modality, m in val.items():
                for key in ("auroc", "accuracy", "balanced_accuracy"):
                    if m[key] is not None and not math.isnan(m[key]):
                        writer.add_scalar(f"val_{modality}/{key}", m[key], done)

        self.net.train()
        try:
            if step < self.total_steps:
                loop.run(self.train_step, validate, self.save_checkpoint, start=step)
            else:
                validate(step)
        finally:
            writer.close()
        step = self.total_steps if step < self.total_steps else step
        summary = {"global_step": step, "steps_this_run": step - start, "seconds_this_run": round(time.perf_counter() - t0, 2),
                   "final_loss": loop.last.get("loss"), "logit_scale": self.towers[self.modalities[0]].model.logit_scale_value.item(),
                   "train_images": {m: len(t.records) for m, t in self.towers.items()},
                   "cross_modal_pairs": int(len(self.pairs)) if self.pairs is not None else 0,
                   "val_zero_shot": val, "processes": self.ctx.world_size}
        summary["exported"] = [str(p) for p in self.export(step, val)] if self.ctx.is_main else []
        return summary

    # ------------------------------------------------------------------------------------------ export
    def data_description(self, modality: str) -> str:
        if self.cfg["export"].get("data_description"):
            return str(self.cfg["export"]["data_description"])
        tower = self.towers[modality]
        data = self.cfg["data"]
        sources = data["sources"] if modality == self.modalities[0] or not data.get("paired_sources") else data["paired_sources"]
        patients = {r.patient for r in tower.records if r.patient}
        return (f"{', '.join(map(str, sources if isinstance(sources, list) else [sources]))} split "
                f"'{data['train_split']}': {len(tower.records)} images" + (f" of {len(patients)} patients" if patients else ""))

    def export(self, step: int, val: Optional[Dict[str, Any]] = None) -> List[Path]:
        """Write ``<output>/<modality>_clip.safetensors`` per modality and, with ``export.to``, copies plus index
        entries there."""
        written = []
        include_image = not self.image_frozen
        include_text = not self.text_frozen
        for modality, tower in self.towers.items():
            model = tower.model
            enc_file = Path(tower.encoder_path).name if tower.encoder_path else None
            enc_sha = tower.encoder_sha256
            extra = {"objective": f"clip/{self.cfg['loss']['text']}", "steps": int(step),
                     "data": self.data_description(modality),
                     "paired_modality": next((m for m in self.modalities if m != modality), None),
                     "cross_weight": float(self.cfg["loss"].get("cross_weight", 0)) if len(self.modalities) > 1 else 0.0,
                     "knowledge": {"file": Path(self.knowledge.source).name, "sha256": self.knowledge.sha256},
                     "labels": sorted(self.label_ids, key=self.label_ids.get)}
            if val and modality in val:
                extra["val_zero_shot"] = val[modality]
            meta = model.export_metadata(enc_file, enc_sha, include_image, include_text, **extra)
            if tower.encoder_path:  # where the encoder was at training time: the last place load() looks
                meta["image_encoder"]["path"] = str(Path(tower.encoder_path).resolve())
            path = self.output / f"{modality}_clip.safetensors"
            model.save(path, meta, include_image, include_text)
            written.append(path)
            target = self.cfg["export"].get("to")
            if target:
                name = f"{modality}_clip.safetensors"
                # Shipped copies find their encoder beside them; the training machine's path means nothing elsewhere.
                shipped = {**meta, "image_encoder": {k: v for k, v in meta["image_encoder"].items() if k != "path"}}
                sha = model.save(Path(target) / name, shipped, include_image, include_text)
                # No "modality" key: load_encoder and `python -m visionfm.weights` take such entries for encoders.
                update_index(target, name, {"format": meta["format"], "image_modality": modality,
                                            "image_encoder": meta["image_encoder"]["file"],
                                            "text_encoder": meta["text_encoder"]["name"], "steps": int(step),
                                            "data": meta["data"]}, sha)
                written.append(Path(target) / name)
            log.info("exported %s CLIP weights to %s", modality, path)
        return written

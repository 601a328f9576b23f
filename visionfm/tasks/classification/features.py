"""Frozen-encoder features for linear probes and k-NN: pooled tokens, extracted once per image in batches.

Pooling (``pool``): ``cls`` (the class token), ``mean`` (mean of the patch tokens) or ``cls+mean`` (both,
concatenated); with ``last_blocks = k > 1`` the pooled tokens of the last ``k`` blocks (each passed through
the encoder's final norm) are concatenated, as DINO's linear evaluation does for ViT-S.

Example:
    >>> from timm.models.vision_transformer import VisionTransformer
    >>> import torch
    >>> vit = VisionTransformer(img_size=32, patch_size=16, embed_dim=48, depth=2, num_heads=2, num_classes=0)
    >>> pooled_features(vit, torch.randn(2, 3, 32, 32), "cls+mean", last_blocks=2).shape
    torch.Size([2, 192])
"""

from __future__ import annotations

import logging
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ...data.datasets.labeled import LabeledImages, LabeledSample
from ...engine.precision import autocast
from ...models.vit import POOLS, pool_tokens

__all__ = ["POOLS", "feature_dim", "pooled_features", "extract_features", "FeatureCache"]

log = logging.getLogger(__name__)



def _check(pool: str, last_blocks: int, encoder: nn.Module) -> None:
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
    depth = len(encoder.blocks)
    if not 1 <= last_blocks <= depth:
        raise ValueError(f"last_blocks must be between 1 and the encoder depth {depth}, got {last_blocks}")


def feature_dim(encoder: nn.Module, pool: str, last_blocks: int = 1) -> int:
    """Size of the pooled feature vector."""
    _check(pool, last_blocks, encoder)
    return encoder.embed_dim * last_blocks * (2 if pool == "cls+mean" else 1)


def pooled_features(encoder: nn.Module, images: Tensor, pool: str = "cls", last_blocks: int = 1) -> Tensor:
    """``(B, feature_dim)`` features of a batch of normalised images (no ``no_grad`` here: fine-tuning uses it
    too)."""
    _check(pool, last_blocks, encoder)
    prefix = encoder.num_prefix_tokens
    if last_blocks == 1:
        return pool_tokens(encoder.forward_features(images), prefix, pool)
    outputs = encoder.forward_intermediates(images, indices=last_blocks, return_prefix_tokens=True, norm=True,
                                            output_fmt="NLC", intermediates_only=True)
    return torch.cat([pool_tokens(torch.cat([pre, spatial], dim=1), pre.shape[1], pool) for spatial, pre in outputs],
                     dim=-1)


@torch.no_grad()
def extract_features(encoder: nn.Module, dataset: LabeledImages, pool: str = "cls", last_blocks: int = 1,
                     batch_size: int = 64, device: "torch.device | str" = "cpu",
                     amp_dtype: Optional[torch.dtype] = None, num_workers: int = 0) -> Tuple[Tensor, Tensor]:
    """Features and targets of every image of a dataset, in dataset order (float32 on the CPU).

    The encoder runs in eval mode under autocast (``amp_dtype``, e.g. bf16 on CPUs and GPUs that have it);
    features are returned in float32.
    """
    device = torch.device(device)
    was_training = encoder.training
    encoder.eval().to(device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    feats: List[Tensor] = []
    targets: List[Tensor] = []
    for images, target in loader:
        with autocast(device, amp_dtype):
            out = pooled_features(encoder, images.to(device, non_blocking=True), pool, last_blocks)
        feats.append(out.float().cpu())
        targets.append(target)
    encoder.train(was_training)
    return torch.cat(feats), torch.cat(targets)


class FeatureCache:
    """Features of a frozen encoder, computed at most once per image (keyed by file path), so a linear probe,
    a k-NN sweep or a few-shot curve over many shot counts reads every image through the encoder once.

    Args:
        encoder: The frozen encoder.
        make_dataset: Builds a :class:`LabeledImages` for a list of samples (decides size and normalisation).
        pool, last_blocks, batch_size, device, amp_dtype: As :func:`extract_features`.
    """

    def __init__(self, encoder: nn.Module, make_dataset, pool: str, last_blocks: int, batch_size: int,
                 device: torch.device, amp_dtype: Optional[torch.dtype], num_workers: int = 0) -> None:
        self.encoder = encoder
        self.make_dataset = make_dataset
        self.pool, self.last_blocks = pool, last_blocks
        self.batch_size, self.device, self.amp_dtype = batch_size, device, amp_dtype
        self.num_workers = num_workers
        self._store: Dict[str, Tensor] = {}
        self.seconds = 0.0

    def __call__(self, samples: Sequence[LabeledSample]) -> Tensor:
        """``(len(samples), feature_dim)`` features, extracting those not seen yet."""
        missing = [s for s in dict.fromkeys(samples) if str(s.path) not in self._store]
        if missing:
            start = time.perf_counter()
            dataset = self.make_dataset(missing)
            feats, _ = extract_features(self.encoder, dataset, self.pool, self.last_blocks, self.batch_size,
                                        self.device, self.amp_dtype, self.num_workers)
            for s, f in zip(missing, feats):
                self._store[str(s.path)] = f
            self.seconds += time.perf_counter() - start
            log.info("extracted features of %d images in %.1f s", len(missing), time.perf_counter() - start)
        return torch.stack([self._store[str(s.path)] for s in samples])

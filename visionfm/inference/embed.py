"""Pooled encoder features of a user's images, their 2-D PCA scatter, and the files they are written to."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..data.encoder_inputs import encoder_batch, iter_batches
from ..data.inputs import InputImage
from ..models.vit import POOLS, pool_tokens

__all__ = ["POOLS", "pooled_tokens", "compute_embeddings", "pca", "plot_embedding_scatter", "save_embeddings"]

log = logging.getLogger(__name__)

def pooled_tokens(encoder: nn.Module, pixels: Tensor, pool: str = "cls") -> Tensor:
    """``(B, D)`` (``cls+mean``: ``(B, 2D)``) features after the final norm (:func:`visionfm.models.vit.pool_tokens`)."""
    return pool_tokens(encoder.forward_features(pixels), int(getattr(encoder, "num_prefix_tokens", 1)), pool)


@torch.no_grad()
def compute_embeddings(encoder: nn.Module, images: Sequence[InputImage], modality: str, size: int,
                       mean: Sequence[float], std: Sequence[float], pool: str = "cls", batch_size: int = 32,
                       device: "torch.device | str" = "cpu") -> np.ndarray:
    """``(N, D)`` float32 features of every image, in order, computed in batches in eval mode (fp32)."""
    device = torch.device(device)
    was_training = encoder.training
    encoder.eval().to(device)
    out: List[np.ndarray] = []
    try:
        for chunk in iter_batches(images, batch_size, "embed"):
            pixels = encoder_batch(chunk, modality, size, mean, std).to(device)
            out.append(pooled_tokens(encoder, pixels, pool).float().cpu().numpy())
    finally:
        encoder.train(was_training)
    return np.concatenate(out).astype(np.float32)


def pca(features: np.ndarray, components: int) -> np.ndarray:
    """Project rows on their first principal components (centred SVD); fewer rows than components give zero
    columns for the missing ones, so the output is always ``(N, components)``."""
    x = np.asarray(features, dtype=np.float64)
    x = x - x.mean(axis=0, keepdims=True)
    out = np.zeros((x.shape[0], components))
    if x.shape[0] < 2:
        return out
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    k = min(components, s.shape[0])
    out[:, :k] = u[:, :k] * s[:k]
    # SVD signs are arbitrary: fix them so the same data always gives the same picture.
    signs = np.sign(out[np.argmax(np.abs(out), axis=0), range(components)])
    return out * np.where(signs == 0, 1.0, signs)


def plot_embedding_scatter(coords: np.ndarray, path: "str | Path", labels: Optional[Sequence[Optional[str]]] = None,
                           names: Optional[Sequence[str]] = None, title: str = "") -> Path:
    """A 2-D PCA scatter PNG, one colour per label when labels are given (points named when there are few)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(4.2, 3.6), dpi=100)
    if labels is not None and any(lab not in (None, "") for lab in labels):
        groups: Dict[str, List[int]] = {}
        for i, lab in enumerate(labels):
            groups.setdefault("(none)" if lab in (None, "") else str(lab), []).append(i)
        for lab, idx in sorted(groups.items()):
            ax.scatter(coords[idx, 0], coords[idx, 1], s=18, label=lab, alpha=0.85)
        ax.legend(fontsize=7, loc="best", frameon=False)
    else:
        ax.scatter(coords[:, 0], coords[:, 1], s=18, alpha=0.85)
    if names is not None and len(names) <= 12:
        for (x, y), name in zip(coords[:, :2], names):
            ax.annotate(str(name)[:16], (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(title, fontsize=8)
    ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def save_embeddings(features: np.ndarray, images: Sequence[InputImage], embeddings_path: Path,
                    index_path: Optional[Path], metadata: Dict[str, object]) -> None:
    """Write the features as ``.npy`` (with ``index_path``: a CSV of row, path, name, label) or as one
    ``.safetensors`` file holding the features and, in its metadata, the paths, names, labels and settings."""
    if embeddings_path.suffix == ".npy":
        np.save(embeddings_path, features)
        from .outputs import write_csv  # noqa: PLC0415

        assert index_path is not None
        write_csv(index_path, ["row", "path", "name", "label"],
                  ([i, str(im.path), im.name, im.label or ""] for i, im in enumerate(images)))
        return
    from safetensors.numpy import save_file  # noqa: PLC0415

    meta = {k: json.dumps(v) for k, v in metadata.items()}
    meta.update(paths=json.dumps([str(im.path) for im in images]), names=json.dumps([im.name for im in images]),
                labels=json.dumps([im.label for im in images]))
    save_file({"embeddings": np.ascontiguousarray(features)}, str(embeddings_path), metadata=meta)

"""Weights: our safetensors format, the ``weights/`` registry, foreign checkpoint formats, safe loading.

Command line: ``python -m visionfm.weights list | verify | convert SRC --modality M``.
"""

from .export import read_index, read_metadata, save_encoder, sha256_file, update_index
from .formats import KeyReport, ViTSpec, load_foreign_checkpoint, read_foreign_checkpoint
from .loader import EncoderInfo, WeightsNotFoundError, load_encoder, resolve_weights
from .safety import UnsafeCheckpointError, load_checkpoint

__all__ = ["EncoderInfo", "KeyReport", "UnsafeCheckpointError", "ViTSpec", "WeightsNotFoundError",
           "load_checkpoint", "load_encoder", "load_foreign_checkpoint", "read_foreign_checkpoint", "read_index",
           "read_metadata", "resolve_weights", "save_encoder", "sha256_file", "update_index"]

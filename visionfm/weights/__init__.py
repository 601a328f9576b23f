"""Weights: our safetensors format, the ``weights/`` registry, foreign checkpoint formats, safe loading."""

from .export import read_metadata, save_encoder, sha256_file, update_index
from .loader import EncoderInfo, WeightsNotFoundError, load_encoder, resolve_weights

__all__ = ["EncoderInfo", "WeightsNotFoundError", "load_encoder", "read_metadata", "resolve_weights",
           "save_encoder", "sha256_file", "update_index"]

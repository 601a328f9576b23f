"""Weights: our safetensors format, the ``weights/`` registry, foreign checkpoint formats, safe loading."""

from .export import read_metadata, save_encoder, sha256_file, update_index

__all__ = ["read_metadata", "save_encoder", "sha256_file", "update_index"]

"""Encoders and model heads."""

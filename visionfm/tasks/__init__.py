"""Downstream tasks on top of the modality encoders; one sub-package per task family (``classification``...)."""

"""Applying trained models to a user's own images: shared input preparation, staged outputs, checkpoint
recognition, pooled embeddings and attention maps.

This package sits below :mod:`visionfm.tasks` (tasks import it, never the reverse), so the ``predict``
commands of classification, segmentation and detection and the task-free commands (``downstream/embed.py``,
``downstream/attention.py``) read images, refuse bad input and write their files the same way.
"""

from .checkpoints import WrongCheckpointError, checkpoint_kind, load_task_checkpoint, require_checkpoint
from ..data.encoder_inputs import encoder_batch, iter_batches, prepare_inputs
from .outputs import StagedOutput, write_csv

__all__ = ["WrongCheckpointError", "checkpoint_kind", "load_task_checkpoint", "require_checkpoint",
           "encoder_batch", "iter_batches",
           "prepare_inputs", "StagedOutput", "write_csv"]

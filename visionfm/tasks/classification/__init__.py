"""Disease classification on top of a modality encoder: linear / MLP probes on frozen features, k-NN, and
full fine-tuning with layer-wise lr decay. The command line is ``python downstream/cls.py``."""

from .heads import OrdinalOutput, Standardize, build_head
from .task import ClassificationTask

__all__ = ["ClassificationTask", "OrdinalOutput", "Standardize", "build_head"]

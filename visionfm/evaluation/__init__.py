"""Evaluation across tasks: the paired bootstrap of a difference between two models, and the transfer suite
(``benchmarks/transfer.py``) that compares an encoder with its random-init twin on a fixed set of tasks."""

from .paired import BootstrapResult, metric_difference, paired_bootstrap

__all__ = ["BootstrapResult", "metric_difference", "paired_bootstrap"]

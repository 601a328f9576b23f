"""Command-line conventions shared by every training script (``pretrain/*.py``, ``downstream/*.py``)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Optional

__all__ = ["add_common_arguments", "resolve_data_root", "resolve_device"]


def add_common_arguments(parser: argparse.ArgumentParser, default_output: str) -> argparse.ArgumentParser:
    """Add ``--config``, ``--set``, ``--output``, ``--device``, ``--seed``, ``--max-steps``, ``--limit`` and
    ``--data-root``."""
    group = parser.add_argument_group("common options")
    group.add_argument("--config", metavar="FILE", help="experiment YAML merged over the default config")
    group.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                       help="override one config value (dotted key, YAML value); repeatable, applied last")
    group.add_argument("--output", metavar="DIR", default=default_output,
                       help=f"run folder for checkpoints, logs, metrics.json (default: {default_output})")
    group.add_argument("--device", default=None,
                       help="cpu, cuda, cuda:N (default: cuda when available, else cpu; LOCAL_RANK under torchrun)")
    group.add_argument("--seed", type=int, default=None, help="random seed (default from the config)")
    group.add_argument("--max-steps", type=int, default=None, metavar="N",
                       help="quick trial: stop after N optimiser steps")
    group.add_argument("--limit", type=int, default=None, metavar="N",
                       help="quick trial: use at most N images of each split")
    group.add_argument("--data-root", default=None, metavar="DIR",
                       help="folder holding datasets by their folder names (default: $VISIONFM_DATA or data/)")
    return parser


def resolve_data_root(value: Optional[str]) -> Path:
    """``--data-root`` if given, else ``$VISIONFM_DATA``, else ``data/``."""
    return Path(value or os.environ.get("VISIONFM_DATA") or "data")


def resolve_device(value: Optional[str]):
    """Pick the device at run time (never at import time)."""
    import torch

    if value:
        device = torch.device(value)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit(f"--device {value}: CUDA is not available on this machine")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")

"""Command-line conventions shared by every training script (``pretrain/*.py``, ``downstream/*.py``)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Optional

__all__ = ["HelpFormatter", "add_common_arguments", "positive_int", "output_folder", "resolve_data_root", "resolve_device"]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default only where the flag has one of its own.

    Most flags default to ``None``, meaning "the config's value": printing ``(default: None)`` would state a
    default that is not the real one, so those flags say nothing here and their help names the config key."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, [], argparse.SUPPRESS):
            return action.help or ""
        return super()._get_help_string(action)


def positive_int(value: str) -> int:
    """argparse type: an integer of at least 1 (``--max-steps -3`` is a mistake, not "no limit")."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def output_folder(value: str) -> str:
    """argparse type: a run folder that is a folder or does not exist yet (checked before anything is written)."""
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} exists and is not a folder")
    for parent in path.parents:  # a file part-way up the path fails later in mkdir with a vaguer message
        if parent.exists():
            if not parent.is_dir():
                raise argparse.ArgumentTypeError(f"{parent} is a file, so {path} cannot be created")
            break
    return value


def add_common_arguments(parser: argparse.ArgumentParser, default_output: str) -> argparse.ArgumentParser:
    """Add ``--config``, ``--set``, ``--output``, ``--device``, ``--seed``, ``--max-steps``, ``--limit`` and
    ``--data-root``."""
    group = parser.add_argument_group("common options")
    group.add_argument("--config", metavar="FILE", help="experiment YAML merged over the default config")
    group.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                       help="override one config value (dotted key, YAML value); repeatable, applied last")
    group.add_argument("--output", metavar="DIR", default=default_output, type=output_folder,
                       help=f"run folder for checkpoints, logs, metrics.json (default: {default_output})")
    group.add_argument("--device", default=None,
                       help="cpu, cuda, cuda:N (default: cuda when available, else cpu; LOCAL_RANK under torchrun)")
    group.add_argument("--seed", type=int, default=None, help="random seed (default from the config)")
    group.add_argument("--max-steps", type=positive_int, default=None, metavar="N",
                       help="quick trial: stop after N optimiser steps")
    group.add_argument("--limit", type=positive_int, default=None, metavar="N",
                       help="quick trial: use at most N images of each split")
    group.add_argument("--data-root", default=None, metavar="DIR",
                       help="folder holding datasets by their folder names (default: $VISIONFM_DATA or data/)")
    return parser


def resolve_data_root(value: Optional[str]) -> Path:
    """``--data-root`` if given, else ``$VISIONFM_DATA``, else ``data/``."""
    return Path(value or os.environ.get("VISIONFM_DATA") or "data")


def resolve_device(value: Optional[str]):
    """Pick the device at run time (never at import time).

    Under ``torchrun`` (``LOCAL_RANK`` set) each process takes the GPU of its local rank: ``cuda`` and the default
    become ``cuda:<LOCAL_RANK>``. An explicit ``cuda:N`` is then refused unless it is that GPU, since the same
    ``cuda:N`` on every rank would put all of them on one GPU.

    Raises:
        SystemExit: CUDA is not available, the local rank has no GPU, or ``cuda:N`` is not this rank's GPU.
    """
    import torch

    local_rank = os.environ.get("LOCAL_RANK")
    device = torch.device(value) if value else None
    if device is None:
        if not torch.cuda.is_available():
            return torch.device("cpu")
        device = torch.device("cuda")
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise SystemExit(f"--device {value}: CUDA is not available on this machine")
    count = torch.cuda.device_count()
    if local_rank is None:
        index = 0 if device.index is None else device.index
    else:
        index = int(local_rank)
        if device.index is not None and device.index != index:
            raise SystemExit(f"--device {value} under torchrun: this process has LOCAL_RANK {index} and takes "
                             f"cuda:{index}; pass --device cuda so that each process uses the GPU of its local rank")
    if index >= count:
        raise SystemExit(f"--device {value or 'cuda'}: GPU {index} does not exist (this machine shows {count}; "
                         f"with torchrun, --nproc-per-node must not exceed the GPUs)")
    return torch.device("cuda", index)

"""DataLoader settings chosen by device: worker processes, pinned memory and persistent workers on a GPU."""

from __future__ import annotations

import os
from typing import Any, Dict

import torch

__all__ = ["loader_settings"]


def loader_settings(data: Dict[str, Any], device: torch.device, world_size: int = 1) -> Dict[str, Any]:
    """DataLoader keywords for ``data.num_workers`` (a number, or ``auto``) on ``device``.

    ``auto``: on a GPU, decoding and resizing in worker processes (the CPUs of the machine shared between the ranks
    of one node, at most 8 per rank, one left for the main process) with pinned memory, so that the next batch is
    ready while the GPU works; workers stay alive between epochs (``persistent_workers``) instead of being started
    again, with the dataset copied into each, at every epoch. On the CPU: 0 (the main process), as workers would
    compete with the model for the same cores.
    """
    value = data.get("num_workers", "auto")
    if value is None or str(value).lower() == "auto":
        if device.type == "cuda":
            local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size)) or 1
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            workers = max(0, min(8, cpus // local - 1))
        else:
            workers = 0
    else:
        workers = int(value)
        if workers < 0:
            raise ValueError(f"data.num_workers must be auto or a number >= 0, got {value!r}")
    settings: Dict[str, Any] = {"num_workers": workers, "pin_memory": device.type == "cuda",
                                "persistent_workers": workers > 0}
    if workers > 0:
        settings["prefetch_factor"] = 4 if device.type == "cuda" else 2
    return settings

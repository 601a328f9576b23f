"""Works the same with and without a process group: a plain ``python`` run never creates one;
``torchrun`` runs get DDP with NCCL on GPUs and gloo on CPUs."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Tuple

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init_distributed", "is_main_process", "barrier", "cleanup", "any_rank", "load_on_every_rank"]

log = logging.getLogger(__name__)

#: A gloo group beside the training group, for small host-side agreements (stop requests, file presence): a
#: CPU all-reduce there neither waits for nor enqueues work on the GPU stream the NCCL group uses.
_HOST_GROUP: Optional[Any] = None


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    On a GPU the process is bound to ``device`` (which :func:`visionfm.cli.resolve_device` sets to
    ``cuda:<LOCAL_RANK>``) before NCCL starts, so that each rank's communicator lives on its own GPU.
    """
    global _HOST_GROUP
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device.index if device.index is not None else local_rank)
        dist.init_process_group(backend=backend)
    if _HOST_GROUP is None and dist.get_backend() != "gloo":
        _HOST_GROUP = dist.new_group(backend="gloo")
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank)


def _host_group():
    """The gloo group for host-side agreements (the default group when that is gloo already)."""
    return _HOST_GROUP if _HOST_GROUP is not None else dist.group.WORLD


def is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def any_rank(*flags: bool) -> Tuple[bool, ...]:
    """Each flag, true on every rank when it is true on at least one (one host-side all-reduce over gloo).

    Why: a stop request (SIGTERM reaches ranks at different moments, a wall-clock budget is measured per rank) that
    one rank acts on alone leaves the others waiting in the next collective forever. Asking after each step makes
    all ranks stop after the same step. Without a process group the flags come back as they are.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tuple(bool(f) for f in flags)
    value = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=_host_group())
    return tuple(bool(v) for v in value.tolist())  # a CPU tensor: no GPU synchronisation


def load_on_every_rank(path: "str | os.PathLike", load: Callable[[Path], Any]) -> Optional[Any]:
    """``load(path)`` on every rank, also where ``path`` exists on rank 0's disk only.

    Each rank says whether it sees the file. All of them (a shared file system): each loads its own copy. Only rank
    0 (one disk per node, rank 0 the one that saves): rank 0 loads and broadcasts the object. Nobody: ``None``
    everywhere. A file that some ranks other than 0 see but rank 0 does not is an error (stale files from another
    run). Without a process group: ``load(path)`` if the file exists, else ``None``.

    Raises:
        RuntimeError: rank 0 lacks a file that another rank has.
    """
    path = Path(path)
    here = path.is_file()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return load(path) if here else None
    seen = [None] * dist.get_world_size()
    dist.all_gather_object(seen, here, group=_host_group())
    if all(seen):
        return load(path)
    if not any(seen):
        return None
    if not seen[0]:
        ranks = [r for r, s in enumerate(seen) if s]
        raise RuntimeError(f"{path} exists on rank(s) {ranks} but not on rank 0, which writes it: remove the stale "
                           "file or point --output at a shared folder")
    log.info("%s is on rank 0's disk only (%d of %d ranks see it): broadcasting it from rank 0", path,
             sum(bool(s) for s in seen), len(seen))
    box = [load(path) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0, group=_host_group())
    return box[0]


def cleanup() -> None:
    global _HOST_GROUP
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _HOST_GROUP = None

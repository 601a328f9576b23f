"""A resumable, rank-aware batch sampler whose order depends only on (seed, epoch)."""

from __future__ import annotations

from typing import Iterator, List

import torch
from torch.utils.data import Sampler

__all__ = ["EpochBatchSampler"]


class EpochBatchSampler(Sampler[List[int]]):
    """Shuffled batches that are a pure function of ``(seed, epoch)``, so a resumed run sees exactly the
    batches an uninterrupted one would.

    Each epoch draws a permutation, cuts it into global batches of ``batch_size * world_size`` (the
    incomplete last one is dropped), and gives each rank its contiguous slice of every global batch; rank
    slices of one step therefore form the same global batch a single process would use.

    Args:
        dataset_size: Number of samples.
        batch_size: Per-rank batch size.
        seed: Base seed.
        rank, world_size: This process's place in the process group.
    """

    def __init__(self, dataset_size: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.dataset_size = dataset_size
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start_step = 0
        global_batch = batch_size * world_size
        if dataset_size < global_batch:
            raise ValueError(f"{dataset_size} images are fewer than one global batch of {global_batch} "
                             f"({batch_size} per process x {world_size} processes): add images or lower --batch-size")

    @property
    def steps_per_epoch(self) -> int:
        return self.dataset_size // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select the epoch's permutation, optionally skipping the first ``start_step`` batches."""
        self.epoch = epoch
        self.start_step = start_step

    def __iter__(self) -> Iterator[List[int]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.dataset_size, generator=generator).tolist()
        global_batch = self.batch_size * self.world_size
        for step in range(self.start_step, self.steps_per_epoch):
            chunk = order[step * global_batch:(step + 1) * global_batch]
            yield chunk[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start_step

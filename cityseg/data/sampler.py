"""The order of an epoch: which samples, in which order, on which shard, from which batch on.

Shared by the plain loader (as its DataLoader sampler), the device cache (its batch order) and DALI
(the shards its reader gets), so every loader agrees on epoch length, shards and the last batch.
Augmentation seeds are a pure function of (run seed, epoch, sample): any worker count and a resume
in the middle of an epoch see the same draws.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A distinct, reproducible RNG seed per (run seed, epoch, sample)."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


class EpochSampler(Sampler):
    """Yields (index, augmentation seed) keys for one epoch: shuffled by (seed, epoch), optionally
    one shard of `num_shards` (DDP), starting at `start_batch` (mid-epoch resume)."""

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        shuffle: bool,
        augment: bool,
        seed: int = 0,
        drop_last: bool = False,
        shard_id: int = 0,
        num_shards: int = 1,
    ) -> None:
        self.n, self.batch_size, self.shuffle, self.augment = n, batch_size, shuffle, augment
        self.seed, self.drop_last = seed, drop_last
        self.shard_id, self.num_shards = shard_id, num_shards
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def shard_indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        if self.drop_last:  # training: pad so every rank runs the same number of steps
            per_shard = math.ceil(self.n / self.num_shards)
            order += order[: per_shard * self.num_shards - self.n]
        # Validation is not padded: every sample counts exactly once over all ranks.
        return order[self.shard_id :: self.num_shards]

    def num_batches(self) -> int:
        if self.drop_last:
            return math.ceil(self.n / self.num_shards) // self.batch_size
        return math.ceil(len(range(self.shard_id, self.n, self.num_shards)) / self.batch_size)

    def keys(self) -> list[tuple[int, int | None]]:
        indices = self.shard_indices()[: self.num_batches() * self.batch_size]
        indices = indices[self.start_batch * self.batch_size :]
        return [(i, sample_seed(self.seed, self.epoch, i) if self.augment else None) for i in indices]

    def __len__(self) -> int:
        return len(self.keys())

    def __iter__(self) -> Iterator[tuple[int, int | None]]:
        return iter(self.keys())

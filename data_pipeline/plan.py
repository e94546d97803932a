"""Which samples each rank sees, in which order, with which augmentation seed: pure functions.

The order of an epoch is a function of (seed, epoch) only; each rank takes a disjoint, equally long
share, so every rank runs the same number of batches.  A sample's augmentation seed is a function of
(seed, epoch, sample index), so a batch is reproducible whichever worker decodes it — which is what
makes a mid-epoch resume exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from data_pipeline.manifest import DataError


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The SplitMix64 mixing function on uint64 values (also compiled into the seeded FFCV decoder)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def sample_seeds_base(seed: int, epoch: int) -> int:
    """The per-epoch part of the sample seeds."""
    with np.errstate(over="ignore"):
        return int(splitmix64(splitmix64(np.array([seed], dtype=np.uint64)) ^ np.uint64(epoch))[0])


def sample_seeds(seed: int, epoch: int, indices: np.ndarray) -> np.ndarray:
    """Well-mixed 32-bit augmentation seeds (int64 array) of samples ``indices`` in ``epoch``."""
    with np.errstate(over="ignore"):
        mixed = splitmix64(np.uint64(sample_seeds_base(seed, epoch)) ^ np.asarray(indices, dtype=np.uint64))
    return (mixed & np.uint64(0xFFFFFFFF)).astype(np.int64)


@dataclass(frozen=True, slots=True)
class EpochPlan:
    num_samples: int
    batch_size: int
    rank: int
    world_size: int
    seed: int
    train: bool
    """Train: shuffled, equal shares by dropping the remainder, full batches only.  Eval: dataset
    order, shares padded by wrapping around (padding marked invalid), last batch may be partial."""

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world size {self.world_size}")
        if self.train and self.num_samples // self.world_size < self.batch_size:
            raise DataError(
                f"{self.num_samples} training samples give each of {self.world_size} rank(s) fewer than one batch of "
                f"{self.batch_size} (data.batch_size is per rank)"
            )

    @property
    def per_rank(self) -> int:
        if self.train:
            return self.num_samples // self.world_size
        return math.ceil(self.num_samples / self.world_size)

    @property
    def num_batches(self) -> int:
        if self.train:
            return self.per_rank // self.batch_size
        return math.ceil(self.per_rank / self.batch_size)

    def rank_indices(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(sample indices, valid mask) of this rank for ``epoch``, in iteration order."""
        n, world = self.num_samples, self.world_size
        if self.train:
            order = np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(n)
            order = order[: self.per_rank * world]
            valid = np.ones(len(order), dtype=bool)
        else:
            total = self.per_rank * world
            order = np.arange(total) % n
            valid = np.arange(total) < n
        return order[self.rank :: world], valid[self.rank :: world]

    def batches(self, epoch: int, start: int = 0) -> list[list[tuple[int, int, bool]]]:
        """Batches ``start..`` of ``epoch``: lists of (sample index, augmentation seed, valid)."""
        indices, valid = self.rank_indices(epoch)
        seeds = sample_seeds(self.seed, epoch, indices)
        out = []
        for b in range(start, self.num_batches):
            lo, hi = b * self.batch_size, min((b + 1) * self.batch_size, len(indices))
            out.append([(int(i), int(s), bool(v)) for i, s, v in zip(indices[lo:hi], seeds[lo:hi], valid[lo:hi])])
        return out

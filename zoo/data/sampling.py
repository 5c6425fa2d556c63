"""Seeded randomness for datasets: every random draw of a sample is a function of (seed, epoch,
index) only, so data are the same whatever the number of workers and after resuming a run."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

__all__ = ["seeded_generator", "EpochSampler"]

_ORDER = 11  # stream id of the shuffling order, apart from the streams datasets draw samples from


def seeded_generator(seed: int | Sequence[int], index: int) -> torch.Generator:
    """A torch generator for item `index` of the stream `seed` (an int or a sequence of ints)."""
    seeds = list(seed) if isinstance(seed, Sequence) else [seed]
    entropy = [int(s) for s in seeds] + [int(index)]
    if any(s < 0 for s in entropy):
        raise ValueError(f"seed {seed!r} and index {index} must be non-negative integers")
    state = np.random.SeedSequence(entropy).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 ^ int(state[1]))


class EpochSampler(Sampler):
    """Yields (epoch, index) pairs, shuffled by a generator seeded from (seed, epoch): a dataset that
    draws each sample's randomness from (seed, epoch, index) then gives an epoch's batches as a
    function of those only, whatever the number of workers or where a run was resumed. Lightning
    calls `set_epoch` every epoch (also through its DistributedSamplerWrapper under DDP)."""

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True):
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.n, generator=seeded_generator([self.seed, _ORDER], self.epoch)).tolist()
        else:
            order = range(self.n)
        return iter([(self.epoch, int(i)) for i in order])

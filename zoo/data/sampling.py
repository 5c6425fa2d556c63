"""Seeded randomness for datasets and exact resume: every random draw of a training sample is a
function of (seed, epoch, index) only, and the order of an epoch a function of (seed, epoch), so data
are the same whatever the number of workers or devices, and a run resumed mid-epoch continues with
the batch the uninterrupted run would have drawn next."""
from __future__ import annotations

import math
import os
import random
from collections.abc import Callable, Sequence
from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

__all__ = ["seeded_generator", "seeded_item", "split_item", "training_seed", "EpochSampler", "batches_done"]

_ORDER = 11  # stream id of the shuffling order, apart from the streams datasets draw samples from


def _seed_int(seed: int | Sequence[int], index: int) -> int:
    seeds = list(seed) if isinstance(seed, Sequence) else [seed]
    entropy = [int(s) for s in seeds] + [int(index)]
    if any(s < 0 for s in entropy):
        raise ValueError(f"seed {seed!r} and index {index} must be non-negative integers")
    state = np.random.SeedSequence(entropy).generate_state(2, np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


def seeded_generator(seed: int | Sequence[int], index: int) -> torch.Generator:
    """A torch generator for item `index` of the stream `seed` (an int or a sequence of ints)."""
    return torch.Generator().manual_seed(_seed_int(seed, index))


@contextmanager
def seeded_item(seed: int | Sequence[int], index: int):
    """Runs third-party random transforms (torchvision/timm draw from torch's and Python's global
    generators) with both generators seeded by (seed, index), restoring them afterwards."""
    state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        s = _seed_int(seed, index)
        torch.manual_seed(s)
        random.seed(s)
        try:
            yield
        finally:
            random.setstate(state)


def training_seed(data_seed: int) -> int:
    """The seed of a run's training order and augmentation: the data seed (which alone fixes the
    splits) combined with the run's seed (`seed_everything`, which Lightning keeps in PL_GLOBAL_SEED).
    Runs with different seeds then see the same split in different orders; runs with the same seed,
    whatever else differs between them (the norm), the same batches."""
    run = os.environ.get("PL_GLOBAL_SEED")
    return int(data_seed) if run is None else _seed_int([int(data_seed), int(run)], 0) % 2**31


def split_item(item) -> tuple[int, int]:
    """(epoch, index) of a dataset item given as an index or as EpochSampler's (epoch, index)."""
    return (int(item[0]), int(item[1])) if isinstance(item, tuple) else (0, int(item))


def batches_done(trainer) -> int:
    """Training batches the fit loop has already run in its current epoch when it asks for the next
    one: non-zero only in the first epoch after resuming from a mid-epoch checkpoint (Lightning has
    restored its progress counters by then)."""
    if trainer is None or not trainer.training:
        return 0
    return trainer.fit_loop.epoch_loop.batch_progress.current.ready


class EpochSampler(DistributedSampler):
    """Yields (epoch, index) pairs (or plain indices with `with_epoch=False`) in an order drawn from a
    generator seeded by (seed, epoch): a permutation of range(n), or with `num_samples` that many
    indices drawn with replacement (nanoGPT's random windows).

    Under DDP each rank takes every world-size-th item of the padded order (as torch's
    DistributedSampler); being a DistributedSampler itself, Lightning calls its `set_epoch` and does
    not wrap it. `skip()` (e.g. `lambda: batches_done(trainer) * batch_size`) is asked, when an epoch's
    iteration starts, how many of this rank's items the run has already trained on: a resumed run
    then draws exactly the batches the uninterrupted run would have.
    """

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True, num_samples: int | None = None,
                 with_epoch: bool = True, skip: Callable[[], int] | None = None):
        # DistributedSampler.__init__ needs a process group, which exists only once training starts:
        # ranks are read when an epoch starts instead.
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0
        self.total = n if num_samples is None else num_samples
        self.replacement, self.with_epoch, self.skip = num_samples is not None, with_epoch, skip

    @staticmethod
    def _ranks() -> tuple[int, int]:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    @classmethod
    def for_training(cls, datamodule, n: int, seed: int, batch_size: int, **kwargs) -> "EpochSampler":
        """The training sampler of `datamodule`: it resumes where its trainer's fit loop stands."""
        return cls(n, seed, skip=lambda: batches_done(datamodule.trainer) * batch_size, **kwargs)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return math.ceil(self.total / self._ranks()[1])

    def __iter__(self):
        g = seeded_generator([self.seed, _ORDER], self.epoch)
        if self.replacement:
            order = torch.randint(self.n, (self.total,), generator=g).tolist()
        elif self.shuffle:
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        rank, world = self._ranks()
        order += order[: len(self) * world - len(order)]  # pad so every rank gets as many items
        mine = order[rank::world][self.skip() if self.skip else 0:]
        return iter([(self.epoch, i) for i in mine] if self.with_epoch else mine)

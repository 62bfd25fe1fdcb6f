"""The training shuffle as a function of (seed, epoch): a resumed run draws the batches it would have drawn."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochShuffleSampler(Sampler[int]):
    """A random permutation per epoch from its own generator, seeded from ``seed`` and the epoch that
    Lightning sets (``set_epoch``) before each epoch, never from the global RNG: the order of epoch N is the
    same whether the run went straight through or was resumed from a checkpoint at epoch N."""

    def __init__(self, length: int, seed: int):
        self.length = int(length)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())


def iterator_seed_generator(seed: int) -> torch.Generator:
    """A generator for a DataLoader that runs in this process (no workers).

    Every ``iter(loader)`` draws a worker base seed, from torch's global generator unless the loader has its
    own; without workers that seed is never used, but the draw still moves the global stream. Lightning
    creates the first epoch's iterator of a fit before ``on_train_epoch_start`` (where ``EpochSeed``
    reseeds) and later epochs' after it, so the first epoch after a resume drew its dropout masks and
    cached-view choices one step off the uninterrupted run's. With this generator the global stream is
    a function of (seed, epoch) again."""
    return torch.Generator().manual_seed(int(seed))

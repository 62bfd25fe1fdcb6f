"""Per-epoch seeding: every epoch's random draws depend only on the run's seed and the epoch number."""

from __future__ import annotations

import random

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback


def epoch_seed(seed: int, epoch: int) -> int:
    """A distinct, reproducible 32-bit seed per (seed, epoch)."""
    return (int(seed) * 1_000_003 + int(epoch) * 7_919 + 17) % 2**32


class EpochSeed(Callback):
    """Reseeds Python, NumPy and torch at the start of every training epoch.

    ``seed_everything`` seeds a run once; after that, epoch N's dropout masks and cached-view draws depend
    on everything drawn before it (how many batches feature caching or the sanity check consumed, whether
    the run was resumed). Reseeding from ``(seed, epoch)`` makes them a function of the epoch alone (the
    shuffle order has its own generator: ``EpochShuffleSampler``), so a run resumed from ``last.ckpt`` ends
    with the uninterrupted run's weights, and a cold and a warm feature cache give the same run.
    """

    def __init__(self, seed: int = 42):
        super().__init__()
        self.seed = int(seed)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        value = epoch_seed(self.seed, trainer.current_epoch) + trainer.global_rank
        random.seed(value)
        np.random.seed(value)
        torch.manual_seed(value)

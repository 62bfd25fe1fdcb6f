"""``last.ckpt`` really is the last finished epoch.

Lightning's ``ModelCheckpoint(save_last=True)`` follows the last *saved* top-k checkpoint on a local disk
(Lightning #19325), so with ``save_top_k=1`` ``last.ckpt`` was a copy of the best epoch and a killed run
repeated every epoch since the last improvement. This callback owns ``last.ckpt`` alone: written at the end
of every training epoch (after validation, so the checkpoint holds the whole epoch) and when training ends.
The best epoch stays with ``ModelCheckpoint(monitor=val/acc)``.

Every checkpoint file (these, and ``ModelCheckpoint``'s) is written by :class:`AtomicCheckpointIO`: to a
temporary name in its own folder, then renamed. Lightning's own save writes a temporary file in the system
temporary directory and *copies* it when that is another filesystem, so a full disk left a truncated
``best-epoch000.ckpt`` under its final name; a kill mid-write or a full disk now leaves the previous file.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from foodvision.atomic import DiskWriteError, describe_os_error, save_torch


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a per-process temporary name beside the checkpoint, then a rename (local paths;
    remote URLs keep Lightning's transaction). A failed write raises :class:`foodvision.atomic.DiskWriteError`
    naming the checkpoint.

    ``run_dir``: the folder a run writes into. If it disappears while training (deleted by hand), saving
    fails with a clear error instead of recreating a run dir that holds nothing but checkpoints."""

    def __init__(self, run_dir: str | os.PathLike[str] | None = None) -> None:
        self.run_dir = Path(run_dir).absolute() if run_dir is not None else None

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = Path(path)
        folder = path.parent.absolute()
        if self.run_dir is not None and folder.is_relative_to(self.run_dir) and not self.run_dir.is_dir():
            gone = OSError(errno.ENOENT, os.strerror(errno.ENOENT), str(self.run_dir))
            raise DiskWriteError(describe_os_error(gone, path))
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise DiskWriteError(describe_os_error(error, path)) from error
        save_torch(path, checkpoint)


def use_atomic_checkpoints(trainer: L.Trainer, run_dir: str | os.PathLike[str] | None = None) -> None:
    """Make ``trainer`` save every checkpoint with :class:`AtomicCheckpointIO`, unless it was given another
    checkpoint IO plugin than Lightning's default (the user's choice stays)."""
    strategy = trainer.strategy
    current = strategy.checkpoint_io
    if isinstance(current, AtomicCheckpointIO):
        if run_dir is not None:
            current.run_dir = Path(run_dir).absolute()
    elif type(current) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO(run_dir)


class LastCheckpoint(Checkpoint):
    def __init__(self, dirpath: str, filename: str = "last.ckpt"):
        super().__init__()
        self.path = Path(dirpath) / filename
        self._saved_step: int | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        use_atomic_checkpoints(trainer)  # also when the trainer was built without train.py

    def _save(self, trainer: L.Trainer) -> None:
        if trainer.sanity_checking or self._saved_step == trainer.global_step:
            return
        trainer.save_checkpoint(self.path, weights_only=False)  # the full state: resume needs the optimizer
        self._saved_step = trainer.global_step

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer)  # a clean stop (max_steps, early stopping, fast_dev_run) between epoch ends

"""``last.ckpt`` really is the last finished epoch.

Lightning's ``ModelCheckpoint(save_last=True)`` follows the last *saved* top-k checkpoint on a local disk
(Lightning #19325), so with ``save_top_k=1`` ``last.ckpt`` was a copy of the best epoch and a killed run
repeated every epoch since the last improvement. This callback owns ``last.ckpt`` alone: written at the end
of every training epoch (after validation, so the checkpoint holds the whole epoch) and when training ends,
through Lightning's atomic save (a kill mid-write never leaves a half file). The best epoch stays with
``ModelCheckpoint(monitor=val/acc)``.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Checkpoint


class LastCheckpoint(Checkpoint):
    def __init__(self, dirpath: str, filename: str = "last.ckpt"):
        super().__init__()
        self.path = Path(dirpath) / filename
        self._saved_step: int | None = None

    def _save(self, trainer: L.Trainer) -> None:
        if trainer.sanity_checking or self._saved_step == trainer.global_step:
            return
        trainer.save_checkpoint(self.path, weights_only=False)  # the full state: resume needs the optimizer
        self._saved_step = trainer.global_step

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer)  # a clean stop (max_steps, early stopping, fast_dev_run) between epoch ends

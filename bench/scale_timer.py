"""A bench-only Lightning callback (section scale): when extraction and each epoch's training part start
and end, written as JSON to ``out`` at the end of fitting. Added to train.py on the command line
(``+callbacks.scale_timer._target_=scale_timer.EpochTimes``, with bench/ on PYTHONPATH)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback


class EpochTimes(Callback):
    """``setup`` runs after the datamodule's (the image check) and before any ``on_fit_start`` (the feature
    cache's extraction): the time from it to epoch 0's start is the extraction (with the backbone export)."""

    def __init__(self, out: str):
        self.out = Path(out)
        self.times: dict[str, Any] = {"epochs": {}}

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.times.setdefault("setup", time.time())

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self.times["epochs"][str(trainer.current_epoch)] = {
            "start": time.time(),
            "rows": len(trainer.train_dataloader.dataset) if trainer.train_dataloader is not None else None,
        }

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        epoch = self.times["epochs"].get(str(trainer.current_epoch))
        if (
            epoch is not None and batch is not None
        ):  # photos trained on (limit_train_batches may cut an epoch)
            targets = batch["targets"] if isinstance(batch, dict) else batch[1]
            epoch["samples"] = epoch.get("samples", 0) + len(targets)

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        epoch = self.times["epochs"].get(str(trainer.current_epoch))
        if epoch is not None and not trainer.sanity_checking:
            epoch.setdefault("train_end", time.time())

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self.times["fit_end"] = time.time()
        self.out.write_text(json.dumps(self.times, indent=1))

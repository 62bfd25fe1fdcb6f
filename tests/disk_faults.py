"""Test-only callbacks that break the run dir while training (used by tests/test_disk.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class DeleteRunDir(Callback):
    """Deletes the run dir (``trainer.default_root_dir``) when the first validation starts, as a user
    cleaning up ``lightning_logs/`` by hand while a run goes on would."""

    def on_validation_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        if not trainer.sanity_checking:
            shutil.rmtree(Path(trainer.default_root_dir), ignore_errors=True)

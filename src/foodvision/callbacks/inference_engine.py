"""Testing and prediction through the fastest engine for the hardware.

``trainer.test`` after fitting runs the whole network on every test image; on a CPU in float32, ONNX
Runtime does that several times faster than eager PyTorch (see ``foodvision.engine``). The callback
exports the module's network as it is when testing starts (the best checkpoint's weights, loaded by
Lightning just before) and routes image batches through it until testing ends; training and validation
stay in PyTorch (they need gradients, or run on cached features anyway).
"""

from __future__ import annotations

import logging

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from foodvision.engine import onnxruntime_or_none, resolve_engine

log = logging.getLogger(__name__)


class InferenceEngine(Callback):
    """``engine``: ``auto`` (ONNX Runtime for float32 on a CPU, single process), ``torch`` or ``onnxruntime``."""

    def __init__(self, engine: str = "auto"):
        super().__init__()
        self.engine = engine
        self.used: str | None = None

    def _attach(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        engine = resolve_engine(self.engine, pl_module.device, str(trainer.precision))
        if engine == "onnxruntime" and trainer.world_size > 1:
            engine = "torch"  # every rank would export its own copy; DDP testing stays in PyTorch
        self.used = engine
        if engine != "onnxruntime":
            return
        size = pl_module.preprocessing.image_size
        example = torch.zeros(1, 3, size, size)
        pl_module.image_runner = onnxruntime_or_none(pl_module.net, example, ["output"], self.engine)
        if pl_module.image_runner is None:
            self.used = "torch"
            return
        log.info("testing with ONNX Runtime (float32): the network as of now, exported in memory")

    def _detach(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.image_runner = None

    on_test_start = _attach
    on_predict_start = _attach
    on_test_end = _detach
    on_predict_end = _detach

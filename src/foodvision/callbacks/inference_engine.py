"""Testing and prediction through the fastest engine for the hardware.

``trainer.test`` after fitting runs the whole network on every test image; on a CPU in float32, ONNX
Runtime does that several times faster than eager PyTorch (see ``foodvision.engine``). The callback
exports the module's network as it is when testing starts (the best checkpoint's weights, loaded by
Lightning just before) and routes image batches through it until testing ends; training and validation
stay in PyTorch (they need gradients, or run on cached features anyway). Whatever the test loader's batch
size, ONNX Runtime runs it in chunks whose working memory fits ``max_memory_mb`` (default:
:func:`foodvision.engine.default_max_memory_mb`), so testing does not raise the process's peak memory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from foodvision.engine import ChunkedForward, onnxruntime_or_none, resolve_engine, torch_max_batch

log = logging.getLogger(__name__)


def torch_forward(pl_module: L.LightningModule) -> Callable[[torch.Tensor], torch.Tensor]:
    """The module's own image forward (channels_last when it trains so), without the runner."""
    channels_last = bool(pl_module.hparams.get("channels_last", False))

    def forward(images: torch.Tensor) -> torch.Tensor:
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return pl_module.net(images)

    return forward


class InferenceEngine(Callback):
    """``engine``: ``auto`` (ONNX Runtime for float32 on a CPU, single process), ``torch`` or ``onnxruntime``;
    ``max_memory_mb``: working memory of one ONNX Runtime run (``None``: the default budget)."""

    def __init__(self, engine: str = "auto", max_memory_mb: float | None = None):
        super().__init__()
        self.engine = engine
        self.max_memory_mb = max_memory_mb
        self.used: str | None = None

    def _attach(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        engine = resolve_engine(self.engine, pl_module.device, str(trainer.precision))
        if engine == "onnxruntime" and trainer.world_size > 1:
            engine = "torch"  # every rank would export its own copy; DDP testing stays in PyTorch
        self.used = engine
        pl_module.image_runner = None
        size = pl_module.preprocessing.image_size
        if engine == "onnxruntime":
            example = torch.zeros(1, 3, size, size)
            pl_module.image_runner = onnxruntime_or_none(
                pl_module.net, example, ["output"], self.engine, self.max_memory_mb
            )
        if pl_module.image_runner is None:
            self.used = "torch"
            if pl_module.device.type == "cpu":  # the same memory bound for PyTorch on a CPU (bf16 there)
                max_batch = torch_max_batch(pl_module.net, size, self.max_memory_mb, str(trainer.precision))
                pl_module.image_runner = ChunkedForward(torch_forward(pl_module), max_batch)
            return
        log.info(
            "testing with ONNX Runtime (float32): the network as of now, exported in memory; up to %d images "
            "per run",
            pl_module.image_runner.max_batch,
        )

    def _detach(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.image_runner = None

    on_test_start = _attach
    on_predict_start = _attach
    on_test_end = _detach
    on_predict_end = _detach

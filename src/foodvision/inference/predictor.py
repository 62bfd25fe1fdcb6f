"""Run a trained model (Lightning checkpoint, exported TorchScript or ONNX file) on batches of photos.

Checkpoints run with PyTorch or, for float32 work on a CPU (``engine=auto``), with ONNX Runtime from an
in-memory export of their weights: same logits, several times faster there (see :mod:`foodvision.inference.engine`).
Loading is :mod:`foodvision.inference.checkpoints`; reading photos in batches is :mod:`foodvision.inference.batches`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from foodvision.data.transforms import Preprocessing
from foodvision.errors import ToolError
from foodvision.hardware import autocast, inference_precision
from foodvision.inference.calibration import Calibration
from foodvision.inference.checkpoints import (
    load_checkpoint_model,
    load_onnx_file,
    load_torchscript_file,
    model_format,
    require_file,
)
from foodvision.inference.engine import (
    ENGINES,
    OnnxRuntimeModule,
    batch_for_memory,
    default_max_memory_mb,
    graph_bytes_per_image,
    module_bytes_per_image,
    onnxruntime_available,
    resolve_engine,
    run_in_chunks,
)

log = logging.getLogger(__name__)


# ---- precision and device ------------------------------------------------------------------------------
def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(str(device))


def check_engine(engine: Any) -> str:
    """``auto``, ``torch`` or ``onnxruntime`` (``None``: auto), else a ToolError saying what is accepted."""
    value = "auto" if engine is None else str(engine).lower()
    if value not in ENGINES:
        raise ToolError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if value == "onnxruntime" and not onnxruntime_available():
        raise ToolError("engine=onnxruntime needs onnxruntime: pip install onnxruntime")
    return value


def check_max_memory_mb(value: Any) -> float | None:
    """``None`` (the default budget) or a positive number of MB, else a ToolError."""
    if value in (None, "", "auto"):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = -1.0
    if not number > 0:
        raise ToolError(
            f"max_memory_mb must be a positive number of MB (or null for the default), got {value!r}"
        )
    return number


def check_batch_size(value: Any) -> int | None:
    """``None`` (chosen from the memory budget) or a positive integer, else a ToolError."""
    if value in (None, "", "auto"):
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1 or str(number) != str(value).strip():
        raise ToolError(
            f"batch_size must be a positive integer (or null: chosen from max_memory_mb), got {value!r}"
        )
    return number


def check_trust_torchscript(value: Any) -> bool:
    """``trust_torchscript`` as a bool; anything but true/false is refused rather than read as trust."""
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ToolError(f"trust_torchscript must be true or false, got {value!r}")
    return value


class Predictor:
    """Normalised NCHW float images -> float32 logits, for any model format.

    Checkpoints run with ``engine`` (:func:`foodvision.inference.engine.resolve_engine`; ``auto``: ONNX Runtime for
    float32 on a CPU, else PyTorch in ``torch.inference_mode`` with channels_last inputs and bf16 autocast
    where supported). Exported ``.onnx`` files always run with ONNX Runtime, TorchScript files with PyTorch,
    and only with ``trust_torchscript=True``: TorchScript is a program that runs when loaded.

    ``max_batch``: images per forward pass, chosen so that its working memory fits ``max_memory_mb``
    (default :func:`foodvision.inference.engine.default_max_memory_mb`); :meth:`use_batch_size` sets it explicitly.
    Larger batches are run in chunks of ``max_batch``, so memory stays bounded whatever a caller passes.
    """

    def __init__(
        self,
        path: str | Path,
        device: str | None = "auto",
        precision: Any = "auto",
        engine: str | None = "auto",
        max_memory_mb: float | None = None,
        trust_torchscript: bool = False,
    ):
        requested = check_engine(engine)
        trust_torchscript = check_trust_torchscript(trust_torchscript)
        self.max_memory_mb = check_max_memory_mb(max_memory_mb) or default_max_memory_mb()
        self.path = require_file(path, "model file")
        self.format = model_format(self.path)
        self.checkpoint: dict[str, Any] | None = None
        self.runner: OnnxRuntimeModule | None = None
        if self.format == "checkpoint":
            if requested == "onnxruntime":  # device/precision auto: the CPU float32 it runs
                device = "cpu" if device in (None, "auto") else device
                precision = "32" if str(precision).lower() == "auto" else precision
            self.device = resolve_device(device)
            self.precision = inference_precision(precision, self.device)
            self.engine = resolve_engine(requested, self.device, self.precision)
            if self.engine == "onnxruntime" and (self.device.type != "cpu" or self.precision != "32"):
                raise ToolError(
                    f"engine=onnxruntime runs float32 on the CPU, not {self.device.type} "
                    f"{'bf16' if self.precision == 'bf16' else 'float32'}: use device=cpu precision=32, "
                    "or engine=torch"
                )
            model, self.info, self.checkpoint = load_checkpoint_model(self.path)
            if self.engine == "onnxruntime":
                self.model: Any = model.float()
                self.runner = self._onnxruntime(model, explicit=requested == "onnxruntime")
            if self.runner is None:
                self.engine = "torch"
                self.model = model.to(self.device, memory_format=torch.channels_last)
        else:
            self.device = torch.device("cpu") if self.format == "onnx" else resolve_device(device)
            self.engine = "onnxruntime" if self.format == "onnx" else "torch"
            if self.format == "onnx":
                self.model, self.info = load_onnx_file(self.path)
            else:
                self.model, self.info = load_torchscript_file(self.path, self.device, trust_torchscript)
            if requested not in ("auto", self.engine):
                log.warning("%s files run with %s; engine=%s ignored", self.format, self.engine, requested)
            requested_precision = inference_precision(precision, self.device)
            if requested_precision != "32" and str(precision).lower() != "auto":
                log.warning("exported models run in float32; precision=%s ignored", precision)
            self.precision = "32"
        self.max_batch = self._batch_for_memory()

    def _batch_for_memory(self) -> int:
        """Images per forward pass that fit ``max_memory_mb``, from the network's working memory per image."""
        if self.runner is not None:
            return self.runner.max_batch
        size = self.preprocessing.image_size
        if self.format == "onnx":
            per_image = graph_bytes_per_image(self.path.read_bytes())
        elif self.format == "checkpoint":
            per_image = module_bytes_per_image(self.model, torch.zeros(1, 3, size, size, device=self.device))
            if per_image and self.precision == "bf16":
                per_image //= 2  # activations in bf16 under autocast
        else:
            per_image = None  # TorchScript: no estimate, the fixed fallback
        return batch_for_memory(per_image, self.max_memory_mb)

    def use_batch_size(self, batch_size: int | None) -> int:
        """The batch size to read images in: ``batch_size`` when given (then also the forward pass's, even
        beyond the memory budget: what the user asked for), else :attr:`max_batch`."""
        if batch_size:
            self.max_batch = int(batch_size)
            if self.runner is not None:
                self.runner.max_batch = self.max_batch
        return self.max_batch

    def _onnxruntime(self, model: nn.Module, explicit: bool) -> OnnxRuntimeModule | None:
        """``model`` exported (in memory) and loaded by ONNX Runtime; ``None`` (run it with PyTorch) where
        that fails and ONNX Runtime was only chosen by ``engine=auto``."""
        size = self.info.preprocessing.image_size
        try:
            return OnnxRuntimeModule(
                model,
                torch.zeros(1, 3, size, size),
                output_names=("logits",),
                max_memory_mb=self.max_memory_mb,
            )
        except Exception as error:  # noqa: BLE001 - the exporter and ORT raise many types
            if explicit:
                raise ToolError(
                    f"engine=onnxruntime cannot run {self.info.architecture} from {self.path}: "
                    f"{type(error).__name__}: {error}; use engine=torch"
                ) from error
            log.warning(
                "ONNX Runtime cannot run %s (%s: %s); running it with PyTorch",
                self.info.architecture,
                type(error).__name__,
                error,
            )
            return None

    @property
    def class_names(self) -> list[str]:
        return self.info.class_names

    @property
    def preprocessing(self) -> Preprocessing:
        return self.info.preprocessing

    def describe(self) -> str:
        precision = "bf16 autocast" if self.precision == "bf16" else "float32"
        return (
            f"{self.path} ({self.format}): {self.info.architecture}, {self.info.num_classes} classes, "
            f"{self.preprocessing.image_size} px, {self.device.type} {precision} on {self.engine}"
        )

    @property
    def calibration(self) -> Calibration:
        return self.info.calibration

    def set_calibration(self, calibration: Calibration) -> None:
        """Use ``calibration`` from now on (after ``eval.py calibrate=true`` fitted and saved it)."""
        self.info = dataclasses.replace(self.info, calibration=calibration)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Calibrated logits: the network's divided by the model's temperature (exported files divide in
        their graph, see :mod:`foodvision.inference.export`); softmax of them gives calibrated probabilities."""
        logits = self.network_logits(images)
        calibration = self.info.calibration
        if calibration.in_graph or calibration.temperature == 1.0:
            return logits
        return logits / calibration.temperature

    def network_logits(self, images: torch.Tensor) -> torch.Tensor:
        """What the model file computes (for exports with a temperature: already calibrated)."""
        if self.format == "onnx":
            output = run_in_chunks(self.model, images.float().contiguous().numpy(), self.max_batch)[0]
            return torch.from_numpy(np.asarray(output, dtype=np.float32))
        size = self.preprocessing.image_size
        if self.runner is not None and tuple(images.shape[-2:]) == (size, size):
            return self.runner(images).float()  # exported at this size; other sizes run with PyTorch below
        if len(images) > self.max_batch:
            return torch.cat([self.network_logits(chunk) for chunk in images.split(self.max_batch)])
        images = images.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), autocast(self.device, self.precision):
            return self.model(images).float().cpu()


def predictor_from_config(cfg: Any, ckpt_path: str | Path) -> tuple[Predictor, int]:
    """A tool's model (``device``, ``precision``, ``engine``, ``max_memory_mb`` of its config) and the batch
    size it reads images in (``batch_size``, else what the memory budget allows); logs what it runs."""
    predictor = Predictor(
        ckpt_path,
        cfg.get("device", "auto"),
        cfg.get("precision", "auto"),
        cfg.get("engine", "auto"),
        max_memory_mb=cfg.get("max_memory_mb"),
        trust_torchscript=cfg.get("trust_torchscript", False),
    )
    batch_size = predictor.use_batch_size(check_batch_size(cfg.get("batch_size")))
    log.info("model: %s; batches of %d images", predictor.describe(), batch_size)
    return predictor, batch_size


def measure_throughput(
    model: nn.Module, image_size: int, precision: str = "32", batch_size: int = 32, iterations: int = 3
) -> float:
    """Images per second of a forward pass on a fixed random batch (CPU, channels_last, after one warm-up)."""
    device = torch.device("cpu")
    model = model.eval().to(device, memory_format=torch.channels_last)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    images = images.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), autocast(device, precision):
        model(images)
        started = time.perf_counter()
        for _ in range(iterations):
            model(images)
        seconds = time.perf_counter() - started
    return batch_size * iterations / seconds

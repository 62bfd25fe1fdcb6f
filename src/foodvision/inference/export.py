"""`python export.py ckpt_path=... format=onnx|torchscript|app [output=...]`: a self-contained model file.

The exported model maps normalised float32 NCHW images (any batch size) to calibrated logits (the
checkpoint's temperature, :mod:`foodvision.inference.calibration`, is a division in the graph: any runtime's softmax
gives calibrated probabilities). Class names, preprocessing and the calibration (its unknown threshold
too) travel inside the file as JSON (TorchScript: extra file ``foodvision.json``; ONNX: the
``foodvision.json`` entry of ``metadata_props``), so ``predict.py ckpt_path=model.onnx`` needs nothing else (a ``.pt`` also
``trust_torchscript=true``: TorchScript is a program).
ONNX export uses the ``onnx`` package (a dependency of foodvision, also listed in its ``[onnx]`` extra).
``format=app`` writes a folder instead: a Gradio app around the ONNX file that needs no PyTorch
(:mod:`foodvision.app.package`).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from foodvision.atomic import atomic_open, ensure_dir, write_with
from foodvision.cli import required
from foodvision.errors import ToolError
from foodvision.inference.checkpoints import (
    META_KEY,
    ModelInfo,
    export_metadata,
    load_checkpoint_model,
    quiet_jit,
    run_dir_of,
)
from foodvision.inference.predictor import Predictor

log = logging.getLogger(__name__)

FORMATS = {"torchscript": ".pt", "onnx": ".onnx", "app": ""}


def default_output(ckpt_path: Path, fmt: str) -> Path:
    """``<run dir>/export/<checkpoint name>.pt|.onnx``, or the folder ``<run dir>/export/app``."""
    if fmt == "app":
        return run_dir_of(ckpt_path) / "export" / "app"
    return run_dir_of(ckpt_path) / "export" / f"{ckpt_path.stem}{FORMATS[fmt]}"


def example_input(info: ModelInfo, batch: int = 2) -> torch.Tensor:
    size = info.preprocessing.image_size
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


class TemperatureScaled(nn.Module):
    """The network's logits divided by its calibration temperature (:mod:`foodvision.inference.calibration`): an
    exported graph outputs calibrated logits, so any runtime's softmax gives calibrated probabilities."""

    def __init__(self, network: nn.Module, temperature: float):
        super().__init__()
        self.network = network
        self.register_buffer("temperature", torch.tensor(float(temperature), dtype=torch.float32))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(images) / self.temperature


def with_calibration(model: nn.Module, info: ModelInfo) -> tuple[nn.Module, ModelInfo]:
    """The module to export (the temperature in its graph) and the metadata to write with it (its
    calibration marked ``in_graph``: loaders never divide again)."""
    calibration = info.calibration
    if calibration.in_graph:
        return model, info
    exported = dataclasses.replace(info, calibration=dataclasses.replace(calibration, in_graph=True))
    if calibration.temperature == 1.0:
        return model, exported
    return TemperatureScaled(model, calibration.temperature).eval(), exported


def export_torchscript(model: nn.Module, info: ModelInfo, output: Path, source: str) -> Path:
    model, info = with_calibration(model, info)
    extra = {META_KEY: export_metadata(info, format="torchscript", exported_from=source)}
    with torch.no_grad(), quiet_jit():
        traced = torch.jit.trace(model, example_input(info), check_trace=False)
    with atomic_open(output, "wb") as handle:  # a handle: a full disk raises OSError, not a bare RuntimeError
        torch.jit.save(traced, handle, _extra_files=extra)
    return output


def export_onnx(model: nn.Module, info: ModelInfo, output: Path, source: str, opset: int = 17) -> Path:
    try:
        import onnx
    except ImportError as error:
        raise ToolError("format=onnx needs the onnx package: pip install 'foodvision[onnx]'") from error
    model, info = with_calibration(model, info)
    # Exported into memory, given its metadata, then written under a temporary name and renamed: the final
    # name never holds a file without metadata (or half a file when the disk is full).
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript-based exporter: needs only `onnx` (the dynamo one also wants onnxscript).
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (example_input(info),),
            buffer,
            dynamo=False,
            input_names=["images"],
            output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=int(opset),
        )
    proto = onnx.load_from_string(buffer.getvalue())
    del buffer
    entry = proto.metadata_props.add()
    entry.key = META_KEY
    entry.value = export_metadata(info, format="onnx", exported_from=source)
    proto.doc_string = f"foodvision {info.architecture}: normalised NCHW float32 images -> logits"
    onnx.checker.check_model(proto)
    write_with(output, lambda temporary: onnx.save(proto, str(temporary)))
    return output


def check_export(model: nn.Module, info: ModelInfo, output: Path, tolerance: float = 1e-3) -> float:
    """Largest absolute logit difference between the exported file and the checkpoint's model (float32)."""
    exported = Predictor(output, device="cpu", precision="32", trust_torchscript=True)  # written just now
    if exported.class_names != info.class_names or exported.preprocessing != info.preprocessing:
        raise ToolError(f"{output}: the metadata read back differs from the checkpoint's")
    images = example_input(info, batch=3)  # another batch size than traced with
    with torch.inference_mode():
        expected = with_calibration(model, info)[0](images).float()  # the calibrated logits
    difference = float((exported.logits(images) - expected).abs().max())
    scale = max(1.0, float(expected.abs().max()))
    if difference > tolerance * scale:
        raise ToolError(f"{output}: exported logits differ from the checkpoint's by {difference:.2e}")
    return difference


def check_format(cfg: DictConfig) -> str:
    """``cfg.format``, lower-cased, or a ToolError naming the formats."""
    fmt = str(cfg.get("format", "onnx")).lower()
    if fmt not in FORMATS:
        raise ToolError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    return fmt


def export_model(cfg: DictConfig) -> dict[str, Any]:
    """One model file of a checkpoint (``format=onnx|torchscript``), checked against it; the other formats
    (``quantize=int8``, ``format=app``) build on it in :mod:`foodvision.cli.export`."""
    ckpt_path = Path(required(cfg, "ckpt_path", "ckpt_path=<run>/checkpoints/last.ckpt")).expanduser()
    fmt = check_format(cfg)
    model, info, _ = load_checkpoint_model(ckpt_path)
    model = model.float().eval()
    output = Path(cfg.output).expanduser() if cfg.get("output") else default_output(ckpt_path, fmt)
    ensure_dir(output.parent)
    if fmt == "torchscript":
        export_torchscript(model, info, output, ckpt_path.name)
    else:
        export_onnx(model, info, output, ckpt_path.name, int(cfg.get("opset", 17)))
    result: dict[str, Any] = {"output": str(output), "format": fmt, "size_mb": output.stat().st_size / 1e6}
    if cfg.get("check", True):
        result["max_abs_logit_difference"] = check_export(model, info, output)
    check = (
        f"; logits match the checkpoint (max |difference| {result['max_abs_logit_difference']:.1e})"
        if "max_abs_logit_difference" in result
        else ""
    )
    print(
        f"exported {info.architecture} ({info.num_classes} classes, {info.preprocessing.image_size} px) "
        f"as {fmt}: "
        f"{output} ({result['size_mb']:.1f} MB){check}\n"
        f"use it with: python predict.py ckpt_path={output} inputs=[photo.jpg]"
        + (" trust_torchscript=true" if fmt == "torchscript" else ""),
        flush=True,
    )
    return result

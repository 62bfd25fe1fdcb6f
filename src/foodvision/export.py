"""`python export.py ckpt_path=... format=torchscript|onnx|app [output=...]`: a self-contained model file.

The exported model maps normalised float32 NCHW images (any batch size) to logits. Class names and
preprocessing travel inside the file as JSON (TorchScript: extra file ``foodvision.json``; ONNX: the
``foodvision.json`` entry of ``metadata_props``), so ``predict.py ckpt_path=model.pt`` needs nothing else.
ONNX export uses the ``onnx`` package (a dependency of foodvision, also listed in its ``[onnx]`` extra).
``format=app`` writes a folder instead: a Gradio app around the ONNX file that needs no PyTorch
(:mod:`foodvision.app_export`).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig
from torch import nn

from foodvision.checkpoints import (
    META_KEY,
    ModelInfo,
    export_metadata,
    load_checkpoint_model,
    quiet_jit,
    run_dir_of,
)
from foodvision.cli import CONFIG_DIR, required, run_tool
from foodvision.errors import ToolError
from foodvision.inference import Predictor

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


def export_torchscript(model: nn.Module, info: ModelInfo, output: Path, source: str) -> Path:
    extra = {META_KEY: export_metadata(info, format="torchscript", exported_from=source)}
    with torch.no_grad(), quiet_jit():
        traced = torch.jit.trace(model, example_input(info), check_trace=False)
        torch.jit.save(traced, str(output), _extra_files=extra)
    return output


def export_onnx(model: nn.Module, info: ModelInfo, output: Path, source: str, opset: int = 17) -> Path:
    try:
        import onnx
    except ImportError as error:
        raise ToolError("format=onnx needs the onnx package: pip install 'foodvision[onnx]'") from error
    with warnings.catch_warnings():
        # The TorchScript-based exporter: needs only `onnx` (the dynamo one also wants onnxscript).
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (example_input(info),),
            str(output),
            dynamo=False,
            input_names=["images"],
            output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=int(opset),
        )
    proto = onnx.load(str(output))
    entry = proto.metadata_props.add()
    entry.key = META_KEY
    entry.value = export_metadata(info, format="onnx", exported_from=source)
    proto.doc_string = f"foodvision {info.architecture}: normalised NCHW float32 images -> logits"
    onnx.checker.check_model(proto)
    onnx.save(proto, str(output))
    return output


def check_export(model: nn.Module, info: ModelInfo, output: Path, tolerance: float = 1e-3) -> float:
    """Largest absolute logit difference between the exported file and the checkpoint's model (float32)."""
    exported = Predictor(output, device="cpu", precision="32")
    if exported.class_names != info.class_names or exported.preprocessing != info.preprocessing:
        raise ToolError(f"{output}: the metadata read back differs from the checkpoint's")
    images = example_input(info, batch=3)  # another batch size than traced with
    with torch.inference_mode():
        expected = model(images).float()
    difference = float((exported.logits(images) - expected).abs().max())
    scale = max(1.0, float(expected.abs().max()))
    if difference > tolerance * scale:
        raise ToolError(f"{output}: exported logits differ from the checkpoint's by {difference:.2e}")
    return difference


def export(cfg: DictConfig) -> dict[str, Any]:
    ckpt_path = Path(required(cfg, "ckpt_path", "ckpt_path=<run>/checkpoints/last.ckpt")).expanduser()
    fmt = str(cfg.get("format", "torchscript")).lower()
    if fmt not in FORMATS:
        raise ToolError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "app":
        from foodvision.app_export import export_app

        output = Path(cfg.output).expanduser() if cfg.get("output") else default_output(ckpt_path, fmt)
        return export_app(cfg, ckpt_path, output)
    model, info, _ = load_checkpoint_model(ckpt_path)
    model = model.float().eval()
    output = Path(cfg.output).expanduser() if cfg.get("output") else default_output(ckpt_path, fmt)
    output.parent.mkdir(parents=True, exist_ok=True)
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
        f"use it with: python predict.py ckpt_path={output} inputs=[photo.jpg]",
        flush=True,
    )
    return result


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="export")
def main(cfg: DictConfig) -> None:
    run_tool(export, cfg)


if __name__ == "__main__":
    main()

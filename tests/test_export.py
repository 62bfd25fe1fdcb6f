"""export.py: TorchScript and ONNX files carry their metadata and give the checkpoint's logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from foodvision.cli.export import export
from foodvision.errors import ModelLoadError
from foodvision.inference.checkpoints import META_KEY, load_checkpoint_model, quiet_jit
from foodvision.inference.predict import predict
from foodvision.inference.predictor import Predictor

from .conftest import TinyRun, compose_tool


def check_exported(tiny_run: TinyRun, exported: Path, tmp_path: Path) -> None:
    model, info, _ = load_checkpoint_model(tiny_run.checkpoint)
    loaded = Predictor(exported, device="cpu", precision="32", trust_torchscript=True)  # exported here
    assert loaded.class_names == list(tiny_run.classes)
    assert loaded.preprocessing == info.preprocessing
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = model(images) / info.calibration.temperature  # the graph holds the temperature
    assert info.calibration.fitted and loaded.calibration.in_graph
    torch.testing.assert_close(loaded.logits(images), expected, rtol=1e-4, atol=1e-4)

    photos = [tiny_run.data_root / "test"]
    overrides = ("precision=32", "top_k=2", "trust_torchscript=true")
    inputs = f"inputs=[{photos[0]}]"
    _, from_checkpoint, _ = predict(
        compose_tool("predict", f"ckpt_path={tiny_run.checkpoint}", inputs, *overrides)
    )
    code, from_export, failed = predict(compose_tool("predict", f"ckpt_path={exported}", inputs, *overrides))
    assert code == 0 and not failed and len(from_export) == 24
    assert [r["predictions"][0]["class"] for r in from_export] == [
        r["predictions"][0]["class"] for r in from_checkpoint
    ]


def test_torchscript_export_matches_checkpoint(tiny_run: TinyRun, tmp_path: Path) -> None:
    output = tmp_path / "model.pt"
    result = export(
        compose_tool("export", f"ckpt_path={tiny_run.checkpoint}", "format=torchscript", f"output={output}")
    )
    assert result["max_abs_logit_difference"] < 1e-4
    extra = {META_KEY: ""}
    with quiet_jit():
        torch.jit.load(str(output), _extra_files=extra)
    metadata = json.loads(extra[META_KEY])
    assert metadata["class_names"] == list(tiny_run.classes)
    assert metadata["preprocessing"]["image_size"] == 32
    check_exported(tiny_run, output, tmp_path)


def test_onnx_export_matches_checkpoint(tiny_run: TinyRun, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    output = tmp_path / "model.onnx"
    export(compose_tool("export", f"ckpt_path={tiny_run.checkpoint}", "format=onnx", f"output={output}"))
    metadata = {p.key: p.value for p in onnx.load(str(output)).metadata_props}
    assert json.loads(metadata[META_KEY])["class_names"] == list(tiny_run.classes)
    check_exported(tiny_run, output, tmp_path)


def test_default_output_is_in_the_run_dir(tiny_run: TinyRun) -> None:
    result = export(compose_tool("export", f"ckpt_path={tiny_run.checkpoint}", "check=false"))
    assert Path(result["output"]) == tiny_run.run_dir / "export" / f"{tiny_run.checkpoint.stem}.onnx"


def test_torchscript_without_metadata_and_bad_format(tiny_run: TinyRun, tmp_path: Path) -> None:
    model, _, _ = load_checkpoint_model(tiny_run.checkpoint)
    plain = tmp_path / "plain.pt"
    with quiet_jit():
        torch.jit.save(torch.jit.trace(model, torch.zeros(1, 3, 32, 32)), str(plain))
    with pytest.raises(ModelLoadError, match="without foodvision metadata"):
        Predictor(plain)
    with pytest.raises(Exception, match="format must be one of torchscript, onnx"):
        export(compose_tool("export", f"ckpt_path={tiny_run.checkpoint}", "format=tflite"))

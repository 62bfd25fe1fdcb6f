"""predict.py: top-k probabilities, agreement with eval, odd and broken inputs, exit codes."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from foodvision.evaluation.evaluate import evaluate
from foodvision.inference.predict import (
    EXIT_NOTHING_PREDICTED,
    EXIT_SOME_FAILED,
    collect_inputs,
    predict,
    run,
)
from foodvision.inference.predictor import Predictor

from .conftest import ROOT, TinyRun, compose_tool


def predict_cfg(ckpt: Path, inputs: list[str], *overrides: str):
    return compose_tool("predict", f"ckpt_path={ckpt}", f"inputs=[{','.join(map(str, inputs))}]", *overrides)


def test_probabilities_sum_to_one_and_top1_matches_eval(tiny_run: TinyRun, tmp_path: Path) -> None:
    evaluate(
        compose_tool("eval", f"ckpt_path={tiny_run.checkpoint}", f"output_dir={tmp_path}", "precision=32")
    )
    with (tmp_path / "predictions.csv").open() as handle:
        expected = {row["file"]: row for row in csv.DictReader(handle)}
    output = tmp_path / "preds.json"
    test_dir = tiny_run.data_root / "test"
    code, rows, failed = predict(
        predict_cfg(
            tiny_run.checkpoint, [test_dir], "top_k=10", "precision=32", f"output={output}", "batch_size=5"
        )
    )
    assert code == 0 and not failed
    assert len(rows) == len(expected) == 24
    for row in rows:
        probabilities = [p["probability"] for p in row["predictions"]]
        assert len(probabilities) == 6  # top_k is capped at the number of classes
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-5)
        assert probabilities == sorted(probabilities, reverse=True)
        assert row["predictions"][0]["class"] == expected[row["file"]]["predicted"]
        assert probabilities[0] == pytest.approx(float(expected[row["file"]]["confidence"]), abs=1e-5)
    saved = json.loads(output.read_text())
    assert saved["predictions"] == rows and saved["failed"] == []


def test_onnxruntime_engine_gives_the_torch_logits(tiny_run: TinyRun) -> None:
    pytest.importorskip("onnxruntime")
    by_torch = Predictor(tiny_run.checkpoint, device="cpu", precision="32", engine="torch")
    by_ort = Predictor(tiny_run.checkpoint, device="cpu", precision="32", engine="onnxruntime")
    assert (by_torch.engine, by_ort.engine) == ("torch", "onnxruntime")
    assert by_torch.describe().endswith("cpu float32 on torch")
    assert by_ort.describe().endswith("cpu float32 on onnxruntime")
    # auto: ONNX Runtime for float32 on a CPU; PyTorch for bf16
    assert Predictor(tiny_run.checkpoint, device="cpu", precision="32").engine == "onnxruntime"
    assert Predictor(tiny_run.checkpoint, device="cpu", precision="bf16").engine == "torch"
    for batch in (5, 1):  # exported with batch 1; any batch size runs
        images = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        expected = by_torch.logits(images)
        scale = float(expected.abs().max())
        torch.testing.assert_close(by_ort.logits(images), expected, rtol=1e-4, atol=1e-4 * scale)


def odd_images(folder: Path) -> dict[str, Path]:
    """Unusual but valid images, keyed by what is odd about them."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
    files = {
        "grayscale": folder / "gray.jpg",
        "rgba": folder / "rgba.png",
        "palette": folder / "palette.gif",
        "cmyk": folder / "cmyk.jpg",
        "16-bit": folder / "sixteen.png",
        "tiny": folder / "tiny.png",
    }
    rgb.convert("L").save(files["grayscale"])
    rgba = rgb.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(files["rgba"])
    rgb.convert("P").save(files["palette"])
    rgb.convert("CMYK").save(files["cmyk"])
    Image.fromarray(rng.integers(0, 65535, (40, 48), dtype=np.uint16)).save(files["16-bit"])
    rgb.resize((10, 10)).save(files["tiny"])
    assert Image.open(files["16-bit"]).mode.startswith("I;16")
    assert Image.open(files["cmyk"]).mode == "CMYK"
    return files


def test_odd_images_are_predicted_and_broken_files_reported(tiny_run: TinyRun, tmp_path: Path) -> None:
    files = odd_images(tmp_path / "photos")
    (tmp_path / "photos" / "broken.jpg").write_text("this is not a JPEG")
    (tmp_path / "photos" / "notes.txt").write_text("ignored: not an image extension")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(files["cmyk"].read_bytes()[:200])
    explicit_text = tmp_path / "readme.txt"
    explicit_text.write_text("named explicitly, so it is tried and fails")
    output = tmp_path / "preds.csv"
    cfg = predict_cfg(
        tiny_run.checkpoint,
        [tmp_path / "photos", truncated, explicit_text, tmp_path / "missing.jpg", f"{tmp_path}/none*.png"],
        f"output={output}",
    )
    code, rows, failed = predict(cfg)
    assert code == EXIT_SOME_FAILED
    assert {Path(r["file"]).name for r in rows} == {p.name for p in files.values()}
    reasons = {Path(name).name: reason for name, reason in failed}
    assert set(reasons) == {"broken.jpg", "truncated.jpg", "readme.txt", "missing.jpg", "none*.png"}
    assert reasons["missing.jpg"] == "no such file or folder"
    assert reasons["none*.png"] == "no files match this pattern"
    assert "cannot identify image file" in reasons["broken.jpg"]
    with output.open() as handle:
        saved = list(csv.DictReader(handle))
    assert len(saved) == len(rows) + len(failed)
    assert sum(1 for r in saved if r["error"]) == len(failed)
    for r in saved:
        if not r["error"]:
            assert float(r["probability_1"]) >= float(r["probability_2"]) >= float(r["probability_3"])


def test_inputs_order_globs_and_duplicates(tmp_path: Path) -> None:
    files = odd_images(tmp_path / "a")
    found = collect_inputs([str(files["tiny"]), str(tmp_path / "a"), f"{tmp_path}/a/*.png"])
    assert found.files[0] == str(files["tiny"])  # explicit order first, then each once
    assert len(found.files) == len(set(found.files)) == len(files)
    assert not found.problems


def test_empty_folder_is_a_clear_error(
    tiny_run: TinyRun, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("no photos here")
    assert run(predict_cfg(tiny_run.checkpoint, [empty])) == EXIT_NOTHING_PREDICTED
    captured = capsys.readouterr()
    assert f"{empty}: folder has no image files (only 1 non-image file(s), e.g. readme.md" in captured.out
    assert "nothing could be predicted: no inputs found" in captured.err


def test_missing_or_foreign_model_file(
    tiny_run: TinyRun, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    image = odd_images(tmp_path / "p")["tiny"]
    assert run(predict_cfg(tmp_path / "nope.ckpt", [image])) == EXIT_NOTHING_PREDICTED
    assert f"error: model file {tmp_path / 'nope.ckpt'} does not exist" in capsys.readouterr().err
    assert run(predict_cfg(image, [image])) == EXIT_NOTHING_PREDICTED
    assert "is not a PyTorch checkpoint" in capsys.readouterr().err


def test_cli_reports_bad_file_and_exits_1(tiny_run: TinyRun, tmp_path: Path) -> None:
    good = sorted((tiny_run.data_root / "test" / "donuts").iterdir())[0]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    work = tmp_path / "cwd"
    work.mkdir()
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "predict.py"),
            f"ckpt_path={tiny_run.checkpoint}",
            f"inputs=[{good},{bad}]",
            "top_k=2",
        ],
        capture_output=True,
        text=True,
        cwd=work,
        timeout=180,
    )
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    # the answer column: training saved an unknown threshold in the checkpoint ("not sure" below it)
    assert lines[0].split() == ["file", "answer", "top-1", "top-2"]
    assert any(line.startswith(str(good)) for line in lines)
    assert f"  {bad}: " in result.stdout and "not predicted (1)" in result.stdout
    assert list(work.iterdir()) == []  # Hydra keeps no output dir for the tools

"""export.py format=app: a folder that runs without PyTorch and predicts exactly what predict.py predicts."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from foodvision.cli import run_tool
from foodvision.cli.export import export
from foodvision.inference.predict import predict

from .conftest import SHARED_MINI, TinyRun, compose_tool
from .demo_helpers import app_predictions, free_port, no_torch_env, python, stop, wait_for_url

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def app_dir(tiny_run: TinyRun, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("app") / "app"
    result = export(
        compose_tool("export", f"ckpt_path={tiny_run.checkpoint}", "format=app", f"output={output}")
    )
    assert result["max_abs_logit_difference"] < 1e-4
    assert result["examples"] == 6
    return output


def test_app_folder_is_self_contained(app_dir: Path, tiny_run: TinyRun) -> None:
    assert {p.name for p in app_dir.iterdir()} == {
        "app.py",
        "model.onnx",
        "app.json",
        "requirements.txt",
        "README.md",
        ".gitattributes",
        "examples",
    }
    requirements = (app_dir / "requirements.txt").read_text().lower()
    assert {line.split(">")[0].split("=")[0] for line in requirements.split()} == {
        "onnxruntime",
        "gradio",
        "pillow",
        "numpy",
    }
    assert "torch" not in requirements
    source = (app_dir / "app.py").read_text()
    assert "import torch" not in source and "foodvision." not in source.replace("foodvision.json", "")
    config = json.loads((app_dir / "app.json").read_text())
    assert len(config["examples"]) == 6 and all((app_dir / e).is_file() for e in config["examples"])
    # examples are the run's own test photos, one per class
    classes = {Path(e).name.rsplit("_", 1)[0] for e in config["examples"]}
    assert classes == set(tiny_run.classes)
    trained = json.loads((tiny_run.run_dir / "metrics.json").read_text())
    assert config["metrics"]["test accuracy"] == pytest.approx(trained["test/acc"])
    readme = (app_dir / "README.md").read_text()
    assert readme.startswith("---\ntitle:") and "sdk: gradio" in readme and "app_file: app.py" in readme
    assert f"{trained['test/acc']:.1%}" in readme and "ms per photo" in readme


def test_app_predictions_equal_predict_py_without_torch(
    app_dir: Path, tiny_run: TinyRun, tmp_path: Path
) -> None:
    photos = sorted(str(p) for p in (tiny_run.data_root / "test").rglob("*.jpg"))[::4]
    real = sorted((SHARED_MINI / "images").glob("*/*.jpg"))[::997][:5]
    photos += [str(p) for p in real]  # real JPEGs: reduced-size (draft) decoding must match too
    rgba = tmp_path / "transparent.png"
    array = np.zeros((50, 70, 4), dtype=np.uint8)
    array[..., 0], array[..., 3] = 200, np.linspace(0, 255, 70, dtype=np.uint8)
    Image.fromarray(array, "RGBA").save(rgba)
    gray = tmp_path / "gray.png"
    Image.fromarray(np.arange(45 * 33, dtype=np.uint16).reshape(45, 33) % 256 * 3).convert("L").save(gray)
    text = tmp_path / "notes.txt"
    text.write_text("not a photo")
    photos += [str(rgba), str(gray), str(text)]

    code, rows, failed = predict(
        compose_tool(
            "predict",
            f"ckpt_path={tiny_run.checkpoint}",
            f"inputs=[{','.join(photos)}]",
            f"top_k={len(tiny_run.classes)}",
            "precision=32",
        )
    )
    assert code == 1 and [f for f, _ in failed] == [str(text)]
    expected = {r["file"]: {p["class"]: p["probability"] for p in r["predictions"]} for r in rows}

    results = app_predictions(app_dir, photos, tmp_path / "blocker")
    assert [r["file"] for r in results] == photos
    for result in results[:-1]:
        want = expected[result["file"]]
        got = result["probabilities"]
        assert set(got) == set(want)
        assert max(abs(got[c] - want[c]) for c in want) < 1e-4, result["file"]
    assert "not an image" in results[-1]["error"]


def test_python_without_torch_really_has_none(tmp_path: Path) -> None:
    done = subprocess.run(
        [python(), "-c", "import torch"],
        env=no_torch_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0 and "blocked by the test" in done.stderr


def test_app_serves_and_answers_without_torch(app_dir: Path, tiny_run: TinyRun, tmp_path: Path) -> None:
    """`python app.py` in a Python without torch: the page loads and the API classifies a photo."""
    gradio_client = pytest.importorskip("gradio_client")
    port = free_port()
    process = subprocess.Popen(
        [python(), "app.py", "--port", str(port)],
        cwd=app_dir,
        env=no_torch_env(tmp_path / "blocker"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url, _ = wait_for_url(process)
        assert url.startswith(f"http://127.0.0.1:{port}")
        client = gradio_client.Client(url, verbose=False)
        photo = sorted((tiny_run.data_root / "test" / "donuts").glob("*.jpg"))[0]
        label, status = client.predict(gradio_client.handle_file(str(photo)), api_name="/classify")
        assert label["label"] in tiny_run.classes and "prediction time" in status
    finally:
        stop(process)


def test_export_app_refuses_a_foreign_folder(tiny_run: TinyRun, tmp_path: Path, capsys) -> None:
    (tmp_path / "mine.txt").write_text("keep")
    cfg = compose_tool("export", f"ckpt_path={tiny_run.checkpoint}", "format=app", f"output={tmp_path}")
    with pytest.raises(SystemExit):
        run_tool(export, cfg)
    assert "holds no exported app" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]

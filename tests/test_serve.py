"""serve.py: the Gradio demo's facts and examples, the command, and the page in a real (headless) browser."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import urllib.request
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from foodvision.app.demo import example_photos, model_facts, predict_files_with, serve
from foodvision.inference.predict import predict
from foodvision.inference.predictor import Predictor

from .conftest import SHARED_MINI, TinyRun, compose_tool
from .demo_helpers import CHROMIUM_ARGS, free_port, python, require_browser, stop, wait_for_url

pytest.importorskip("gradio")
ROOT = Path(__file__).resolve().parents[1]


def top_predictions(tiny_run: TinyRun, photos: list[Path]) -> dict[str, list[dict]]:
    """predict.py's probabilities of every class (float32), by file."""
    _, rows, _ = predict(
        compose_tool(
            "predict",
            f"ckpt_path={tiny_run.checkpoint}",
            f"inputs=[{','.join(map(str, photos))}]",
            f"top_k={len(tiny_run.classes)}",
            "precision=32",
        )
    )
    return {r["file"]: r["predictions"] for r in rows}


def test_facts_examples_and_predictions(tiny_run: TinyRun, tmp_path: Path) -> None:
    cfg = compose_tool("serve", f"ckpt_path={tiny_run.checkpoint}", "precision=32")
    predictor = Predictor(tiny_run.checkpoint, precision="32")
    facts = model_facts(predictor)
    trained = json.loads((tiny_run.run_dir / "metrics.json").read_text())
    assert facts["architecture"] == "scratch_cnn[8, 16]" and facts["classes"] == 6
    assert facts["test accuracy"].startswith(f"{trained['test/acc']:.1%}")
    assert "MB" in facts["file"] and facts["parameters"]
    photos = example_photos(cfg, tiny_run.run_dir, list(tiny_run.classes), 6)
    assert sorted(Path(p).parent.name for p in photos) == sorted(tiny_run.classes)
    assert all(Path(p).parent.parent.name == "test" for p in photos)
    moved = OmegaConf.load(tiny_run.run_dir / "config.yaml")
    moved.data.root = str(tmp_path / "gone")
    OmegaConf.save(moved, tmp_path / "config.yaml")
    assert example_photos(cfg, tmp_path, list(tiny_run.classes), 6) == []  # the run's data is not at hand

    text = tmp_path / "notes.txt"
    text.write_text("not a photo")
    results = predict_files_with(predictor)([photos[0], str(text)])
    expected = top_predictions(tiny_run, [Path(photos[0])])[photos[0]]
    assert {p["class"]: p["probability"] for p in expected} == pytest.approx(
        dict(zip(predictor.class_names, results[0].probabilities.tolist(), strict=True)), abs=1e-5
    )
    assert results[1] == "notes.txt is not an image (no image format recognised)"


def test_serve_command_prints_its_local_url_and_answers(tiny_run: TinyRun, tmp_path: Path) -> None:
    """`python serve.py ckpt_path=...`: listens on 127.0.0.1, prints the URL, classifies through its API;
    stopped (SIGTERM), it leaves no temporary example folder behind."""
    gradio_client = pytest.importorskip("gradio_client")
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "TQDM_DISABLE": "1", "TMPDIR": str(tmp_path)}
    process = subprocess.Popen(
        [python(), "serve.py", f"ckpt_path={tiny_run.checkpoint}", f"port={port}", "precision=32"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url, _ = wait_for_url(process, timeout=180)
        assert url.rstrip("/") == f"http://127.0.0.1:{port}"
        photo = sorted((tiny_run.data_root / "test" / "churros").glob("*.jpg"))[1]
        label, status = gradio_client.Client(url, verbose=False).predict(
            gradio_client.handle_file(str(photo)), api_name="/classify"
        )
        expected = top_predictions(tiny_run, [photo])[str(photo)]
        assert label["label"] == expected[0]["class"]
        assert f"({100 * expected[0]['probability']:.1f}%)" in status and "prediction time" in status
        assert len(list(tmp_path.glob("foodvision-serve-*/*.jpg"))) == 6
    finally:
        stop(process)
    assert list(tmp_path.glob("foodvision-serve-*")) == []


@pytest.fixture
def demo_url(tiny_run: TinyRun):
    demo = serve(
        compose_tool(
            "serve", f"ckpt_path={tiny_run.checkpoint}", f"port={free_port()}", "block=false", "precision=32"
        )
    )
    try:
        yield demo.local_url
    finally:
        demo.close()


def test_demo_in_a_headless_browser(demo_url: str, tiny_run: TinyRun, tmp_path: Path) -> None:
    """Chromium loads the page, a real photo is uploaded, the predicted class and its probability are read
    back and equal predict.py's; non-image files give a clear message, in both tabs."""
    chromium = require_browser()
    from playwright.sync_api import expect, sync_playwright

    real = sorted((SHARED_MINI / "images" / "bibimbap").glob("*.jpg"))[:1]
    photo = real[0] if real else sorted((tiny_run.data_root / "test" / "bibimbap").glob("*.jpg"))[0]
    expected = top_predictions(tiny_run, [photo])[str(photo)]
    text = tmp_path / "notes.txt"
    text.write_text("not a photo")

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(demo_url)
            expect(page.locator("#facts")).to_contain_text("scratch_cnn[8, 16]")
            expect(page.locator("#facts")).to_contain_text("test accuracy")
            # Gradio renders the examples after the page's first paint: wait for them, never count at once.
            expect(page.locator("#examples img")).to_have_count(6, timeout=30_000)

            page.locator("#photo input[type=file]").set_input_files(str(text))
            expect(page.get_by_text("Invalid file type: notes.txt")).to_be_visible(timeout=10_000)

            page.locator("#photo input[type=file]").set_input_files(str(photo))
            best = expected[0]
            expect(page.locator("#status")).to_contain_text(
                f"({100 * best['probability']:.1f}%)", timeout=30_000
            )
            expect(page.locator("#status")).to_contain_text("prediction time")
            prediction = page.locator("#prediction")
            for row in expected[:5]:  # every bar: class and its rounded percentage
                expect(prediction).to_contain_text(row["class"])
                expect(prediction).to_contain_text(f"{round(100 * row['probability'])}%")

            page.get_by_role("tab", name="Several photos").click()
            page.locator("#photos input[type=file]").set_input_files([str(text), str(photo)])
            results = page.locator("#results")
            expect(results).to_contain_text("1 of 2 photo(s) classified", timeout=30_000)
            expect(results).to_contain_text("notes.txt is not an image (no image format recognised)")
            expect(results).to_contain_text(f"{100 * best['probability']:.1f}%")
        finally:
            browser.close()


def test_an_exported_onnx_model_serves_the_same_probabilities(tiny_run: TinyRun, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from foodvision.cli.export import export

    model_file = tmp_path / "model.onnx"
    export(compose_tool("export", f"ckpt_path={tiny_run.checkpoint}", "format=onnx", f"output={model_file}"))
    exported = Predictor(model_file)
    facts = model_facts(exported)
    assert facts["runs on"] == "ONNX Runtime, cpu, float32" and "ONNX graph" in facts["parameters"]
    photos = sorted(str(p) for p in (tiny_run.data_root / "test").rglob("*.jpg"))[::5]
    got = predict_files_with(exported)(photos)
    want = predict_files_with(Predictor(tiny_run.checkpoint, precision="32"))(photos)
    for a, b in zip(got, want, strict=True):
        assert abs(a.probabilities - b.probabilities).max() < 1e-5 and a.unknown == b.unknown


def test_demo_explains_non_images_shows_no_server_path_and_cleans_up(
    tiny_run: TinyRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The "One photo" tab gives a message for a text file named .jpg and for an empty .jpg (not only
    "Error"); the page names the checkpoint, never its server path; the example folder goes with close()."""
    gradio_client = pytest.importorskip("gradio_client")
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    demo = serve(
        compose_tool(
            "serve", f"ckpt_path={tiny_run.checkpoint}", f"port={free_port()}", "block=false", "precision=32"
        )
    )
    try:
        (examples,) = temp.glob("foodvision-serve-*")
        assert len(list(examples.iterdir())) == 6
        with urllib.request.urlopen(f"{demo.local_url.rstrip('/')}/config", timeout=20) as response:
            page = response.read().decode()
        assert tiny_run.checkpoint.name in page
        assert str(tiny_run.checkpoint) not in page and str(tiny_run.run_dir) not in page

        client = gradio_client.Client(demo.local_url, verbose=False)
        fake = tmp_path / "fake.jpg"
        fake.write_text("not a photo")
        empty = tmp_path / "empty.jpg"
        empty.write_bytes(b"")
        for photo, message in (
            (fake, "fake.jpg is not an image (no image format recognised)"),
            (empty, "empty.jpg is not"),
        ):
            label, status = client.predict(gradio_client.handle_file(str(photo)), api_name="/classify")
            assert not label and f"**Could not classify this file:** {message}" in status
    finally:
        demo.close()
    assert list(temp.glob("foodvision-serve-*")) == []

"""`python export.py ckpt_path=... format=app output=DIR`: a self-contained Gradio app folder without PyTorch.

DIR gets ``app.py`` (:mod:`foodvision.app.template`, numpy + PIL preprocessing equal to foodvision's eval
transform, ONNX Runtime), ``model.onnx`` (class names and preprocessing in its metadata), ``app.json``
(title, facts shown on the page, example list), ``requirements.txt`` (onnxruntime, gradio, pillow, numpy),
``examples/`` (a few of the run's own test photos, when its data is at hand) and a ``README.md`` with the
model's numbers and the Hugging Face Spaces header, so the folder runs with ``python app.py`` in a fresh
environment and can be pushed to a Space as it is.
"""

from __future__ import annotations

import json
import logging
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from foodvision.app import template as app_template
from foodvision.app.demo import example_name, example_photos
from foodvision.atomic import ensure_dir, finite_json, write_text, write_with
from foodvision.errors import ToolError
from foodvision.inference.checkpoints import (
    ModelInfo,
    load_checkpoint_model,
    network_parameter_count,
    run_dir_of,
)
from foodvision.inference.export import check_export, export_onnx
from foodvision.runs.layout import METRICS, eval_dir

log = logging.getLogger(__name__)

REQUIREMENTS = ("onnxruntime>=1.18", "gradio>=5,<7", "pillow>=10", "numpy>=1.24")


def _prepare_folder(output: Path) -> None:
    """A new or empty folder, or one this exporter wrote before (its files are replaced)."""
    if output.exists() and not output.is_dir():
        raise ToolError(f"output={output} is a file; format=app writes a folder")
    if output.is_dir() and any(output.iterdir()) and not (output / "app.json").is_file():
        raise ToolError(f"output={output} is a non-empty folder that holds no exported app: choose another")
    ensure_dir(output)
    shutil.rmtree(output / "examples", ignore_errors=True)


def run_numbers(run_dir: Path) -> dict[str, Any]:
    """Test metrics of the run: eval.py's (eval-test/metrics.json), else the training run's metrics.json."""
    numbers: dict[str, Any] = {}
    try:
        trained = json.loads((run_dir / METRICS).read_text())
        numbers.update(
            {
                "test accuracy": trained.get("test/acc"),
                "macro F1": trained.get("test/f1_macro"),
                "source": "metrics.json",
            }
        )
    except (OSError, ValueError):
        pass
    try:
        evaluated = json.loads((eval_dir(run_dir) / METRICS).read_text())
        numbers.update(
            {
                "test accuracy": evaluated.get("test/acc"),
                "macro F1": evaluated.get("test/f1_macro"),
                "test images": evaluated.get("num_images"),
                "source": "eval-test/metrics.json",
            }
        )
    except (OSError, ValueError):
        pass
    return {k: v for k, v in numbers.items() if v is not None}


def measure_latency(model_file: Path, image_size: int, repeats: int = 20) -> float:
    """Median milliseconds of one photo through model.onnx (ONNX Runtime, batch 1), after a warm-up."""
    import numpy as np

    classifier = app_template.OnnxClassifier(model_file)
    image = np.zeros((1, 3, image_size, image_size), dtype=np.float32)
    classifier.probabilities(image)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        classifier.probabilities(image)
        times.append(1000 * (time.perf_counter() - started))
    return statistics.median(times)


def readme(title: str, info: ModelInfo, facts: dict[str, Any], numbers: dict[str, Any]) -> str:
    try:
        import gradio

        sdk_version = f"sdk_version: {gradio.__version__}\n"
    except ImportError:
        sdk_version = ""
    rows = "\n".join(f"| {key} | {value} |" for key, value in facts.items())
    classes = ", ".join(info.class_names)
    return f"""---
title: {title.replace(":", " -")}
emoji: 🍽️
colorFrom: yellow
colorTo: red
sdk: gradio
{sdk_version}app_file: app.py
pinned: false
---

# {title}

An image classifier trained with foodvision, as a Gradio app that needs no PyTorch: ONNX Runtime runs
`model.onnx`, and `app.py` reads, resizes, crops and normalises photos exactly as foodvision does.

```bash
pip install -r requirements.txt
python app.py                        # http://127.0.0.1:7860 (GRADIO_SERVER_NAME / --host to change)
python app.py --predict photo.jpg    # class probabilities as JSON lines, no web server
```

On Hugging Face Spaces: push this folder as a Gradio Space, as it is (`.gitattributes` stores `model.onnx`
with Git LFS, which Spaces needs for files over 10 MB).

## The model

| | |
|---|---|
{rows}

Test numbers from the training run's `{numbers.get("source", "metrics.json")}`; latency measured at export time
on the exporting machine. Classes ({info.num_classes}): {classes}.

`model.onnx` maps normalised float32 NCHW images (any batch size) to calibrated logits (divided by the
temperature {info.calibration.temperature:.3f} fitted on validation photos, inside the graph); its
`foodvision.json` metadata holds the class names, the preprocessing (shorter side to
{info.preprocessing.resize_size} px, {info.preprocessing.interpolation}; centre crop
{info.preprocessing.image_size} px; mean {list(info.preprocessing.mean)}, std {list(info.preprocessing.std)})
and the calibration{unknown_note(info)}.
"""


def unknown_note(info: ModelInfo) -> str:
    """The README's sentence on the "not sure" answer ("" for a model without an unknown threshold)."""
    fact = app_template.unknown_fact(info.calibration.to_dict())
    return f": the app answers {fact}, still showing the top guesses" if fact else ""


def export_app(cfg: DictConfig, ckpt_path: Path, output: Path) -> dict[str, Any]:
    """Write the app folder; returns what export.py prints and returns."""

    model, info, checkpoint = load_checkpoint_model(ckpt_path)
    model = model.float().eval()
    _prepare_folder(output)
    model_file = export_onnx(model, info, output / "model.onnx", ckpt_path.name, int(cfg.get("opset", 17)))
    difference = check_export(model, info, model_file) if cfg.get("check", True) else None
    # Each file atomically (a temporary name, then a rename): a full disk never leaves half a file.
    write_with(output / "app.py", lambda temporary: shutil.copyfile(app_template.__file__, temporary))
    write_text(output / "requirements.txt", "\n".join(REQUIREMENTS) + "\n")
    write_text(output / ".gitattributes", "*.onnx filter=lfs diff=lfs merge=lfs -text\n")  # Spaces: LFS

    run_dir = run_dir_of(ckpt_path)
    photos = example_photos(cfg, run_dir, info.class_names, int(cfg.get("examples", 6)))
    examples = []
    if photos:
        ensure_dir(output / "examples")
        for photo in photos:
            name = f"examples/{example_name(photo)}"
            write_with(output / name, lambda temporary, photo=photo: shutil.copyfile(photo, temporary))
            examples.append(name)

    numbers = run_numbers(run_dir)
    params = network_parameter_count(checkpoint)
    latency = measure_latency(model_file, info.preprocessing.image_size)
    facts: dict[str, Any] = {"architecture": info.architecture, "classes": info.num_classes}
    if "test accuracy" in numbers:
        images = f", {numbers['test images']} images" if "test images" in numbers else ""
        facts["test accuracy"] = f"{numbers['test accuracy']:.1%} ({numbers['source']}{images})"
    if "macro F1" in numbers:
        facts["macro F1"] = f"{numbers['macro F1']:.3f}"
    facts["input"] = f"{info.preprocessing.image_size} px"
    facts["parameters"] = f"{params / 1e6:.2f} M" if params >= 1e5 else f"{params:,}"
    facts["model file"] = f"model.onnx ({model_file.stat().st_size / 1e6:.1f} MB)"
    facts["latency"] = f"{latency:.1f} ms per photo (batch 1, ONNX Runtime CPU, at export)"
    title = str(cfg.get("title") or f"foodvision: {info.architecture}")
    config = {
        "title": title,
        "description": f"{info.num_classes} classes. Exported from `{ckpt_path.name}` by foodvision.",
        "top_k": int(cfg.get("top_k", 5)),
        "facts": facts,
        "examples": examples,
        "metrics": numbers,
    }
    write_text(output / "app.json", json.dumps(finite_json(config), indent=2, ensure_ascii=False) + "\n")
    write_text(output / "README.md", readme(title, info, facts, numbers))
    size = sum(f.stat().st_size for f in output.rglob("*") if f.is_file()) / 1e6
    result: dict[str, Any] = {
        "output": str(output),
        "format": "app",
        "size_mb": size,
        "examples": len(examples),
        "latency_ms": latency,
    }
    if difference is not None:
        result["max_abs_logit_difference"] = difference
    check = (
        f"; logits match the checkpoint (max |difference| {difference:.1e})" if difference is not None else ""
    )
    no_examples = "" if examples else " (no example photos: the run's test data is not at hand)"
    print(
        f"exported {info.architecture} ({info.num_classes} classes) as an app: {output} ({size:.1f} MB, "
        f"{len(examples)} example photos{no_examples}){check}\n"
        f"run it with: cd {output} && pip install -r requirements.txt && python app.py",
        flush=True,
    )
    return result

"""`python serve.py ckpt_path=<run>/checkpoints/last.ckpt` (or an exported .onnx): a Gradio demo on localhost.

Drop, upload, paste or take (webcam) a photo, or several: top-k classes with probability bars and the
prediction time, the model's facts (architecture, classes, test accuracy from the run's metrics.json,
size) and a few of the run's own test photos as examples when its data is at hand. Runs through
:class:`foodvision.inference.predictor.Predictor` (ONNX Runtime on a CPU, PyTorch on a GPU). Listens on 127.0.0.1
unless ``host=`` says otherwise; ``share=true`` asks Gradio for a public link. Needs the ``demo`` extra
(``pip install -e '.[demo]'``). The page itself is :func:`foodvision.app.template.build_demo`, the one
the exported app (``export.py format=app``) serves.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from foodvision.app.template import Answer, build_demo, launch, unknown_fact
from foodvision.cli import required
from foodvision.data.datamodule import FoodDataModule
from foodvision.data.roots import resolve_eval_data
from foodvision.errors import ToolError
from foodvision.inference.batches import infer_files
from foodvision.inference.calibration import is_unknown
from foodvision.inference.checkpoints import network_parameter_count, run_dir_of
from foodvision.inference.predictor import Predictor, resolve_device
from foodvision.runs.layout import METRICS, eval_dir

log = logging.getLogger(__name__)

OFFLINE_ENV = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_DISABLE_TELEMETRY": "1"}


def import_gradio() -> Any:
    """gradio, with analytics and its version check off (they would reach the internet on every start)."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # no line per request gradio makes to itself
    try:
        import gradio
    except ImportError as error:
        raise ToolError("serve.py needs gradio: pip install -e '.[demo]' (make install does)") from error
    return gradio


# ---- what the page shows about the model -----------------------------------------------------------------
def test_accuracy(run_dir: Path) -> tuple[float | None, str]:
    """The model's test accuracy and where it comes from: eval.py's metrics, else the training run's."""
    for path, key in (
        (eval_dir(run_dir) / METRICS, "test/acc"),
        (run_dir / METRICS, "test/acc"),
    ):
        try:
            value = json.loads(path.read_text()).get(key)
        except (OSError, ValueError):
            continue
        if isinstance(value, (int, float)):
            return float(value), str(path.relative_to(run_dir))
    return None, ""


def count_parameters(predictor: Predictor) -> int | None:
    if predictor.checkpoint is not None:
        return network_parameter_count(predictor.checkpoint)
    if predictor.format == "onnx":
        try:
            import onnx
            from onnx import numpy_helper

            graph = onnx.load(str(predictor.path), load_external_data=False).graph
            return int(sum(numpy_helper.to_array(t).size for t in graph.initializer))
        except Exception:  # noqa: BLE001 - the count is a nicety
            return None
    return None


def model_facts(predictor: Predictor) -> dict[str, Any]:
    info = predictor.info
    run_dir = run_dir_of(predictor.path)
    accuracy, source = test_accuracy(run_dir)
    params = count_parameters(predictor)
    shown_params = (f"{params / 1e6:.2f} M" if params >= 1e5 else f"{params:,}") if params else ""
    if shown_params and predictor.format == "onnx":
        shown_params += " (ONNX graph, BatchNorm folded)"
    pre = info.preprocessing
    runs_on = {"onnxruntime": "ONNX Runtime", "torch": "PyTorch"}.get(predictor.engine, predictor.engine)
    return {
        "architecture": info.architecture,
        "classes": info.num_classes,
        "test accuracy": f"{accuracy:.1%} ({source})" if accuracy is not None else "not measured",
        "input": f"{pre.image_size} px (shorter side {pre.resize_size}, centre crop)",
        "parameters": shown_params,
        "file": f"{predictor.path.name} ({predictor.path.stat().st_size / 1e6:.1f} MB, {predictor.format})",
        "runs on": f"{runs_on}, {predictor.device.type}, {'bf16' if predictor.precision == 'bf16' else 'float32'}",
        "unknown answers": unknown_fact(
            predictor.calibration.to_dict()
        ),  # "" (not shown) without a threshold
    }


# ---- example photos: a few of the run's own test photos -----------------------------------------------------
def example_photos(cfg: DictConfig, run_dir: Path, class_names: Sequence[str], count: int) -> list[str]:
    """Up to ``count`` photos of the run's test split, classes spread over the class list, one each; none
    (and a log line saying why) when the run's data is not at hand."""
    if count <= 0:
        return []

    try:
        data_args, _ = resolve_eval_data(cfg, run_dir)
        splits = FoodDataModule(**{k: v for k, v in data_args.items() if k != "_target_"}).discover()
    except Exception as error:  # noqa: BLE001 - examples are optional: any problem finding the data means none
        log.info("no example photos (the run's test data is not at hand or not usable: %s)", error)
        return []
    by_class: dict[str, str] = {}
    for path, label in splits.splits.get("test") or []:
        by_class.setdefault(splits.classes[label], str(path))
    present = [name for name in class_names if name in by_class]
    if not present:
        return []
    shown = min(count, len(present))
    return [by_class[present[i * len(present) // shown]] for i in range(shown)]


def example_name(photo: str | Path) -> str:
    """``<class>_<file name>`` (the class is the photo's folder), unless the name starts with the class."""
    photo = Path(photo)
    label = photo.parent.name
    return photo.name if photo.name.startswith(f"{label}_") else f"{label}_{photo.name}"


def copy_examples(photos: Sequence[str], folder: Path) -> list[str]:
    """Copies (:func:`example_name`) where Gradio may serve them from."""
    folder.mkdir(parents=True, exist_ok=True)
    copies = []
    for photo in photos:
        target = folder / example_name(photo)
        shutil.copyfile(photo, target)
        copies.append(str(target))
    return copies


# ---- the page --------------------------------------------------------------------------------------------
def predict_files_with(predictor: Predictor) -> Any:
    """``paths -> [Answer (calibrated probabilities, not sure or not) or a message]`` through foodvision's
    own reading and preprocessing (the same as predict.py)."""

    def predict_files(paths: Sequence[str]) -> list[Any]:
        result = infer_files(predictor, list(paths), batch_size=32, num_workers=0, progress=False)
        out: list[Any] = [None] * len(paths)
        unknown = is_unknown(result.logits, predictor.calibration)
        for row, index in enumerate(result.indices):
            out[index] = Answer(result.probabilities[row].numpy(), bool(unknown[row]))
        reasons = dict(result.failed)
        for index, path in enumerate(paths):
            if out[index] is None:
                name = Path(path).name
                reason = reasons.get(str(path), "could not be read")
                if "UnidentifiedImageError" in reason:
                    out[index] = f"{name} is not an image (no image format recognised)"
                else:
                    out[index] = f"{name} is not a readable image ({reason.replace(str(path), name)})"
        return out

    return predict_files


def build(cfg: DictConfig, predictor: Predictor, example_dir: Path) -> Any:

    import_gradio()
    run_dir = run_dir_of(predictor.path)
    photos = example_photos(cfg, run_dir, predictor.class_names, int(cfg.get("examples", 6)))
    examples = copy_examples(photos, example_dir) if photos else []
    title = cfg.get("title") or f"foodvision: {predictor.info.architecture}"
    return build_demo(
        predict_files_with(predictor),
        predictor.class_names,
        title,
        model_facts(predictor),
        examples,
        int(cfg.get("top_k", 5)),
        f"{predictor.info.num_classes} classes, model `{predictor.path.name}`",  # a name, never a server path
    )


def serve(cfg: DictConfig) -> Any:
    """Build the demo and launch it; blocks until interrupted unless ``block=false`` (then returns it)."""
    ckpt_path = required(cfg, "ckpt_path", "ckpt_path=lightning_logs/runs/<run>/checkpoints/last.ckpt")
    import_gradio()

    started = time.perf_counter()
    device = resolve_device(cfg.get("device", "auto"))
    precision = cfg.get("precision", "auto")
    if str(precision).lower() == "auto" and device.type == "cpu":
        precision = "32"  # one photo at a time on a CPU: ONNX Runtime in float32 is the fast path
    predictor = Predictor(
        ckpt_path,
        str(device),
        precision,
        cfg.get("engine", "auto"),
        trust_torchscript=cfg.get("trust_torchscript", False),
    )
    log.info("model: %s", predictor.describe())
    host = str(cfg.get("host") or "127.0.0.1")
    port = cfg.get("port")
    block = bool(cfg.get("block", True))
    example_dir = Path(tempfile.mkdtemp(prefix="foodvision-serve-"))
    remove_examples = remove_at_exit(example_dir)
    try:
        demo = build(cfg, predictor, example_dir)
        log.info("demo ready in %.1f s", time.perf_counter() - started)
        if not block:  # the caller stops it: the examples go with demo.close() (or at exit)
            demo.close = _then(demo.close, remove_examples)
        with _terminate_as_interrupt(block):
            launch(
                demo,
                host,
                int(port) if port else None,
                bool(cfg.get("share", False)),
                block=block,
                allowed_paths=[str(example_dir)],
                inbrowser=bool(cfg.get("open_browser", False)),
            )
    except BaseException:
        remove_examples()
        raise
    if block:
        remove_examples()
    return None if block else demo


# ---- the temporary example folder goes when the demo stops ------------------------------------------------
def remove_at_exit(folder: Path) -> Callable[[], None]:
    """A function removing ``folder`` (once; also run at interpreter exit, so nothing is left behind when
    the demo is stopped any other way)."""

    def remove() -> None:
        shutil.rmtree(folder, ignore_errors=True)
        atexit.unregister(remove)

    atexit.register(remove)
    return remove


def _then(first: Callable[..., Any], after: Callable[[], None]) -> Callable[..., Any]:
    def both(*args: Any, **kwargs: Any) -> Any:
        try:
            return first(*args, **kwargs)
        finally:
            after()

    return both


@contextlib.contextmanager
def _terminate_as_interrupt(active: bool) -> Iterator[None]:
    """While the demo blocks: SIGTERM (``kill``, a service manager) stops it like Ctrl+C, so the server
    closes and the example folder is removed (Python's default SIGTERM ends the process without cleanup)."""
    if not active or threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)

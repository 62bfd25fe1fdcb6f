"""A foodvision image classifier as a Gradio app: `python app.py` (http://127.0.0.1:7860).

Written by `python export.py ckpt_path=... format=app output=DIR` as DIR/app.py next to model.onnx
(class names and preprocessing in its ``foodvision.json`` metadata) and app.json (the model's numbers).
Needs only onnxruntime, gradio, pillow and numpy (requirements.txt), never PyTorch, so the folder can be
pushed to a Hugging Face Space as it is. `python app.py --predict photo.jpg ...` prints the class
probabilities as JSON lines without starting the web app.

foodvision's own `serve.py` builds the same page (:func:`build_demo`) around its PyTorch/ONNX Runtime
predictor.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# No analytics or update check: the app starts the same offline and online.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

HERE = Path(__file__).resolve().parent
META_KEY = "foodvision.json"
INTERPOLATION = {
    "nearest": Image.Resampling.NEAREST,
    "nearest-exact": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}


class NotAnImageError(ValueError):
    """A file that cannot be decoded as an image."""


# ---- preprocessing: foodvision's eval transform in numpy + PIL -------------------------------------------
def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB as foodvision reads photos (transparency on white, 16-bit rescaled)."""
    if image.mode == "RGB":
        return image
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scale = 255.0 / (high - low) if high > low else 0.0
        return Image.fromarray(((array - low) * scale).astype(np.uint8), mode="L").convert("RGB")
    return image.convert("RGB")


def resize_size(pre: dict[str, Any]) -> int:
    """Shorter side before the centre crop: image_size / crop_pct, rounded down."""
    return int(math.floor(int(pre["image_size"]) / float(pre.get("crop_pct", 1.0))))


def load_rgb(path: str | os.PathLike, pre: dict[str, Any]) -> Image.Image:
    """Decode a photo to RGB (EXIF rotation applied) at the reduced size foodvision uses: JPEGs in draft
    mode, any image still twice the working size shrunk by an integer factor (as the training data path does)."""
    size = resize_size(pre)
    try:
        with Image.open(path) as image:
            if image.format == "JPEG":
                image.draft("RGB", (size, size))
            image.load()
            return _reduced(to_rgb(ImageOps.exif_transpose(_reduced(image, size))), size)
    except UnidentifiedImageError as error:
        raise NotAnImageError(f"{Path(path).name} is not an image (no image format recognised)") from error
    except (OSError, ValueError, SyntaxError) as error:
        reason = str(error).replace(str(path), Path(path).name)
        raise NotAnImageError(
            f"{Path(path).name} is not a readable image ({type(error).__name__}: {reason})"
        ) from error


def _reduced(image: Image.Image, size: int) -> Image.Image:
    """Shrunk by the largest integer factor that keeps both sides >= size (modes that average only)."""
    factor = min(image.width, image.height) // max(1, size)
    if factor < 2 or image.mode not in ("RGB", "RGBA", "RGBX", "L", "LA", "I", "F", "CMYK"):
        return image
    reduced = image.reduce(factor)
    reduced.info = dict(image.info)  # the EXIF orientation
    return reduced


def preprocess(image: Image.Image, pre: dict[str, Any]) -> np.ndarray:
    """Shorter side to resize_size, centre crop image_size, 0-1, normalise: float32 CHW, exactly as
    torchvision's ``Resize`` + ``CenterCrop`` + ``ToDtype(scale=True)`` + ``Normalize`` on a PIL image."""
    image = to_rgb(image)
    width, height = image.size
    target = resize_size(pre)
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = target, int(target * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    if (new_w, new_h) != (width, height):
        resample = INTERPOLATION.get(str(pre.get("interpolation", "bilinear")), Image.Resampling.BILINEAR)
        image = image.resize((new_w, new_h), resample=resample)
    crop = int(pre["image_size"])
    array = np.asarray(image, dtype=np.uint8)
    height, width = array.shape[:2]
    if crop > height or crop > width:  # pad with zeros, as torchvision does
        top = (crop - height) // 2 if crop > height else 0
        left = (crop - width) // 2 if crop > width else 0
        bottom = (crop - height + 1) // 2 if crop > height else 0
        right = (crop - width + 1) // 2 if crop > width else 0
        array = np.pad(array, ((top, bottom), (left, right), (0, 0)))
        height, width = array.shape[:2]
    top, left = int(round((height - crop) / 2.0)), int(round((width - crop) / 2.0))
    array = array[top : top + crop, left : left + crop]
    chw = array.transpose(2, 0, 1).astype(np.float32) / np.float32(255.0)
    mean = np.asarray(pre["mean"], dtype=np.float32)[:, None, None]
    std = np.asarray(pre["std"], dtype=np.float32)[:, None, None]
    return (chw - mean) / std


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


NOT_SURE = "not sure"  # the answer to a photo below the model's unknown threshold


# ---- "not sure": the model's unknown threshold (the calibration module's numpy twin) --------------------------
class Answer(NamedTuple):
    """One photo's class probabilities, and whether the model is not sure of it: its score is below the
    threshold chosen on validation photos (probably none of the model's classes)."""

    probabilities: np.ndarray
    unknown: bool = False


def answer_of(result: Any) -> Answer:
    """An :class:`Answer` from what a ``predict_files`` gives for a readable photo (an Answer, or bare
    probabilities: never unknown)."""
    return result if isinstance(result, Answer) else Answer(np.asarray(result), False)


def unknown_score(logits: np.ndarray, score: str) -> np.ndarray:
    """Per photo, how much it looks like the model's classes (higher: more), from calibrated logits: the
    top probability, the energy (logsumexp) or the top logit."""
    logits = np.asarray(logits, dtype=np.float64)
    if score == "energy":
        top = logits.max(axis=1)
        return top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
    if score == "max_logit":
        return logits.max(axis=1)
    return softmax(logits).max(axis=1)


def unknown_fact(calibration: dict[str, Any]) -> str:
    """The page's line on the unknown answer, from the model's calibration metadata ("" without one)."""
    threshold = calibration.get("unknown_threshold")
    if threshold is None:
        return ""
    score = calibration.get("unknown_score", "probability")
    keep = calibration.get("keep")
    below = (
        f"{100 * threshold:.1f}% top probability" if score == "probability" else f"{score} {threshold:.3g}"
    )
    kept = f" (keeps {100 * keep:.0f}% of correct validation answers)" if keep else ""
    return f"'not sure' below {below}{kept}"


# ---- the model -------------------------------------------------------------------------------------------
class OnnxClassifier:
    """model.onnx (exported by foodvision) run with ONNX Runtime; its metadata names classes and preprocessing."""

    def __init__(self, model_path: str | os.PathLike):
        import onnxruntime as ort

        self.path = Path(model_path)
        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.session = ort.InferenceSession(str(self.path), providers=providers or available)
        meta = self.session.get_modelmeta().custom_metadata_map.get(META_KEY)
        if not meta:
            raise SystemExit(
                f"{self.path} has no foodvision metadata ({META_KEY}): export it with foodvision"
            )
        self.meta = json.loads(meta)
        self.class_names: list[str] = list(self.meta["class_names"])
        self.preprocessing: dict[str, Any] = dict(self.meta["preprocessing"])
        self.input_name = self.session.get_inputs()[0].name
        self.provider = self.session.get_providers()[0]
        # Temperature (in the graph of foodvision's exports) and unknown threshold fitted on validation.
        self.calibration: dict[str, Any] = dict(self.meta.get("calibration") or {})

    def logits(self, images: np.ndarray) -> np.ndarray:
        """Calibrated logits (foodvision's exports divide by the temperature in their graph)."""
        logits = self.session.run(None, {self.input_name: np.ascontiguousarray(images, dtype=np.float32)})[0]
        logits = np.asarray(logits, dtype=np.float32)
        if not self.calibration.get("in_graph", True):
            logits = logits / np.float32(self.calibration.get("temperature", 1.0))
        return logits

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        return softmax(self.logits(images))

    def unknown(self, logits: np.ndarray) -> np.ndarray:
        """Per photo: below the model's unknown threshold (all False without one)."""
        threshold = self.calibration.get("unknown_threshold")
        if threshold is None:
            return np.zeros(len(logits), dtype=bool)
        return unknown_score(logits, str(self.calibration.get("unknown_score", "probability"))) < threshold

    def predict_files(self, paths: Sequence[str | os.PathLike]) -> list[Answer | str]:
        """Per file: its :class:`Answer` (class probabilities, not sure or not), or why it could not be read."""
        results: list[Answer | str] = []
        good: list[int] = []
        arrays: list[np.ndarray] = []
        for path in paths:
            try:
                arrays.append(preprocess(load_rgb(path, self.preprocessing), self.preprocessing))
                good.append(len(results))
                results.append("")
            except NotAnImageError as error:
                results.append(str(error))
            except FileNotFoundError:
                results.append(f"{Path(path).name}: file not found")
        if arrays:
            logits = self.logits(np.stack(arrays))
            for index, row, unknown in zip(good, softmax(logits), self.unknown(logits), strict=True):
                results[index] = Answer(row, bool(unknown))
        return results


# ---- the page ----------------------------------------------------------------------------------------------
CSS = """
table.fv-facts {font-size: 0.9em}
table.fv-facts th {white-space: nowrap; vertical-align: top !important; color: #555; background: none !important}
table.fv-facts td {overflow-wrap: anywhere}
.fv-results table, table.fv-facts {border-collapse: collapse !important; width: 100%; border: none !important}
.fv-results tr, .fv-results tbody, table.fv-facts tr, table.fv-facts tbody {border: none !important}
.fv-results td, .fv-results th, table.fv-facts td, table.fv-facts th {border: none !important;
  border-bottom: 1px solid #e5e7eb !important; padding: 6px 8px !important; text-align: left; vertical-align: middle}
.fv-bar {display: flex; align-items: center; gap: 6px; font-size: 0.85em; margin: 2px 0}
.fv-bar span.name {min-width: 10em}
.fv-bar div.track {background: #eee; width: 140px; height: 10px; border-radius: 5px}
.fv-bar div.fill {background: #f97316; height: 10px; border-radius: 5px}
.fv-error {color: #b91c1c; font-weight: 600}
.fv-unknown {color: #92400e; font-weight: 600; margin-bottom: 2px}
"""

SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "Segoe UI", "Roboto", "Helvetica", "Arial", "sans-serif"]


def theme() -> Any:
    """Gradio's default theme with system fonts: nothing is fetched from a font server."""
    import gradio as gr

    return gr.themes.Soft(
        primary_hue="orange",
        font=SYSTEM_FONTS,
        font_mono=["ui-monospace", "Consolas", "monospace"],
    )


def top_k(probabilities: np.ndarray, class_names: Sequence[str], k: int) -> dict[str, float]:
    order = np.argsort(-np.asarray(probabilities), kind="stable")[: max(1, min(k, len(class_names)))]
    return {class_names[i]: float(probabilities[i]) for i in order}


def facts_html(facts: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><th>{html.escape(str(key))}</th><td>{html.escape(str(value))}</td></tr>"
        for key, value in facts.items()
        if value not in (None, "")
    )
    return f'<table class="fv-facts">{rows}</table>'


def results_html(
    paths: Sequence[str], results: Sequence[Any], class_names: Sequence[str], k: int, ms: float
) -> str:
    rows = []
    for path, result in zip(paths, results, strict=True):
        name = html.escape(Path(path).name)
        if isinstance(result, str):
            cell = f'<span class="fv-error">{html.escape(result)}</span>'
        else:
            answer = answer_of(result)
            bars = [f'<div class="fv-unknown">{NOT_SURE}</div>'] if answer.unknown else []
            for label, p in top_k(answer.probabilities, class_names, k).items():
                bars.append(
                    f'<div class="fv-bar"><span class="name">{html.escape(label)}</span>'
                    f'<div class="track"><div class="fill" style="width:{100 * p:.1f}%"></div></div>'
                    f'<span class="p">{100 * p:.1f}%</span></div>'
                )
            cell = "".join(bars)
        rows.append(f"<tr><td>{name}</td><td>{cell}</td></tr>")
    done = sum(1 for r in results if not isinstance(r, str))
    head = (
        f"<p>{done} of {len(paths)} photo(s) classified in {ms:.0f} ms "
        f"({ms / max(done, 1):.1f} ms per photo)</p>"
    )
    return (
        f'<div class="fv-results">{head}<table><tr><th>file</th><th>top {k}</th></tr>'
        + "".join(rows)
        + "</table></div>"
    )


PredictFiles = Callable[[Sequence[str]], Sequence[Any]]


def photo_input(**kwargs: Any) -> Any:
    """A ``gr.Image`` that hands an upload Pillow cannot open (a text file named .jpg, an empty file) to
    the classifier, whose message says what is wrong with it; ``gr.Image`` itself raises, and the page
    showed only "Error" (with a traceback in the server's log)."""
    import gradio as gr

    class PhotoInput(gr.Image):
        def get_block_name(self) -> str:
            return "image"  # the frontend's Image component

        def preprocess(self, payload: Any) -> Any:
            try:
                return super().preprocess(payload)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
                path = getattr(payload, "path", None)
                if not path:
                    raise
                return str(path)

    return PhotoInput(**kwargs)


def build_demo(
    predict_files: PredictFiles,
    class_names: Sequence[str],
    title: str,
    facts: dict[str, Any],
    examples: Sequence[str] = (),
    k: int = 5,
    description: str = "",
) -> Any:
    """The page: one photo (upload, drop, paste, webcam) with top-k bars and time; several photos as a
    table; the model's facts; example photos. ``predict_files(paths)`` returns per path an
    :class:`Answer` (or bare class probabilities) or a message saying why the file could not be
    classified; a "not sure" answer says so above its top guesses."""
    import gradio as gr

    k = max(1, min(int(k), len(class_names)))

    def classify_one(path: str | None) -> tuple[Any, str]:
        if not path:
            return None, ""
        started = time.perf_counter()
        result = predict_files([path])[0]
        ms = 1000 * (time.perf_counter() - started)
        if isinstance(result, str):
            return None, f"**Could not classify this file:** {result}"
        answer = answer_of(result)
        best = top_k(answer.probabilities, class_names, k)
        name, p = next(iter(best.items()))
        if answer.unknown:  # still the top guesses, under a clear "not sure"
            return best, (
                f"**{NOT_SURE.capitalize()}:** this may be none of the {len(class_names)} classes; best guess "
                f"{name} ({100 * p:.1f}%) - prediction time {ms:.0f} ms"
            )
        return best, f"**{name}** ({100 * p:.1f}%) - prediction time {ms:.0f} ms"

    def classify_many(files: Sequence[Any] | None) -> str:
        paths = [str(getattr(f, "name", f)) for f in (files or [])]
        if not paths:
            return "<p>Upload one or more photos.</p>"
        started = time.perf_counter()
        results = list(predict_files(paths))
        return results_html(paths, results, class_names, k, 1000 * (time.perf_counter() - started))

    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(f"# {html.escape(title)}\n{description}")
        with gr.Row():
            with gr.Column(scale=3):
                with gr.Tab("One photo"):
                    with gr.Row():
                        with gr.Column():
                            image = photo_input(
                                type="filepath",
                                image_mode=None,  # the file as uploaded, read as predict.py reads it
                                sources=["upload", "webcam", "clipboard"],
                                label="Photo: drop, upload, paste or take one",
                                elem_id="photo",
                                height=320,
                            )
                            if examples:
                                gr.Examples(
                                    examples=[[e] for e in examples],
                                    inputs=image,
                                    label="Examples",
                                    elem_id="examples",
                                )
                        with gr.Column():
                            label = gr.Label(num_top_classes=k, label="Prediction", elem_id="prediction")
                            status = gr.Markdown(elem_id="status")
                with gr.Tab("Several photos"):
                    files = gr.File(file_count="multiple", label="Photos", elem_id="photos")
                    button = gr.Button("Classify", variant="primary", elem_id="classify-many")
                    results = gr.HTML(elem_id="results")
            with gr.Column(scale=1):
                gr.Markdown("### Model")
                gr.HTML(facts_html(facts), elem_id="facts")
                with gr.Accordion(f"{len(class_names)} classes", open=False):
                    gr.Markdown(", ".join(class_names))
        image.change(classify_one, inputs=image, outputs=[label, status], api_name="classify")
        files.upload(classify_many, inputs=files, outputs=results, api_name=False)
        button.click(classify_many, inputs=files, outputs=results, api_name="classify_many")
    return demo


def launch(
    demo: Any, host: str | None, port: int | None, share: bool = False, block: bool = True, **kwargs: Any
) -> Any:
    """Start the server (127.0.0.1 unless asked otherwise) and print its URL; then serve until Ctrl+C, or
    with ``block=False`` return the running demo (``demo.close()`` stops it)."""
    demo.launch(
        server_name=host,
        server_port=port,
        share=share,
        theme=theme(),
        css=CSS,
        footer_links=["gradio"],
        ssr_mode=False,
        quiet=True,
        prevent_thread_lock=True,
        **kwargs,
    )
    public = f" (public link: {demo.share_url})" if share and demo.share_url else ""
    print(f"foodvision demo running on {demo.local_url}{public}", flush=True)
    if block:
        print("stop it with Ctrl+C", flush=True)
        try:
            demo.block_thread()
        finally:
            demo.close()
    return demo


# ---- the exported app's entry point ------------------------------------------------------------------------
def app_facts(config: dict[str, Any], model: OnnxClassifier) -> dict[str, Any]:
    facts = dict(config.get("facts") or {})
    facts["runs on"] = f"ONNX Runtime ({model.provider.replace('ExecutionProvider', '')})"
    if unknown_fact(model.calibration):
        facts.setdefault("unknown answers", unknown_fact(model.calibration))
    return facts


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--predict", nargs="+", metavar="PHOTO", help="print probabilities as JSON lines")
    parser.add_argument("--model", default=str(HERE / "model.onnx"))
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    args = parser.parse_args(argv)
    model = OnnxClassifier(args.model)
    config_file = HERE / "app.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    if args.predict:
        for path, result in zip(args.predict, model.predict_files(args.predict), strict=True):
            if isinstance(result, str):
                print(json.dumps({"file": path, "error": result}))
            else:
                line = {
                    "file": path,
                    "probabilities": dict(zip(model.class_names, result.probabilities.tolist(), strict=True)),
                }
                if model.calibration.get("unknown_threshold") is not None:
                    line["unknown"] = result.unknown
                print(json.dumps(line))
        return
    folder = (HERE / "examples").resolve()
    examples = [
        str(HERE / e)
        for e in config.get("examples", [])
        if (HERE / e).is_file() and (HERE / e).resolve().is_relative_to(folder)  # only what is served
    ]
    demo = build_demo(
        model.predict_files,
        model.class_names,
        config.get("title", "foodvision"),
        app_facts(config, model),
        examples,
        int(config.get("top_k", 5)),
        config.get("description", ""),
    )
    # Only the example photos are served over HTTP: never the app's folder (it may hold .env, .git/, ...).
    allowed = [str(HERE / "examples")] if (HERE / "examples").is_dir() else []
    launch(demo, args.host, args.port, args.share, allowed_paths=allowed)


if __name__ == "__main__":
    sys.exit(main())

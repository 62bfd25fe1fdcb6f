"""One self-contained HTML page per evaluation (``report.html`` in eval.py's output dir; its frame and style:
:mod:`foodvision.pages`).

The report is built from what eval.py already wrote (``metrics.json``, ``per_class.csv``,
``predictions.csv``, ``most_confident_wrong.csv`` and the PNG figures) and the model: headline metrics,
training curves, the per-class table, the confusion matrix, the most-confident-mistakes grid, Grad-CAM
overlays (the ``grad-cam`` package, pytorch-grad-cam) for a sample of correct and wrong photos, and the
model's size, parameters and latency measured now. Every figure is embedded (base64), there is no script
and nothing is loaded from elsewhere, so the file can be opened anywhere or mailed. Re-runs give the same
file except for the measured timings (inside ``<span class="measured">``).
"""

from __future__ import annotations

import csv
import json
import logging
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from foodvision.atomic import write_text
from foodvision.data.images import load_rgb
from foodvision.evaluation.metrics import metric_name  # the key vocabulary of the metrics.json read here
from foodvision.inference.checkpoints import load_checkpoint_model, network_parameter_count
from foodvision.inference.predictor import Predictor
from foodvision.pages import data_uri, esc, html_page, jpeg_bytes
from foodvision.runs.layout import METRICS, REPORT

log = logging.getLogger(__name__)


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _figure(path: Path, alt: str) -> str:
    if not path.is_file():
        return f'<p class="note">{esc(path.name)} was not written ({esc(alt)}).</p>'
    return f'<figure><img class="fig" alt="{esc(alt)}" src="{data_uri(path.read_bytes())}"></figure>'


# ---- the model: size, parameters, latency ----------------------------------------------------------------------
def measure_latency(predictor: Any, repeats: int = 5, batch: int = 16) -> dict[str, float]:
    """Median ms of one photo (batch 1) and images/s of a ``batch``-photo batch through ``predictor``, as eval
    ran it (same engine, device, precision), on random inputs after a warm-up."""
    import torch

    size = predictor.preprocessing.image_size
    generator = torch.Generator().manual_seed(0)
    one = torch.randn(1, 3, size, size, generator=generator)
    many = torch.randn(batch, 3, size, size, generator=generator)
    predictor.logits(one)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        predictor.logits(one)
        times.append(time.perf_counter() - started)
    predictor.logits(many)
    started = time.perf_counter()
    rounds = 2
    for _ in range(rounds):
        predictor.logits(many)
    seconds = time.perf_counter() - started
    return {
        "ms_per_image": 1000 * statistics.median(times),
        "images_per_second": batch * rounds / seconds,
        "batch": batch,
    }


# ---- Grad-CAM ----------------------------------------------------------------------------------------------
def cam_target_layer(network: Any, image_size: int) -> Any:
    """The last module of the backbone to output a spatial feature map (N, C, H, W with H, W > 1): the
    layer Grad-CAM looks at (timm: the final BatchNormAct after conv_head; scratch CNNs: the conv stack)."""
    import torch

    found: list[Any] = []
    hooks = []
    for module in network.backbone.modules():
        if module is network.backbone:
            continue

        def hook(module: Any, _inputs: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor) and output.ndim == 4 and min(output.shape[-2:]) > 1:
                found.append(module)

        hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            network.backbone(torch.zeros(1, 3, image_size, image_size))
    finally:
        for handle in hooks:
            handle.remove()
    if not found:
        raise ValueError("the backbone has no layer with a spatial output")
    return found[-1]


def pick_samples(
    predictions: Sequence[Mapping[str, str]], wrong: Sequence[Mapping[str, str]], count: int
) -> list[dict[str, Any]]:
    """Up to ``count`` correct photos (the most confident of classes spread over the class list) and up to
    ``count`` wrong ones (the most confident mistakes). Deterministic."""
    best: dict[str, Mapping[str, str]] = {}
    for row in predictions:
        if row["true"] == row["predicted"]:
            kept = best.get(row["true"])
            if kept is None or float(row["confidence"]) > float(kept["confidence"]):
                best[row["true"]] = row
    classes = sorted(best)
    shown = min(count, len(classes))
    correct = [best[classes[i * len(classes) // shown]] for i in range(shown)]
    return [{**r, "correct": True} for r in correct] + [{**r, "correct": False} for r in wrong[:count]]


def _cam_model(checkpoint: Path, predictor: Any = None) -> tuple[Any, Any]:
    """``(classifier, ModelInfo)`` for Grad-CAM: the PyTorch model eval already holds (``predictor.model``,
    float32 weights, also behind ONNX Runtime) when it is one on the CPU, else the checkpoint's, loaded now."""
    import torch

    model = getattr(predictor, "model", None)
    if (
        isinstance(model, torch.nn.Module)
        and hasattr(model, "backbone")
        and hasattr(model, "head")
        and all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())
    ):
        return model, predictor.info

    model, info, _ = load_checkpoint_model(checkpoint)
    return model.float(), info


def gradcam_maps(network: Any, layer: Any, images: Sequence[Any], targets: Sequence[int]) -> list[np.ndarray]:
    """Grad-CAM (the ``grad-cam`` package) of class ``targets[i]`` for ``images[i]`` (C, H, W) at ``layer``,
    one photo at a time; ``network`` is left as it was found (weights' ``requires_grad``, train/eval modes).

    Grad-CAM needs the gradient of the class score with respect to the layer's output only. So the weights
    are frozen and the layer's output is made a leaf that requires grad (a hook registered before Grad-CAM's
    own, which then see that leaf): autograd records nothing below the layer, and the backward pass keeps
    only the few activations above it. The maps are those of a full backward pass (the gradient above the
    layer does not depend on what is below it). Measured on eval.py (MobileNetV2, 256 px, 12 photos): peak
    RSS +330 MB with a full backward, +40 MB so; a batch of 12 with a full backward had cost +1.6 GB."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    modes = {m: m.training for m in network.modules()}
    grads = {p: p.requires_grad for p in network.parameters()}
    for parameter in grads:
        parameter.requires_grad_(False)

    def leaf(_module: Any, _inputs: Any, output: Any) -> Any:
        return output.detach().requires_grad_(True)

    handle = layer.register_forward_hook(leaf)
    try:
        with GradCAM(model=network, target_layers=[layer]) as cam:
            return [
                cam(input_tensor=image[None], targets=[ClassifierOutputTarget(int(target))])[0]
                for image, target in zip(images, targets, strict=True)
            ]
    finally:
        handle.remove()
        for parameter, flag in grads.items():
            parameter.requires_grad_(flag)
        for module, training in modes.items():
            module.training = training


def gradcam_overlays(
    checkpoint: Path, samples: Sequence[Mapping[str, Any]], predictor: Any = None
) -> list[dict[str, Any]]:
    """For each sample: the model's input crop and its Grad-CAM heat map for the predicted class, as PNGs.

    The map is of the plain forward pass (a model with test-time flip averages it with the mirrored view).
    ``predictor`` (eval's :class:`foodvision.inference.predictor.Predictor`): its PyTorch model is used instead of a
    second copy loaded from ``checkpoint``; it is left as it was found."""
    import torch
    from PIL import Image
    from pytorch_grad_cam.utils.image import show_cam_on_image

    model, info = _cam_model(checkpoint, predictor)
    pre = info.preprocessing
    network = torch.nn.Sequential(model.backbone, model.head)  # no flip averaging: one view per map
    layer = cam_target_layer(model, pre.image_size)
    transform = pre.eval_transform()
    names = info.class_names
    images, kept = [], []
    for sample in samples:
        try:
            image = load_rgb(sample["file"], draft_size=(pre.resize_size, pre.resize_size))
        except Exception as error:  # noqa: BLE001 - a file gone since eval: leave it out
            log.info("Grad-CAM: skipping %s (%s)", sample["file"], error)
            continue
        images.append(transform(image))
        kept.append(sample)
    if not kept:
        return []
    targets = [names.index(s["predicted"]) for s in kept]
    maps = gradcam_maps(network, layer, images, targets)
    mean = torch.tensor(pre.mean).view(3, 1, 1)
    std = torch.tensor(pre.std).view(3, 1, 1)
    display = max(160, pre.image_size)
    out = []
    for sample, tensor, heat in zip(kept, images, maps, strict=True):
        rgb = (tensor * std + mean).clamp(0, 1).permute(1, 2, 0).numpy().astype(np.float32)
        overlay = show_cam_on_image(rgb, heat.astype(np.float32), use_rgb=True, image_weight=0.55)
        crop = Image.fromarray((rgb * 255).round().astype(np.uint8))
        heat_image = Image.fromarray(overlay)
        if display != pre.image_size:
            crop = crop.resize((display, display), Image.Resampling.BILINEAR)
            heat_image = heat_image.resize((display, display), Image.Resampling.BILINEAR)
        out.append({**sample, "crop": jpeg_bytes(crop), "overlay": jpeg_bytes(heat_image)})
    return out


def _cam_figure(item: Mapping[str, Any]) -> str:
    verdict = '<span class="ok">correct</span>' if item["correct"] else '<span class="wrong">wrong</span>'
    return (
        '<figure class="cam">'
        f'<img alt="photo {esc(Path(item["file"]).name)}" src="{data_uri(item["crop"], "image/jpeg")}"> '
        f'<img alt="Grad-CAM for {esc(item["predicted"])}" src="{data_uri(item["overlay"], "image/jpeg")}">'
        f"<figcaption>{verdict}: true <b>{esc(item['true'])}</b>, predicted <b>{esc(item['predicted'])}</b> "
        f"({float(item['confidence']):.2f})<br>{esc(Path(item['file']).name)}</figcaption></figure>"
    )


def gradcam_section(checkpoint: Path | None, eval_dir: Path, count: int, predictor: Any = None) -> str:
    intro = (
        "<p>Where the model looked: Grad-CAM (the <code>grad-cam</code> package) of the predicted class at the "
        "backbone's last feature map, over the model's input crop. Correct: the most confident photo of "
        "classes spread over the class list; wrong: the most confident mistakes.</p>"
    )
    if count <= 0:
        return ""
    if checkpoint is None or checkpoint.suffix.lower() != ".ckpt":
        return (
            intro
            + '<p class="note">Grad-CAM needs the training checkpoint (.ckpt), not an exported model.</p>'
        )
    samples = pick_samples(
        _read_csv(eval_dir / "predictions.csv"), _read_csv(eval_dir / "most_confident_wrong.csv"), count
    )
    if not samples:
        return intro + '<p class="note">No predictions to explain.</p>'
    try:
        items = gradcam_overlays(checkpoint, samples, predictor)
    except ImportError as error:
        return intro + f'<p class="note">Grad-CAM not drawn: {esc(error)} (pip install -e ".[demo]").</p>'
    except Exception as error:  # noqa: BLE001 - an architecture Grad-CAM cannot handle: say so, keep the report
        log.warning("Grad-CAM failed: %s: %s", type(error).__name__, error)
        return intro + f'<p class="note">Grad-CAM failed: {esc(type(error).__name__)}: {esc(error)}</p>'
    parts = [intro]
    for title, correct in (("Correct", True), ("Wrong", False)):
        chosen = [i for i in items if i["correct"] is correct]
        parts.append(f"<h3>{title} ({len(chosen)})</h3>")
        parts.append(
            f'<div class="grid" id="gradcam-{title.lower()}">' + "".join(map(_cam_figure, chosen)) + "</div>"
            if chosen
            else '<p class="note">none</p>'
        )
    return "\n".join(parts)


# ---- the page ----------------------------------------------------------------------------------------------
HEADLINE = (
    ("acc", "accuracy", True),
    ("acc_top5", "top-5 accuracy", True),
    ("f1_macro", "macro F1", False),
    ("precision_macro", "macro precision", False),
    ("recall_macro", "macro recall", False),
    ("f1_weighted", "weighted F1", False),
    ("loss", "loss", False),
)


def _card(key: str, label: str, value: float, percent: bool, interval: str = "") -> str:
    shown = f"{100 * value:.2f} %" if percent else f"{value:.4f}"
    ci = f'<div class="ci" data-interval="{key}" title="95 % bootstrap interval">{esc(interval)}</div>'
    return (
        f'<div class="card"><div class="value" data-metric="{key}" data-value="{value!r}">{shown}</div>'
        f'{ci if interval else ""}<div class="name">{esc(label)}</div></div>'
    )


def interval_text(metrics: Mapping[str, Any], key: str, percent: bool) -> str:
    """``(85.8-89.4)`` from ``<key>_ci_low``/``_ci_high`` of metrics.json ("" when eval wrote none)."""
    low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
    if not isinstance(low, (int, float)) or not isinstance(high, (int, float)):
        return ""
    return f"({100 * low:.1f}-{100 * high:.1f})" if percent else f"({low:.3f}-{high:.3f})"


def with_interval(value: float, interval: str, percent: bool = True) -> str:
    """``87.6 % (85.8-89.4)``: a number and its 95 % interval, as the report shows them."""
    shown = f"{100 * value:.1f} %" if percent else f"{value:.3f}"
    return f"{shown} {interval}".strip()


def trust_section(metrics: Mapping[str, Any], eval_dir: Path) -> str:
    """Calibration (ECE, Brier, reliability diagram), the unknown answer and its separation from outside
    photos, and the bootstrap intervals: what eval's foodvision.evaluation.trust wrote into metrics.json."""
    split = metrics.get("split", "test")

    def get(name: str) -> Any:
        value = metrics.get(metric_name(split, name))
        return value if isinstance(value, (int, float)) else None

    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.1f} %"

    if get("ece") is None and get("acc_ci_low") is None:
        return ""
    calibration = metrics.get("calibration") or {}
    parts = []
    if get("acc_ci_low") is not None:
        boot = metrics.get("bootstrap") or {}
        acc = with_interval(get("acc"), interval_text(metrics, metric_name(split, "acc"), True))
        f1 = with_interval(
            get("f1_macro"), interval_text(metrics, metric_name(split, "f1_macro"), False), percent=False
        )
        parts.append(
            f'<p id="intervals">Accuracy <b>{esc(acc)}</b>, macro F1 <b>{esc(f1)}</b>: 95 % intervals of a '
            f"seeded bootstrap ({esc(boot.get('resamples', '?'))} resamples of the {esc(metrics.get('num_images'))} "
            f"{esc(split)} photos, seed {esc(boot.get('seed', '?'))}); each class's F1 interval is in the "
            "per-class table. Two runs whose intervals overlap may not differ: compare.py tests them pair by pair."
            "</p>"
        )
    if get("ece") is not None:
        fitted = calibration.get("fitted_on") or ""
        temperature = calibration.get("temperature", 1.0)
        how = (
            f"temperature {temperature:.3f}, fitted by NLL on the {esc(fitted)}"
            if fitted
            else "no temperature fitted (temperature 1): run <code>eval.py calibrate=true</code>"
        )
        rows = [
            ("ECE (15 bins)", get("ece_uncalibrated"), get("ece")),
            ("Brier score", get("brier_uncalibrated"), get("brier")),
            ("NLL (loss)", get("loss_uncalibrated"), get("loss")),
        ]
        cells = "".join(
            f'<tr data-key="{esc(name)}"><td>{esc(name)}</td><td class="num">{before:.4f}</td>'
            f'<td class="num">{after:.4f}</td></tr>'
            for name, before, after in rows
            if before is not None and after is not None
        )
        parts.append(
            f"<h3>Calibration</h3><p>Probabilities are divided by a {how}; every tool and export applies it.</p>"
            f'<table id="calibration"><tr><th></th><th>uncalibrated</th><th>calibrated</th></tr>{cells}</table>'
            + _figure(eval_dir / "reliability.png", "reliability diagram")
        )
    threshold = calibration.get("unknown_threshold")
    if threshold is not None and get("unknown_share") is not None:
        score = calibration.get("unknown_score", "probability")
        keep = calibration.get("keep")
        text = (
            f'<h3>"Not sure" answers</h3><p id="unknown">A photo whose {esc(score)} score is below '
            f"{threshold:.4g} (the threshold keeping {100 * (keep or 0):.0f} % of the correct validation answers) "
            f"is answered \u201cnot sure\u201d, with its top guesses. On this split: "
            f"{pct(get('unknown_share'))} of the photos, accuracy of the rest {pct(get('acc_answered'))}, "
            f"{pct(get('correct_kept'))} of the correct answers kept.</p>"
        )
        if get("outside_auroc") is not None:
            lines = []
            for kind in ("probability", "energy", "max_logit"):
                auroc, rejected = get(f"outside_auroc_{kind}"), get(f"outside_rejected_{kind}")
                inside = get(f"unknown_share_{kind}")
                mark = " (used)" if kind == score else ""
                lines.append(
                    f'<tr data-score="{kind}"><td>{esc(kind)}{mark}</td>'
                    f'<td class="num">{"n/a" if auroc is None else f"{auroc:.3f}"}</td>'
                    f'<td class="num">{pct(rejected)}</td><td class="num">{pct(inside)}</td></tr>'
                )
            inputs = list((metrics.get("outside") or {}).get("inputs", []))
            sources = ", ".join(inputs[:3]) + (f" and {len(inputs) - 3} more" if len(inputs) > 3 else "")
            text += (
                f"<p>Against {esc(get('outside_photos'))} photos from outside the classes ({esc(sources)}): "
                f"AUROC {get('outside_auroc'):.3f} (1: perfectly separated, 0.5: not at all), "
                f"{pct(get('outside_rejected'))} of them answered \u201cnot sure\u201d.</p>"
                '<table id="outside"><tr><th>score</th><th>AUROC</th><th>outside photos rejected</th>'
                f"<th>{esc(split)} photos rejected</th></tr>" + "".join(lines) + "</table>"
            )
        parts.append(text)
    return "\n".join(parts)


def _per_class_table(
    rows: Sequence[Mapping[str, str]], f1_ci: Mapping[str, Sequence[float]] | None = None
) -> str:
    if not rows:
        return '<p class="note">per_class.csv was not written.</p>'
    f1_ci = f1_ci or {}
    ci_head = "<th>F1 95 % interval</th>" if f1_ci else ""
    lines = [
        '<table id="per-class"><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th>'
        f"{ci_head}<th>support</th></tr>"
    ]
    f1s = [float(r["f1"]) for r in rows]
    low = sorted(f1s)[max(0, len(f1s) // 10 - 1)] if len(f1s) >= 10 else -1.0
    for row in rows:
        cells = []
        for key in ("precision", "recall", "f1"):
            value = float(row[key])
            cells.append(
                f'<td class="num bar" data-key="{key}" data-value="{esc(row[key])}">'
                f'<span class="fill" style="width:{100 * value:.1f}%"></span><span class="v">{value:.3f}</span></td>'
            )
        css = ' class="low"' if float(row["f1"]) <= low else ""
        interval = f1_ci.get(row["class"])
        ci = (
            f'<td class="num" data-interval="f1">{interval[0]:.3f}-{interval[1]:.3f}</td>'
            if interval
            else ("<td></td>" if f1_ci else "")
        )
        lines.append(
            f'<tr{css} data-class="{esc(row["class"])}"><td>{esc(row["class"])}</td>{"".join(cells)}{ci}'
            f'<td class="num">{esc(row["support"])}</td></tr>'
        )
    return "\n".join(lines) + "</table>"


def _model_table(facts: Sequence[tuple[str, str]]) -> str:
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in facts)
    return f'<table id="model">{rows}</table>'


def model_facts(
    predictor: Any, checkpoint: Path | None, latency: Mapping[str, float] | None
) -> list[tuple[str, str]]:
    """(label, HTML) rows: architecture, parameters, file size, input, engine, measured latency."""
    facts: list[tuple[str, str]] = []
    info = predictor.info if predictor is not None else None
    if info is not None:
        facts.append(("architecture", esc(info.architecture)))
        pre = info.preprocessing
        facts.append(
            (
                "input",
                esc(
                    f"{pre.image_size} px: shorter side to {pre.resize_size} ({pre.interpolation}), centre crop, "
                    f"mean {list(pre.mean)}, std {list(pre.std)}"
                ),
            )
        )
        if info.model.get("test_time_flip"):
            facts.append(("test-time flip", "yes (each photo averaged with its mirror image)"))
        if info.weights_source:
            facts.append(("initial weights", esc(info.weights_source)))
    state = getattr(predictor, "checkpoint", None)
    if state is not None:
        params = network_parameter_count(state)
        facts.append(("parameters", f'<span data-key="parameters" data-value="{params}">{params:,}</span>'))
    if checkpoint is not None and checkpoint.is_file():
        facts.append(("model file", esc(f"{checkpoint} ({checkpoint.stat().st_size / 1e6:.1f} MB)")))
    if predictor is not None:
        precision = "bf16 autocast" if predictor.precision == "bf16" else "float32"
        facts.append(("engine", esc(f"{predictor.engine}, {predictor.device.type}, {precision}")))
    if latency:
        import torch

        facts.append(
            (
                "latency (measured now)",
                f'<span class="measured">{latency["ms_per_image"]:.1f} ms per photo (batch 1), '
                f"{latency['images_per_second']:.0f} images/s (batch {latency['batch']})</span> "
                f"on this machine ({torch.get_num_threads()} threads), model only, random input",
            )
        )
    return facts


def build_report(eval_dir: Path, predictor: Any = None, gradcam: int = 6, latency: bool = True) -> str:
    eval_dir = Path(eval_dir)
    metrics = json.loads((eval_dir / METRICS).read_text())
    checkpoint = Path(metrics["checkpoint"]) if metrics.get("checkpoint") else None
    if predictor is not None:
        checkpoint = Path(predictor.path)
    measured = None
    if predictor is not None and latency:
        try:
            measured = measure_latency(predictor)
        except Exception as error:  # noqa: BLE001 - timing is a nicety
            log.warning("latency not measured: %s", error)
    model_name = metrics.get("model") or (predictor.info.architecture if predictor is not None else "model")
    split = metrics.get("split", "test")
    per_class = _read_csv(eval_dir / "per_class.csv")
    wrong = _read_csv(eval_dir / "most_confident_wrong.csv")
    title = f"{model_name} on the {split} split"
    skipped = metrics.get("skipped_images") or []
    notes = list(metrics.get("notes") or [])
    if skipped:
        notes.append(
            f"{len(skipped)} unreadable image(s) skipped, e.g. {skipped[0]['file']}: {skipped[0]['reason']}"
        )
    headline = [(metric_name(split, key), label, percent) for key, label, percent in HEADLINE]
    cards = "".join(
        _card(key, label, float(metrics[key]), percent, interval_text(metrics, key, percent))
        for key, label, percent in headline
        if isinstance(metrics.get(key), (int, float))
    )
    body = [
        f"<h1>Evaluation report: {esc(title)}</h1>",
        f'<p class="sub">{esc(metrics.get("num_images", "?"))} images, {esc(metrics.get("num_classes", "?"))} '
        f"classes; checkpoint <code>{esc(metrics.get('checkpoint', '?'))}</code></p>",
        f'<p class="sub">data: {esc(metrics.get("data", "?"))}</p>',
        f'<div class="cards" id="headline">{cards}</div>',
        "".join(f'<p class="note">{esc(n)}</p>' for n in notes),
        "<h2>Model</h2>",
        _model_table(model_facts(predictor, checkpoint, measured)),
        "<h2>Training curves</h2>",
        _figure(eval_dir / "curves.png", "no TensorBoard events next to the checkpoint"),
        f"<h2>Per class ({len(per_class)} classes)</h2>",
        "<p>Precision, recall and F1 of every class on this split"
        + ("; the lowest-F1 tenth in red.</p>" if len(per_class) >= 10 else ".</p>"),
        _per_class_table(per_class, metrics.get(metric_name(split, "f1_ci")) or {}),
        *(
            ["<h2>Trusting the numbers</h2>", trusted]
            if (trusted := trust_section(metrics, eval_dir))
            else []
        ),
        "<h2>Confusion matrix</h2>",
        _figure(eval_dir / "confusion_matrix.png", "confusion matrix"),
        f"<h2>Most confident mistakes ({len(wrong)} wrong)</h2>",
        _figure(eval_dir / "most_confident_wrong.png", "most confident mistakes"),
    ]
    cams = gradcam_section(checkpoint, eval_dir, gradcam, predictor)
    if cams:
        body += ["<h2>Grad-CAM</h2>", cams]
    body.append(
        '<p class="sub" style="margin-top:32px">Written by foodvision eval.py; the figures are the PNG files '
        "beside this page, embedded.</p>"
    )
    return html_page(f"foodvision report: {title}", "\n".join(body))


def write_report(eval_dir: str | Path, predictor: Any = None, gradcam: int = 6, latency: bool = True) -> Path:
    """Write ``report.html`` into ``eval_dir`` from the files eval.py wrote there; ``predictor`` (a
    :class:`foodvision.inference.predictor.Predictor`, or a model path) gives the model facts and the latency."""
    if predictor is not None and isinstance(predictor, (str, Path)):
        predictor = Predictor(predictor, device="cpu", precision="32")
    path = Path(eval_dir) / REPORT
    write_text(path, build_report(Path(eval_dir), predictor, gradcam, latency))  # atomically, UTF-8
    log.info("report: %s", path)
    return path

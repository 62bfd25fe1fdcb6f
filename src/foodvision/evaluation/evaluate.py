"""`python eval.py ckpt_path=...`: metrics, per-class table, confusion matrix, worst mistakes and curves.

The model comes with its own class names and preprocessing (no training config needed). The data
defaults to the run's own data (``config.yaml`` next to ``checkpoints/``), else Food-101 found as ``train.py``
finds it; ``data=imagefolder data.root=...`` or ``data.root=...`` point elsewhere. Images are read in
a fixed order, so re-running gives identical files.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from foodvision.atomic import atomic_open, ensure_dir, finite_json, write_text
from foodvision.cli import required
from foodvision.data.datamodule import FoodDataModule, default_num_workers
from foodvision.data.images import load_rgb
from foodvision.data.roots import (
    normalise_split,
    resolve_eval_data,
)
from foodvision.errors import ClassMismatchError, ToolError
from foodvision.evaluation import trust
from foodvision.evaluation.figures import confusion_figure, plt, save_figure
from foodvision.evaluation.metrics import RunningMetrics, metric_name, top_prediction
from foodvision.evaluation.report import (
    write_report,  # report.html from the files above (foodvision.evaluation.report)
)
from foodvision.inference.batches import Stream, stream_files
from foodvision.inference.calibration import Calibration
from foodvision.inference.checkpoints import run_dir_of
from foodvision.inference.predictor import predictor_from_config
from foodvision.runs.layout import METRICS, eval_dir

log = logging.getLogger(__name__)

PREDICTION_COLUMNS = ("file", "true", "predicted", "confidence")


# ---- classes ------------------------------------------------------------------------------------------
def _names(names: Sequence[str], limit: int = 12) -> str:
    names = list(names)
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def match_classes(
    model_classes: Sequence[str], data_classes: Sequence[str], model: str, data: str
) -> list[int]:
    """For each data class index, the model's output index of that class; an error naming the differences
    unless both have exactly the same classes (in any order)."""
    model_set, data_set = set(model_classes), set(data_classes)
    if model_set != data_set:
        only_model = sorted(model_set - data_set)
        only_data = sorted(data_set - model_set)
        parts = [f"{model} has {len(model_classes)} classes, {data} has {len(data_classes)}"]
        if only_model:
            parts.append(f"only in the model: {_names(only_model)}")
        if only_data:
            parts.append(f"only in the data: {_names(only_data)}")
        hint = "Evaluate on data with exactly the model's classes"
        if model_set < data_set:
            hint += f" (for a Food-101 tree: data.classes=[{','.join(sorted(model_classes))}])"
        raise ClassMismatchError(f"the model's classes do not fit the data: {'; '.join(parts)}. {hint}.")
    index = {name: i for i, name in enumerate(model_classes)}
    return [index[name] for name in data_classes]


# ---- training curves -------------------------------------------------------------------------------------
CURVE_TAGS = ("train/loss", "val/loss", "train/acc", "val/acc")


def read_curves(run_dir: Path) -> dict[str, list[tuple[int, float]]] | None:
    """Per-epoch ``train/val`` loss and accuracy from the run's TensorBoard events; None without events."""
    if not any(Path(run_dir).glob("events.out.tfevents.*")):
        return None
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logging.getLogger("tensorboard").setLevel(logging.WARNING)  # no "Directory watcher advancing ..." lines
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0}).Reload()
    tags = set(events.Tags().get("scalars", []))
    epoch_at: dict[int, int] = {}
    if "epoch" in tags:
        for event in events.Scalars("epoch"):
            epoch_at.setdefault(event.step, int(event.value))  # first: fit's epoch, not the later test's
    curves: dict[str, list[tuple[int, float]]] = {}
    for tag in CURVE_TAGS:
        if tag in tags:
            points: dict[int, float] = {}
            for i, event in enumerate(events.Scalars(tag)):
                points[epoch_at.get(event.step, i)] = float(event.value)  # a resumed epoch: the latest value
            curves[tag] = sorted(points.items())
    return curves or None


def curves_figure(curves: Mapping[str, list[tuple[int, float]]], title: str):
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=100)
    for ax, metric, label in ((axes[0], "loss", "cross-entropy loss"), (axes[1], "acc", "accuracy")):
        for stage, style in (("train", "-o"), ("val", "--s")):
            points = curves.get(f"{stage}/{metric}")
            if points:
                ax.plot([e + 1 for e, _ in points], [v for _, v in points], style, label=stage, markersize=4)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    val_acc = curves.get("val/acc")
    if val_acc:
        best_epoch, best = max(val_acc, key=lambda p: (p[1], -p[0]))
        axes[1].axvline(best_epoch + 1, color="grey", linestyle=":", linewidth=1)
        last = best_epoch == max(e for e, _ in val_acc)
        axes[1].annotate(
            f"best val {best:.3f}",
            (best_epoch + 1, best),
            textcoords="offset points",
            xytext=(-4 if last else 4, -12),
            ha="right" if last else "left",
            bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1},
        )
    for ax in axes:
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


# ---- worst mistakes --------------------------------------------------------------------------------------
def wrong_grid_figure(rows: Sequence[Mapping[str, Any]], title: str, columns: int = 4):
    """Thumbnails of misclassified images with file, true and predicted class and confidence."""
    if not rows:
        fig, ax = plt.subplots(figsize=(6, 2), dpi=100)
        ax.axis("off")
        ax.text(0.5, 0.5, "no misclassified images", ha="center", va="center", fontsize=14)
        ax.set_title(title, fontsize=10)
        return fig
    columns = min(columns, len(rows))
    lines = math.ceil(len(rows) / columns)
    fig, axes = plt.subplots(lines, columns, figsize=(3.2 * columns, 3.6 * lines), dpi=100, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, row in zip(axes.flat, rows, strict=False):
        try:
            image = load_rgb(row["file"], draft_size=(256, 256))
            image.thumbnail((256, 256))
            ax.imshow(image)
        except Exception as error:  # noqa: BLE001 - a file changed since prediction: say so in its cell
            ax.text(0.5, 0.5, f"unreadable\n{type(error).__name__}", ha="center", va="center")
        name = Path(row["file"]).name
        name = name if len(name) <= 30 else name[:27] + "..."
        ax.set_title(
            f"{name}\ntrue: {row['true']}\npred: {row['predicted']} ({float(row['confidence']):.2f})",
            fontsize=8,
            color="darkred",
        )
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


# ---- writing ---------------------------------------------------------------------------------------------
def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    with atomic_open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _f(value: float) -> str:
    return f"{value:.6f}"


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``cfg.ckpt_path`` on ``cfg.data.split``; writes the eval dir and returns its metrics."""
    ckpt_path = required(cfg, "ckpt_path", "ckpt_path=lightning_logs/runs/<run>/checkpoints/last.ckpt")
    predictor, batch_size = predictor_from_config(cfg, ckpt_path)
    resamples = trust.check_options(cfg, predictor)  # before any work: calibrate, unknown_*, bootstrap
    run_dir = run_dir_of(predictor.path)
    split = normalise_split(cfg.data.get("split", "test"))
    data_args, origin = resolve_eval_data(cfg, run_dir)
    # Built directly, never through hydra.utils.instantiate: the arguments may come from a stored config.
    datamodule = FoodDataModule(**{k: v for k, v in data_args.items() if k != "_target_"})
    splits = datamodule.discover()
    samples = splits.splits[split]
    if not samples:
        raise ToolError(f"the {split} split of {datamodule.root} has no images")
    names = predictor.class_names
    to_model = match_classes(names, splits.classes, f"model {predictor.path.name}", f"the {split} data")
    files = [path for path, _ in samples]
    labels = np.array([to_model[label] for _, label in samples], dtype=np.int64)
    if cfg.get("calibrate"):  # temperature + unknown threshold fitted on the val split, saved in the ckpt
        val = splits.splits.get("val") or []
        val_labels = np.array([to_model[label] for _, label in val], dtype=np.int64)
        trust.calibrate_predictor(
            predictor, [p for p, _ in val], val_labels, cfg, batch_size, _workers(cfg), str(datamodule.root)
        )
    out = Path(cfg.output_dir) if cfg.get("output_dir") else eval_dir(run_dir, split)
    ensure_dir(out)
    log.info("evaluating %d %s images from %s (%s) -> %s", len(files), split, datamodule.root, origin, out)

    # One pass, batch by batch: predictions.csv is written as the batches come, the metrics are running
    # totals, and only the misclassified rows are kept (for most_confident_wrong): memory stays flat in the
    # number of images.
    num_classes = len(names)
    totals = RunningMetrics(num_classes)
    trusted = trust.TrustTotals(num_classes, predictor.calibration)  # calibration, unknown answers, intervals
    wrong: list[dict[str, Any]] = []
    stream = Stream()
    # Streamed to a per-process temporary name (two evals into one dir never share it), renamed when done.
    with atomic_open(out / "predictions.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(PREDICTION_COLUMNS)
        for batch in stream_files(
            predictor,
            files,
            batch_size=batch_size,
            num_workers=_workers(cfg),
            progress=bool(cfg.get("progress", True)),
            desc=f"eval {split}",
            stream=stream,
        ):
            if not batch.indices:
                continue
            true = torch.from_numpy(labels[batch.indices])
            confidence, predicted = top_prediction(batch.logits)  # the class the totals count
            totals.update(batch.logits, true)
            trusted.update(batch.logits, true)
            for index, t, p, c in zip(
                batch.indices, true.tolist(), predicted.tolist(), confidence.tolist(), strict=True
            ):
                row = {"file": files[index], "true": names[t], "predicted": names[p], "confidence": float(c)}
                writer.writerow([row["file"], row["true"], row["predicted"], _f(row["confidence"])])
                if t != p:
                    wrong.append(row)
        if not stream.predicted:  # raised inside: the temporary file goes, an earlier predictions.csv stays
            raise ToolError(
                f"none of the {len(files)} {split} images could be read (first: {stream.failed[0][1]})"
            )
    scores = totals.scores()
    confusion, per_class = scores.confusion, scores.per_class

    metrics: dict[str, Any] = scores.named(split)
    metrics.update(
        {
            "split": split,
            "num_images": scores.count,
            "num_classes": num_classes,
            "skipped_images": [{"file": f, "reason": r} for f, r in stream.failed],
            "checkpoint": str(predictor.path),
            "model": predictor.info.architecture,
            "precision": predictor.precision,
            "engine": predictor.engine,
            "data": f"{splits.origin}; {origin}",
        }
    )
    trust.add_metrics(cfg, predictor, trusted, metrics, out, batch_size, _workers(cfg), resamples)
    write_csv(
        out / "per_class.csv",
        ["class", "precision", "recall", "f1", "support"],
        [
            [
                name,
                _f(per_class["precision"][i]),
                _f(per_class["recall"][i]),
                _f(per_class["f1"][i]),
                int(per_class["support"][i]),
            ]
            for i, name in enumerate(names)
        ],
    )
    write_csv(
        out / "confusion_matrix.csv",
        ["true \\ predicted", *names],
        [[name, *map(int, confusion[i])] for i, name in enumerate(names)],
    )
    accuracy = metrics[metric_name(split, "acc")]
    title = f"{split} confusion (row-normalised)\n{predictor.info.architecture}, accuracy {accuracy:.3f}"
    save_figure(confusion_figure(confusion, names, title), out / "confusion_matrix.png")

    wrong.sort(key=lambda r: (-r["confidence"], r["file"]))
    write_csv(
        out / "most_confident_wrong.csv",
        PREDICTION_COLUMNS,
        [[r["file"], r["true"], r["predicted"], _f(r["confidence"])] for r in wrong],
    )
    shown = wrong[: int(cfg.get("top_wrong", 16))]
    grid_title = (
        f"most confident mistakes ({len(shown)} of {len(wrong)} wrong of {scores.count} {split} images)"
    )
    save_figure(wrong_grid_figure(shown, grid_title), out / "most_confident_wrong.png")

    curves = read_curves(run_dir)
    if curves:
        save_figure(curves_figure(curves, f"training curves - {run_dir.name}"), out / "curves.png")
    else:
        (out / "curves.png").unlink(missing_ok=True)  # from an earlier model evaluated into this dir
        note = f"no TensorBoard events in {run_dir}: curves.png not written"
        log.info(note)
        metrics["notes"] = [note]
    metrics["eval_dir"] = str(out)
    write_text(out / METRICS, json.dumps(finite_json(metrics), indent=2, allow_nan=False) + "\n")
    if cfg.get("report", True):
        write_report(out, predictor)
    _print_summary(metrics, out, stream.images_per_second)
    return metrics


def _workers(cfg: DictConfig) -> int:

    workers = cfg.get("num_workers")
    return default_num_workers() if workers is None else int(workers)


def calibrate_checkpoint(cfg: Any, ckpt_path: str | Path) -> Calibration:
    """``eval.py``'s calibration step alone, for a checkpoint (train.py: the run's ``last.ckpt`` besides
    the tested best one): its run's val split, as eval finds the data."""
    predictor, batch_size = predictor_from_config(cfg, ckpt_path)
    data_args, _ = resolve_eval_data(cfg, run_dir_of(predictor.path))
    datamodule = FoodDataModule(**{k: v for k, v in data_args.items() if k != "_target_"})
    splits = datamodule.discover()
    to_model = match_classes(
        predictor.class_names, splits.classes, f"model {predictor.path.name}", "the val data"
    )
    files = [str(path) for path, _ in splits.splits["val"]]
    labels = np.array([to_model[label] for _, label in splits.splits["val"]], dtype=np.int64)
    return trust.calibrate_predictor(
        predictor, files, labels, cfg, batch_size, _workers(cfg), str(datamodule.root)
    )


def _print_summary(metrics: Mapping[str, Any], out: Path, speed: float) -> None:
    keys = ("acc", "acc_top5", "loss", "precision_macro", "recall_macro", "f1_macro", "f1_weighted")
    split = metrics["split"]
    lines = [
        f"  {k:<17}{metrics[metric_name(split, k)]:.4f}" for k in keys if metric_name(split, k) in metrics
    ]
    skipped = len(metrics["skipped_images"])
    print(
        f"\n{metrics['split']}: {metrics['num_images']} images, {metrics['num_classes']} classes"
        f" ({speed:.1f} images/s{f', {skipped} unreadable skipped' if skipped else ''})\n"
        + "\n".join(lines + trust.summary_lines(metrics))
        + f"\neval dir: {out}",
        flush=True,
    )

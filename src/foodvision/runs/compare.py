"""`python compare.py runs=lightning_logs/runs` (or `runs=[dir1,dir2]`, or a multirun folder): a leaderboard.

One row per run, sorted by test accuracy: recipe (model, lr, epochs, augmentation, unfrozen blocks),
train/val/test accuracy, test loss and macro F1, parameters (total and trainable), checkpoint size,
training time and the inference throughput measured now, on this machine. Runs that failed or are
incomplete are listed with their status. Writes ``leaderboard.csv``, ``leaderboard.md`` (with a
recommendation) and the same as one HTML page, ``leaderboard.html``. The recommendation says whether the
best run is significantly better than the runner-up: McNemar's paired test on the per-photo correctness
of their ``eval-test/predictions.csv`` when both were tested on the same photos.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from foodvision.atomic import atomic_open, write_text
from foodvision.cli import required
from foodvision.config.recipe import finetune_settings
from foodvision.errors import ModelLoadError
from foodvision.evaluation.statistics import mcnemar, significant
from foodvision.hardware import inference_precision
from foodvision.inference.checkpoints import load_checkpoint_model
from foodvision.inference.predictor import measure_throughput
from foodvision.pages import esc, html_page, inline_markdown
from foodvision.runs.layout import PREDICTIONS, eval_dir, find_runs, read_config, run_row, test_images
from foodvision.runs.tables import format_cell, markdown_table
from foodvision.training.callbacks.finetune import NORM_TYPES, select_groups

log = logging.getLogger(__name__)

COLUMNS = [
    ("rank", "rank"),
    ("run", "run"),
    ("status", "status"),
    ("model", "model"),
    ("image_size", "px"),
    ("lr", "lr"),
    ("epochs", "epochs"),
    ("augment", "augment"),
    ("unfreeze", "unfreeze"),
    ("train_acc", "train acc"),
    ("val_acc", "val acc"),
    ("test_acc", "test acc"),
    ("test_loss", "test loss"),
    ("test_f1_macro", "macro F1"),
    ("params_total", "params"),
    ("params_trainable", "trainable"),
    ("checkpoint_mb", "ckpt MB"),
    ("train_seconds", "train s"),
    ("images_per_second", "img/s"),
    ("checkpoint", "checkpoint"),
    ("note", "note"),
]


# ---- one row -------------------------------------------------------------------------------------------
def count_parameters(model: Any, finetune: bool, unfreeze: Any, train_bn: bool) -> tuple[int, int]:
    """Total parameters, and those the run's recipe trains: everything without fine-tuning, else the head
    plus the unfrozen blocks (their norm layers only with ``train_bn``), as ``TwoStageFinetuning`` does."""
    total = sum(p.numel() for p in model.parameters())
    if not finetune:
        return total, total
    head = sum(p.numel() for p in model.head.parameters())
    selected = {
        name for group in select_groups(model.block_groups(), unfreeze) for name in group.parameter_names
    }
    norms: set[str] = set()
    if not train_bn:
        for module_name, module in model.backbone.named_modules():
            if isinstance(module, NORM_TYPES):
                norms |= {
                    f"{module_name}.{p}" if module_name else p
                    for p, _ in module.named_parameters(recurse=False)
                }
    assert isinstance(model.backbone, nn.Module)
    backbone = sum(
        p.numel() for n, p in model.backbone.named_parameters() if n in selected and n not in norms
    )
    return total, head + backbone


def leaderboard_row(
    run_dir: Path, throughput: bool = True, precision: str = "32", batch: int = 32, iterations: int = 3
) -> dict[str, Any]:
    """The run's row (:func:`foodvision.runs.layout.run_row`) plus what its checkpoint's model says:
    parameters (total and trainable per the recipe) and, with ``throughput``, images/s measured now. Never
    raises for a broken run (its ``note`` says)."""
    row = run_row(run_dir)
    if not row.get("checkpoint"):
        return row
    try:
        model, info, _ = load_checkpoint_model(Path(run_dir) / row["checkpoint"])
    except ModelLoadError as error:
        row["note"] = "; ".join(n for n in (row["note"], str(error)) if n)
        return row
    if row.get("model") is None:
        row["model"] = info.architecture
    if row.get("image_size") is None:
        row["image_size"] = info.preprocessing.image_size
    finetune = finetune_settings(read_config(Path(run_dir))) or {}
    row["params_total"], row["params_trainable"] = count_parameters(
        model, bool(finetune), finetune.get("unfreeze", "none"), bool(finetune.get("train_bn", False))
    )
    if throughput:
        row["images_per_second"] = measure_throughput(
            model, info.preprocessing.image_size, precision, batch, iterations
        )
    return row


def rank_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Completed runs by test accuracy (best first, ties: lower test loss, then name), then the rest."""

    def key(row: dict[str, Any]) -> tuple:
        acc = row.get("test_acc")
        loss = row.get("test_loss")
        return (acc is None, -(acc or 0.0), loss if loss is not None else math.inf, row["run"])

    ranked = sorted(rows, key=key)
    place = 0
    for row in ranked:
        if row.get("test_acc") is not None:
            place += 1
            row["rank"] = place
        else:
            row["rank"] = None
    return ranked


# ---- output --------------------------------------------------------------------------------------------
def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    keys = [key for key, _ in COLUMNS]
    with atomic_open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(keys)
        for row in rows:
            values = []
            for key in keys:
                value = row.get(key)
                values.append(
                    "" if value is None else (f"{value:.6g}" if isinstance(value, float) else value)
                )
            writer.writerow(values)


def leaderboard_table(rows: Sequence[dict[str, Any]]) -> str:
    return markdown_table(rows, [(k, title) for k, title in COLUMNS if k != "checkpoint"])


# ---- paired comparison of the two best runs --------------------------------------------------------------
def read_test_predictions(run_dir: Path) -> dict[str, tuple[str, bool]] | None:
    """Per test photo of the run (eval-test/predictions.csv, as eval.py and train.py write it): its true
    class and whether the run got it right; None without a readable file."""
    path = eval_dir(run_dir) / PREDICTIONS
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            return {r["file"]: (r["true"], r["true"] == r["predicted"]) for r in csv.DictReader(handle)}
    except (OSError, KeyError, ValueError, csv.Error) as error:
        if path.exists():
            log.warning("paired test: cannot read %s (%s)", path, error)
        return None


def paired_test(best: dict[str, Any], second: dict[str, Any]) -> dict[str, Any] | None:
    """McNemar's test (foodvision.evaluation.statistics) of the two runs' per-photo correctness, when both were
    evaluated on the same photos (same files, same true classes); None otherwise (``reason`` in a dict
    with ``p_value`` None when the photos differ)."""
    a, b = read_test_predictions(Path(best["path"])), read_test_predictions(Path(second["path"]))
    if a is None or b is None:
        return None
    if set(a) != set(b) or any(a[f][0] != b[f][0] for f in a):
        return {"p_value": None, "reason": "they were tested on different photos"}
    files = sorted(a)
    return mcnemar([a[f][1] for f in files], [b[f][1] for f in files])


def _paired_verdict(best: dict[str, Any], second: dict[str, Any], gap: float) -> str:
    """The sentence after "is N points behind": McNemar's verdict and what to prefer, else the noise of
    the test set's size."""
    paired = paired_test(best, second)
    if paired is not None and paired["p_value"] is not None:
        counts = (
            f"McNemar's paired test on the same {paired['photos']:,} test photos: {paired['only_a']} only "
            f"`{best['run']}` got right, {paired['only_b']} only `{second['run']}`; p = {paired['p_value']:.2g}"
        )
        if significant(paired["p_value"]):
            return f": significant at 95 % ({counts})."
        cheaper = []
        if (second.get("params_total") or math.inf) < (best.get("params_total") or 0):
            cheaper.append("smaller")
        if (second.get("images_per_second") or 0) > (best.get("images_per_second") or math.inf):
            cheaper.append("faster")
        if cheaper:
            advice = f"prefer the {'/'.join(cheaper)} `{second['run']}` unless those {_points(gap)} matter"
        else:
            advice = f"a tie within noise; `{best['run']}` is no larger or slower, so it stays the choice"
        return f", not significant at 95 % ({counts}): {advice}."
    n = test_images(Path(best["path"]))
    different = f" ({paired['reason']}: no paired test)" if paired is not None else ""
    if not n:
        return f"{different}."
    error = math.sqrt(max(best["test_acc"] * (1 - best["test_acc"]), 1e-9) / n)
    verdict = "beyond" if gap > 2 * error else "within"
    return f", {verdict} the noise of its {n}-image test set (2 standard errors: {_points(2 * error)}){different}."


def _points(difference: float) -> str:
    return f"{100 * difference:.1f} percentage points"


def recommendation(rows: Sequence[dict[str, Any]]) -> str:
    """One paragraph: the best run by test accuracy and what it costs against the alternatives."""
    done = [r for r in rows if r.get("test_acc") is not None]
    failed = len(rows) - len(done)
    tail = f" {failed} run(s) failed or are incomplete and were not considered." if failed else ""
    if not done:
        return "No run has a test accuracy yet, so there is nothing to recommend." + tail
    best = done[0]

    def describe(row: dict[str, Any]) -> str:
        parts = [f"test accuracy {row['test_acc']:.1%}"]
        if row.get("test_f1_macro") is not None:
            parts.append(f"macro F1 {row['test_f1_macro']:.3f}")
        if row.get("params_total"):
            parts.append(f"{format_cell('params_total', row['params_total'])} parameters")
        if row.get("checkpoint_mb"):
            parts.append(f"a {row['checkpoint_mb']:.1f} MB checkpoint")
        if row.get("train_seconds") is not None:
            parts.append(f"{row['train_seconds']:.0f} s of training")
        if row.get("images_per_second"):
            parts.append(f"{row['images_per_second']:.0f} images/s here")
        return ", ".join(parts)

    text = [f"**Recommended: `{best['run']}`** ({best.get('model', '?')}): {describe(best)}."]
    if len(done) == 1:
        text.append("It is the only completed run, so there is no trade-off to weigh yet.")
        return " ".join(text) + tail
    second = done[1]
    gap = best["test_acc"] - second["test_acc"]
    text.append(
        f"The runner-up `{second['run']}` ({second.get('model', '?')}) is {_points(gap)} behind"
        + _paired_verdict(best, second, gap)
    )
    alternatives = []
    fastest = max(done, key=lambda r: r.get("images_per_second") or 0.0)
    if fastest is not best and (fastest.get("images_per_second") or 0) > 1.2 * (
        best.get("images_per_second") or 0
    ):
        ratio = fastest["images_per_second"] / max(best.get("images_per_second") or 1e-9, 1e-9)
        alternatives.append(
            f"for throughput, `{fastest['run']}` runs {ratio:.1f}x faster "
            f"at {_points(best['test_acc'] - fastest['test_acc'])} less accuracy"
        )
    smallest = min(done, key=lambda r: r.get("params_total") or math.inf)
    if smallest is not best and (smallest.get("params_total") or math.inf) < 0.8 * (
        best.get("params_total") or 0
    ):
        alternatives.append(
            f"for size, `{smallest['run']}` has {format_cell('params_total', smallest['params_total'])} parameters "
            f"({_points(best['test_acc'] - smallest['test_acc'])} less accuracy)"
        )
    quickest = min(done, key=lambda r: r["train_seconds"] if r.get("train_seconds") is not None else math.inf)
    if quickest is not best and (quickest.get("train_seconds") or math.inf) < 0.8 * (
        best.get("train_seconds") or 0
    ):
        alternatives.append(
            f"for training cost, `{quickest['run']}` trained in {quickest['train_seconds']:.0f} s "
            f"({_points(best['test_acc'] - quickest['test_acc'])} less accuracy)"
        )
    if alternatives:
        text.append("Trade-offs: " + "; ".join(alternatives) + ".")
    else:
        text.append("No other run is clearly smaller, faster or cheaper to train: no trade-off against it.")
    return " ".join(text) + tail


def write_markdown(
    path: Path, rows: Sequence[dict[str, Any]], sources: Sequence[str], throughput_note: str
) -> str:
    text = (
        "# Leaderboard\n\n"
        f"Runs from: {', '.join(sources)}. Sorted by test accuracy; {throughput_note}\n\n"
        f"{leaderboard_table(rows)}\n\n## Recommendation\n\n{recommendation(rows)}\n"
    )
    write_text(path, text)
    return text


def write_html(
    path: Path, rows: Sequence[dict[str, Any]], sources: Sequence[str], throughput_note: str
) -> str:
    """leaderboard.html: the markdown leaderboard as one self-contained page (no scripts, nothing loaded)."""
    columns = [(k, title) for k, title in COLUMNS if k != "checkpoint"]
    header = "".join(f"<th>{esc(title)}</th>" for _, title in columns)
    lines = []
    number = ' class="num"'
    for row in rows:
        status = row.get("status", "ok")
        cells = "".join(
            f'<td data-key="{key}"{number if isinstance(row.get(key), (int, float)) else ""}>'
            f"{esc(format_cell(key, row.get(key)))}</td>"
            for key, _ in columns
        )
        lines.append(f'<tr data-status="{esc(status)}">{cells}</tr>')
    body = (
        "<h1>Leaderboard</h1>\n"
        f'<p class="sub">Runs from: {esc(", ".join(sources))}. Sorted by test accuracy; '
        f"{esc(throughput_note)}</p>\n"
        f'<div style="overflow-x:auto"><table id="leaderboard"><tr>{header}</tr>\n'
        + "\n".join(lines)
        + "</table></div>\n<h2>Recommendation</h2>\n"
        f"<p>{inline_markdown(recommendation(rows))}</p>"
    )
    text = html_page("foodvision leaderboard", body)
    write_text(path, text)  # atomically, UTF-8
    return text


def compare(cfg: DictConfig) -> list[dict[str, Any]]:
    runs = required(cfg, "runs", "runs=lightning_logs/runs or runs=[dir1,dir2]")
    runs = OmegaConf.to_container(runs) if isinstance(runs, ListConfig) else [runs]
    run_dirs = find_runs([str(r) for r in runs])
    if cfg.get("output_dir"):
        out = Path(cfg.output_dir)
    elif len(runs) == 1:  # the folder compared (a folder of runs, or one run dir)
        out = Path(str(runs[0]))
    else:
        out = Path(os.path.commonpath([str(p.resolve().parent) for p in run_dirs]))
    out.mkdir(parents=True, exist_ok=True)
    throughput = bool(cfg.get("throughput", True))
    precision = inference_precision(cfg.get("precision", "auto"), torch.device("cpu"))
    batch, iterations = int(cfg.get("throughput_batch", 32)), int(cfg.get("throughput_iters", 3))
    log.info(
        "comparing %d run(s)%s", len(run_dirs), " (timing inference of each model)" if throughput else ""
    )
    rows = rank_rows([leaderboard_row(d, throughput, precision, batch, iterations) for d in run_dirs])
    write_csv(out / "leaderboard.csv", rows)
    note = (
        f"img/s: forward passes of a {batch}-image random batch at the model's input size, measured now "
        f"on this machine (CPU, {'bf16 autocast' if precision == 'bf16' else 'float32'}, "
        f"{torch.get_num_threads()} threads); params 'trainable': head + unfrozen blocks per the run's "
        "fine-tuning recipe; ckpt MB: the checkpoint file (optimizer state included)."
        if throughput
        else "inference throughput not measured (throughput=false)."
    )
    text = write_markdown(out / "leaderboard.md", rows, [str(r) for r in runs], note)
    write_html(out / "leaderboard.html", rows, [str(r) for r in runs], note)
    print(f"{text}\nwrote {out / 'leaderboard.csv'}, leaderboard.md and leaderboard.html", flush=True)
    return rows

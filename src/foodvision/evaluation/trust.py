"""eval.py's "trust the numbers" part: calibration fitted on the val split and saved in the checkpoint
(``calibrate=true``; train.py does it after fitting), and what eval adds to ``metrics.json`` with it:
ECE before/after and the Brier score (with ``reliability.png``), the "unknown" answers at the saved
threshold, how well the unknown score separates the test photos from ``outside=`` photos (AUROC, share
rejected), and seeded bootstrap intervals of accuracy, macro F1 and each class's F1.

The math is :mod:`foodvision.inference.calibration` and :mod:`foodvision.evaluation.statistics`; this module runs the model and
names the keys (``<split>/<name>``, :func:`foodvision.evaluation.metrics.metric_name`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from foodvision.errors import ToolError
from foodvision.evaluation.figures import plt, save_figure
from foodvision.evaluation.metrics import metric_name, top_prediction
from foodvision.evaluation.statistics import DEFAULT_LEVEL, DEFAULT_RESAMPLES, bootstrap_intervals
from foodvision.inference import calibration as cal
from foodvision.inference.batches import Stream, stream_files
from foodvision.inference.calibration import Calibration
from foodvision.inference.checkpoints import save_calibration
from foodvision.inference.predict import collect_inputs
from foodvision.inference.predictor import Predictor

log = logging.getLogger(__name__)

RELIABILITY_FILE = "reliability.png"


def _name(split: str, key: str) -> str:
    return metric_name(split, key)


# ---- options ----------------------------------------------------------------------------------------------
def unknown_options(cfg: Any) -> tuple[float | None, str]:
    """``unknown_keep`` (share of correct val answers the threshold keeps; null: no threshold) and
    ``unknown_score`` of a tool's config, checked."""
    keep = cfg.get("unknown_keep", cal.DEFAULT_KEEP)
    if keep is not None:
        try:
            keep = float(keep)
        except (TypeError, ValueError):
            keep = -1.0
        if not 0 < keep <= 1:
            raise ToolError(
                f"unknown_keep must be a share in (0, 1] (e.g. 0.95) or null, got {cfg.get('unknown_keep')!r}"
            )
    score = str(cfg.get("unknown_score") or cal.DEFAULT_SCORE)
    if score not in cal.SCORES:
        raise ToolError(f"unknown_score must be one of {', '.join(cal.SCORES)}, got {score!r}")
    return keep, score


def bootstrap_resamples(cfg: Any) -> int:
    value = cfg.get("bootstrap", DEFAULT_RESAMPLES)
    if value in (None, False):
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ToolError(f"bootstrap must be a number of resamples (e.g. 1000; 0: none), got {value!r}")
    return value


def check_options(cfg: Any, predictor: Predictor) -> int:
    """eval's options of this module, checked before any work (a ToolError naming the key); returns the
    bootstrap resamples."""
    unknown_options(cfg)
    if cfg.get("calibrate"):
        check_calibratable(predictor)
    return bootstrap_resamples(cfg)


def check_calibratable(predictor: Predictor) -> None:
    if predictor.format != "checkpoint":
        raise ToolError(
            f"calibrate=true rewrites a training checkpoint (.ckpt), not an exported {predictor.format} file: calibrate "
            "the checkpoint it was exported from, then export again (exports carry its calibration)"
        )


# ---- fitting on the val split --------------------------------------------------------------------------------
def network_logits_of(
    predictor: Predictor,
    files: Sequence[str],
    batch_size: int | None,
    num_workers: int,
    progress: bool,
    desc: str,
) -> tuple[list[int], torch.Tensor]:
    """Uncalibrated logits of ``files`` (rows in the order of the returned indices; unreadable files
    left out): the predictor's calibrated ones times its temperature."""
    indices: list[int] = []
    chunks: list[torch.Tensor] = []
    for batch in stream_files(predictor, files, batch_size, num_workers, progress, desc):
        indices += batch.indices
        chunks.append(batch.logits.double())
    logits = torch.cat(chunks) if chunks else torch.empty(0, predictor.info.num_classes, dtype=torch.float64)
    return indices, logits * predictor.calibration.temperature


def calibrate_predictor(
    predictor: Predictor,
    files: Sequence[str],
    labels: np.ndarray,
    cfg: Any,
    batch_size: int | None,
    num_workers: int,
    where: str,
) -> Calibration:
    """Fit the temperature and the unknown threshold on ``files`` (the val split, ``labels`` in the model's
    class order), save them in the checkpoint (atomically) and use them in ``predictor`` from now on."""
    check_calibratable(predictor)
    if not len(files):
        raise ToolError(f"calibrate=true needs validation photos, and the val split of {where} has none")
    keep, score = unknown_options(cfg)
    progress = bool(cfg.get("progress", True))
    indices, logits = network_logits_of(predictor, files, batch_size, num_workers, progress, "calibrate val")
    if not indices:
        raise ToolError(
            f"none of the {len(files)} val images of {where} could be read: nothing to calibrate on"
        )
    fitted = cal.fit_calibration(
        logits, labels[indices], keep, score, fitted_on=f"val split of {where}, {len(indices)} photos"
    )
    save_calibration(predictor.path, fitted)
    predictor.set_calibration(fitted)
    log.info("calibrated %s: %s", predictor.path, fitted.describe())
    return fitted


# ---- what eval measures ----------------------------------------------------------------------------------------
class TrustTotals:
    """Per photo of an eval pass (a few numbers each, never the logits): true and predicted class, top
    probability before and after calibration, the three unknown scores; Brier sums."""

    def __init__(self, num_classes: int, calibration: Calibration):
        self.num_classes = num_classes
        self.calibration = calibration
        self.true: list[np.ndarray] = []
        self.predicted: list[np.ndarray] = []
        self.confidence: list[np.ndarray] = []
        self.confidence_uncalibrated: list[np.ndarray] = []
        self.scores: dict[str, list[np.ndarray]] = {s: [] for s in cal.SCORES}
        self.brier_sum = 0.0
        self.brier_sum_uncalibrated = 0.0
        self.loss_sum_uncalibrated = 0.0

    def update(self, logits: torch.Tensor, true: torch.Tensor) -> None:
        """A batch of the predictor's (calibrated) logits and the true classes."""
        z = logits.double()
        labels = true.numpy()
        probabilities = z.softmax(dim=1).numpy()
        raw = z * self.calibration.temperature
        raw_probabilities = raw.softmax(dim=1).numpy()
        self.true.append(labels)
        self.predicted.append(top_prediction(logits)[1].numpy())  # the class eval's metrics count
        self.confidence.append(probabilities.max(axis=1))
        self.confidence_uncalibrated.append(raw_probabilities.max(axis=1))
        for score in cal.SCORES:
            self.scores[score].append(cal.in_distribution_score(z, score))
        self.brier_sum += cal.brier_sum(probabilities, labels)
        self.brier_sum_uncalibrated += cal.brier_sum(raw_probabilities, labels)
        self.loss_sum_uncalibrated += float(torch.nn.functional.cross_entropy(raw, true, reduction="sum"))

    def _all(self, parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts) if parts else np.empty(0)

    def metrics(
        self,
        split: str,
        class_names: Sequence[str],
        resamples: int,
        seed: int,
        outside: dict[str, np.ndarray] | None = None,
    ) -> tuple[dict[str, Any], list[dict[str, float]]]:
        """The ``<split>/...`` keys eval adds to metrics.json, and the reliability bins (calibrated)."""
        true = self._all(self.true).astype(np.int64)
        predicted = self._all(self.predicted).astype(np.int64)
        correct = true == predicted
        confidence = self._all(self.confidence)
        n = len(true)
        c = self.calibration
        values: dict[str, Any] = {
            "ece": cal.expected_calibration_error(confidence, correct),
            "ece_uncalibrated": cal.expected_calibration_error(
                self._all(self.confidence_uncalibrated), correct
            ),
            "brier": self.brier_sum / n,
            "brier_uncalibrated": self.brier_sum_uncalibrated / n,
            "loss_uncalibrated": self.loss_sum_uncalibrated / n,
            "temperature": c.temperature,
        }
        if c.unknown_threshold is not None:
            unknown = self._all(self.scores[c.unknown_score]) < c.unknown_threshold
            answered = ~unknown
            values["unknown_share"] = float(unknown.mean())
            values["acc_answered"] = float(correct[answered].mean()) if answered.any() else float("nan")
            values["correct_kept"] = float(answered[correct].mean()) if correct.any() else float("nan")
        if outside is not None and len(next(iter(outside.values()))):
            values["outside_photos"] = len(next(iter(outside.values())))
            for score in cal.SCORES:
                inside = self._all(self.scores[score])
                values[f"outside_auroc_{score}"] = cal.auroc(inside, outside[score])
                threshold = (
                    c.unknown_threshold if score == c.unknown_score else c.val.get(f"threshold_{score}")
                )
                if threshold is not None:
                    values[f"outside_rejected_{score}"] = float(np.mean(outside[score] < threshold))
                    values[f"unknown_share_{score}"] = float(np.mean(inside < threshold))
            values["outside_auroc"] = values[f"outside_auroc_{c.unknown_score}"]
            if f"outside_rejected_{c.unknown_score}" in values:
                values["outside_rejected"] = values[f"outside_rejected_{c.unknown_score}"]
        if resamples > 0:
            intervals = bootstrap_intervals(true, predicted, self.num_classes, resamples, DEFAULT_LEVEL, seed)
            values["acc_ci_low"], values["acc_ci_high"] = intervals["acc"]
            values["f1_macro_ci_low"], values["f1_macro_ci_high"] = intervals["f1_macro"]
            values["f1_ci"] = {
                name: [low, high] for name, (low, high) in zip(class_names, intervals["f1"], strict=True)
            }
        out = {
            _name(split, k): (float(v) if isinstance(v, (float, np.floating)) else v)
            for k, v in values.items()
        }
        return out, cal.reliability_bins(confidence, correct)


def outside_scores(
    predictor: Predictor, inputs: Any, batch_size: int | None, num_workers: int, progress: bool
) -> tuple[dict[str, np.ndarray], int]:
    """The unknown scores of the ``outside=`` photos (files, folders, globs: as predict.py's inputs), and
    how many could not be read."""
    found = collect_inputs(inputs)
    if not found.files:
        first = found.problems[0] if found.problems else ("outside", "no photos")
        raise ToolError(f"outside={first[0]}: {first[1]}")
    scores: dict[str, list[np.ndarray]] = {s: [] for s in cal.SCORES}
    stream = Stream()
    for batch in stream_files(
        predictor, found.files, batch_size, num_workers, progress, "outside photos", stream
    ):
        if batch.indices:
            for score in cal.SCORES:
                scores[score].append(cal.in_distribution_score(batch.logits, score))
    return {s: np.concatenate(v) if v else np.empty(0) for s, v in scores.items()}, len(stream.failed)


def reliability_figure(bins: Sequence[dict[str, float]], uncalibrated: float, calibrated: float, title: str):
    """Accuracy against mean confidence per confidence bin (bars), the diagonal of perfect calibration, and
    the share of photos per bin."""
    fig, (ax, counts) = plt.subplots(
        2, 1, figsize=(5.2, 5.6), dpi=100, sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    width = bins[0]["high"] - bins[0]["low"] if bins else 0.1
    centres = [(b["low"] + b["high"]) / 2 for b in bins]
    shown = [b["accuracy"] if b["count"] else 0.0 for b in bins]
    ax.bar(centres, shown, width=width * 0.92, color="#f97316", edgecolor="#9a3412", label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=1, label="perfect calibration")
    used = [b for b in bins if b["count"]]
    ax.plot(
        [b["confidence"] for b in used],
        [b["accuracy"] for b in used],
        "o",
        color="#1f2328",
        markersize=3,
        label="bin mean confidence",
    )
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_xlim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(
        f"{title}\nECE {100 * uncalibrated:.1f} % before, {100 * calibrated:.1f} % after temperature scaling",
        fontsize=9,
    )
    total = max(1, sum(b["count"] for b in bins))
    counts.bar(centres, [b["count"] / total for b in bins], width=width * 0.92, color="#9ca3af")
    counts.set_ylabel("share")
    counts.set_xlabel("confidence (top-1 calibrated probability)")
    counts.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def write_reliability(
    out: Path, bins: Sequence[dict[str, float]], metrics: dict[str, Any], split: str
) -> None:
    save_figure(
        reliability_figure(
            bins,
            float(metrics[_name(split, "ece_uncalibrated")]),
            float(metrics[_name(split, "ece")]),
            f"{split} reliability ({metrics.get('num_images', '?')} photos)",
        ),
        out / RELIABILITY_FILE,
    )


def add_metrics(
    cfg: Any,
    predictor: Predictor,
    totals: TrustTotals,
    metrics: dict[str, Any],
    out: Path,
    batch_size: int | None,
    num_workers: int,
    resamples: int,
) -> None:
    """Everything this module measures, into eval's ``metrics`` (and ``reliability.png`` into ``out``)."""
    split = metrics["split"]
    outside = None
    if cfg.get("outside"):
        from omegaconf import ListConfig, OmegaConf

        inputs = cfg.outside
        inputs = OmegaConf.to_container(inputs) if isinstance(inputs, ListConfig) else inputs
        outside, unreadable = outside_scores(
            predictor, inputs, batch_size, num_workers, bool(cfg.get("progress", True))
        )
        if unreadable:
            log.warning("outside photos: %d could not be read and were left out", unreadable)
    seed = int(cfg.get("bootstrap_seed", 0))
    values, bins = totals.metrics(split, predictor.class_names, resamples, seed, outside)
    metrics.update(values)
    metrics["calibration"] = predictor.calibration.to_dict()
    metrics["reliability"] = bins
    if resamples:
        metrics["bootstrap"] = {"resamples": resamples, "level": DEFAULT_LEVEL, "seed": seed}
    if outside is not None:
        metrics["outside"] = {"inputs": [str(i) for i in (inputs if isinstance(inputs, list) else [inputs])]}
    write_reliability(out, bins, metrics, split)


def summary_lines(metrics: dict[str, Any]) -> list[str]:
    """eval's printed summary: the intervals, calibration and unknown answers."""
    split = metrics.get("split", "test")

    def get(key: str) -> Any:
        return metrics.get(_name(split, key))

    lines = []
    if get("acc_ci_low") is not None:
        lines.append(
            f"  {'acc 95% CI':<17}{get('acc_ci_low'):.4f}-{get('acc_ci_high'):.4f}"
            f"  (macro F1 {get('f1_macro_ci_low'):.4f}-{get('f1_macro_ci_high'):.4f})"
        )
    if get("ece") is not None:
        lines.append(
            f"  {'ECE':<17}{get('ece'):.4f} (uncalibrated {get('ece_uncalibrated'):.4f}; temperature "
            f"{get('temperature'):.3f}), Brier {get('brier'):.4f}"
        )
    if get("unknown_share") is not None:
        lines.append(
            f"  {'unknown':<17}{get('unknown_share'):.1%} of photos (accuracy of the rest {get('acc_answered'):.4f})"
        )
    if get("outside_auroc") is not None:
        rejected = get("outside_rejected")
        lines.append(
            f"  {'outside photos':<17}AUROC {get('outside_auroc'):.4f}"
            + (
                f", {rejected:.1%} of {get('outside_photos')} answered unknown"
                if rejected is not None
                else ""
            )
        )
    return lines

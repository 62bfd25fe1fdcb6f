"""How far a model's probabilities can be trusted, and when it should answer "unknown".

* Temperature scaling (Guo et al., 2017): one scalar ``T`` fitted on the validation split by minimising the
  negative log-likelihood of ``softmax(logits / T)``; it changes no prediction (the arg-max is the same),
  only how confident they are. Fitted after training, saved in the model's metadata (:class:`Calibration`
  inside :class:`foodvision.inference.checkpoints.ModelInfo`), applied by every tool and export.
* Expected calibration error (ECE, equal-width confidence bins), the Brier score and the bins of a
  reliability diagram.
* An "unknown" answer: a threshold on an in-distribution score of the calibrated logits (the top
  probability, the energy ``logsumexp`` or the top logit), chosen on validation so that a set share of
  the correct validation answers stays above it; AUROC measures how well a score separates the model's
  own classes from outside photos.

Pure functions of logits and labels (torch/numpy): no files, no models.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

SCORES = ("probability", "energy", "max_logit")
# Measured on a MobileNetV2 trained on 10 food101-64px classes against 23 other classes (README, "Trusting
# the numbers"): see DEFAULT_SCORE's use in conf/eval.yaml.
DEFAULT_SCORE = "energy"
DEFAULT_KEEP = 0.95
ECE_BINS = 15
TEMPERATURE_RANGE = (0.05, 20.0)


@dataclass(frozen=True)
class Calibration:
    """The calibration of a model, as saved in its metadata (``ModelInfo.calibration``).

    ``temperature``: logits are divided by it (1: none fitted, e.g. an old checkpoint). ``in_graph``: an
    exported file whose graph already divides by it (its outputs are calibrated logits; never divide
    again). ``unknown_score``/``unknown_threshold``: an answer whose score of the calibrated logits is below
    the threshold is "unknown" (``None``: no threshold). ``keep``: the share of correct validation answers
    the threshold keeps. ``fitted_on`` and ``val`` say where it was fitted and what it measured there."""

    temperature: float = 1.0
    in_graph: bool = False
    unknown_score: str = DEFAULT_SCORE
    unknown_threshold: float | None = None
    keep: float | None = None
    fitted_on: str = ""
    val: dict[str, float] = field(default_factory=dict)

    @property
    def fitted(self) -> bool:
        return bool(self.fitted_on) or self.temperature != 1.0 or self.unknown_threshold is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> Calibration:
        """The saved calibration; ``None`` or ``{}`` (metadata older than calibration): temperature 1, no
        unknown threshold. Raises ``ValueError`` for values that cannot be a calibration."""
        if not values:
            return cls()
        if not isinstance(values, Mapping):
            raise ValueError(f"calibration must be a mapping, got {type(values).__name__}")
        temperature = float(values.get("temperature", 1.0))
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"calibration temperature must be a positive number, got {temperature!r}")
        score = str(values.get("unknown_score") or DEFAULT_SCORE)
        if score not in SCORES:
            raise ValueError(f"calibration unknown_score must be one of {', '.join(SCORES)}, got {score!r}")
        threshold = values.get("unknown_threshold")
        keep = values.get("keep")
        return cls(
            temperature=temperature,
            in_graph=bool(values.get("in_graph", False)),
            unknown_score=score,
            unknown_threshold=None if threshold is None else float(threshold),
            keep=None if keep is None else float(keep),
            fitted_on=str(values.get("fitted_on") or ""),
            val={str(k): float(v) for k, v in dict(values.get("val") or {}).items()},
        )

    def describe(self) -> str:
        """One line for logs and reports."""
        if not self.fitted:
            return "not calibrated (temperature 1, no unknown threshold)"
        text = f"temperature {self.temperature:.3f}"
        if self.unknown_threshold is not None:
            text += f"; unknown below {self.unknown_score} {self.unknown_threshold:.4g}"
            if self.keep is not None:
                text += f" (keeps {self.keep:.0%} of correct val answers)"
        return text + (f"; fitted on {self.fitted_on}" if self.fitted_on else "")


# ---- temperature -------------------------------------------------------------------------------------------
def _as_logits(logits: Any) -> torch.Tensor:
    return torch.as_tensor(np.asarray(logits) if not isinstance(logits, torch.Tensor) else logits).double()


def _as_labels(labels: Any) -> torch.Tensor:
    return torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels).long()


def nll(logits: Any, labels: Any, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``softmax(logits / temperature)`` (float64)."""
    return float(
        torch.nn.functional.cross_entropy(_as_logits(logits) / float(temperature), _as_labels(labels))
    )


def fit_temperature(logits: Any, labels: Any, max_iter: int = 100) -> float:
    """The temperature minimising the validation NLL: L-BFGS on ``log T`` (so ``T`` stays positive), from
    ``T = 1``, float64; clipped to :data:`TEMPERATURE_RANGE`. A convex problem in ``1 / T``, so the local
    minimum L-BFGS finds is the global one."""
    z, y = _as_logits(logits), _as_labels(labels)
    if len(z) == 0:
        raise ValueError("cannot fit a temperature on no photos")
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [log_t], lr=1.0, max_iter=max_iter, tolerance_grad=1e-10, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = float(log_t.detach().exp())
    if not math.isfinite(temperature):
        return 1.0
    low, high = TEMPERATURE_RANGE
    return min(max(temperature, low), high)


# ---- calibration error -------------------------------------------------------------------------------------
def _probabilities(logits: Any, temperature: float = 1.0) -> np.ndarray:
    return (_as_logits(logits) / float(temperature)).softmax(dim=1).numpy()


def reliability_bins(confidence: Any, correct: Any, bins: int = ECE_BINS) -> list[dict[str, float]]:
    """Equal-width bins of the top-1 confidence: ``low``, ``high``, ``count``, mean ``confidence`` and
    ``accuracy`` of the photos in each (empty bins included, with count 0): a reliability diagram."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    # bin i holds (edges[i], edges[i+1]]; a confidence of exactly 0 goes into the first
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    counts = np.bincount(index, minlength=bins)
    conf_sums = np.bincount(index, weights=confidence, minlength=bins)
    hit_sums = np.bincount(index, weights=correct, minlength=bins)
    out = []
    for i in range(bins):
        n = int(counts[i])
        out.append(
            {
                "low": float(edges[i]),
                "high": float(edges[i + 1]),
                "count": n,
                "confidence": float(conf_sums[i] / n) if n else 0.0,
                "accuracy": float(hit_sums[i] / n) if n else 0.0,
            }
        )
    return out


def expected_calibration_error(confidence: Any, correct: Any, bins: int = ECE_BINS) -> float:
    """ECE: the photo-weighted mean of ``|accuracy - mean confidence|`` over equal-width confidence bins."""
    table = reliability_bins(confidence, correct, bins)
    total = sum(b["count"] for b in table)
    if not total:
        return 0.0
    return float(sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in table) / total)


def ece_of_logits(logits: Any, labels: Any, temperature: float = 1.0, bins: int = ECE_BINS) -> float:
    probabilities = _probabilities(logits, temperature)
    labels = np.asarray(_as_labels(labels))
    return expected_calibration_error(probabilities.max(axis=1), probabilities.argmax(axis=1) == labels, bins)


def brier_score(probabilities: Any, labels: Any) -> float:
    """Multi-class Brier score: the mean over photos of ``sum_k (p_k - [k == label])**2`` (0 best, 2 worst)."""
    p = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if len(p) == 0:
        return 0.0
    return float(brier_sum(p, labels) / len(p))


def brier_sum(probabilities: Any, labels: Any) -> float:
    """The Brier score's sum over photos (for running totals over batches)."""
    p = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    squared = (p**2).sum(axis=1) - 2 * p[np.arange(len(p)), labels] + 1.0
    return float(squared.sum())


# ---- "unknown": scores, threshold, separation ---------------------------------------------------------------
def check_score(score: str) -> str:
    score = str(score)
    if score not in SCORES:
        raise ValueError(f"unknown score must be one of {', '.join(SCORES)}, got {score!r}")
    return score


def in_distribution_score(logits: Any, score: str = DEFAULT_SCORE) -> np.ndarray:
    """Per photo, how much it looks like the model's own classes (higher: more), from (calibrated) logits:
    ``probability`` the top softmax probability, ``energy`` ``logsumexp`` of the logits (the negative
    free energy of Liu et al., 2020), ``max_logit`` the top logit (Hendrycks et al., 2022)."""
    z = _as_logits(logits)
    score = check_score(score)
    if score == "probability":
        values = z.softmax(dim=1).max(dim=1).values
    elif score == "energy":
        values = torch.logsumexp(z, dim=1)
    else:
        values = z.max(dim=1).values
    return values.numpy()


def threshold_keeping(scores_of_correct: Any, keep: float = DEFAULT_KEEP) -> float:
    """The largest threshold that keeps at least ``keep`` of these scores (those of the correct validation
    answers) at or above it: answers scoring below it are "unknown"."""
    values = np.sort(np.asarray(scores_of_correct, dtype=np.float64))
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep!r}")
    if len(values) == 0:
        raise ValueError("no correct validation answers to choose an unknown threshold from")
    index = int(math.floor((1.0 - keep) * len(values) + 1e-9))
    return float(values[min(index, len(values) - 1)])


def is_unknown(logits: Any, calibration: Calibration) -> np.ndarray:
    """Per photo: below the calibration's unknown threshold (all False without one). ``logits``: the
    calibrated logits a :class:`foodvision.inference.predictor.Predictor` returns."""
    if calibration.unknown_threshold is None:
        return np.zeros(len(logits), dtype=bool)
    scores = in_distribution_score(logits, calibration.unknown_score)
    return scores < calibration.unknown_threshold


def auroc(inside: Any, outside: Any) -> float:
    """Area under the ROC curve of telling ``inside`` scores (should be higher) from ``outside`` ones: the
    chance that a random inside photo scores above a random outside one, ties counting half (0.5: no
    separation, 1: perfect). Mann-Whitney U from average ranks."""
    a = np.asarray(inside, dtype=np.float64)
    b = np.asarray(outside, dtype=np.float64)
    if len(a) == 0 or len(b) == 0:
        return float("nan")
    both = np.concatenate([a, b])
    order = np.argsort(both, kind="mergesort")
    ranks = np.empty(len(both), dtype=np.float64)
    sorted_values = both[order]
    # average ranks of ties: the start and end of each run of equal values
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_values)) + 1]
    ends = np.r_[starts[1:], len(both)]
    for start, end in zip(starts, ends, strict=True):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    u = ranks[: len(a)].sum() - len(a) * (len(a) + 1) / 2.0
    return float(u / (len(a) * len(b)))


def fit_calibration(
    logits: Any,
    labels: Any,
    keep: float | None = DEFAULT_KEEP,
    score: str = DEFAULT_SCORE,
    fitted_on: str = "",
) -> Calibration:
    """Temperature and unknown threshold from validation logits (uncalibrated, as the network outputs
    them) and labels; ``keep=None``: no unknown threshold."""
    z, y = _as_logits(logits), _as_labels(labels)
    temperature = fit_temperature(z, y)
    calibrated = z / temperature
    val = {
        "photos": float(len(y)),
        "nll_before": nll(z, y),
        "nll_after": nll(z, y, temperature),
        "ece_before": ece_of_logits(z, y),
        "ece_after": ece_of_logits(z, y, temperature),
    }
    correct = (calibrated.argmax(dim=1) == y).numpy()
    if keep is not None and correct.any():  # every score's threshold: eval compares them at the same keep
        for kind in SCORES:
            val[f"threshold_{kind}"] = threshold_keeping(
                in_distribution_score(calibrated, kind)[correct], keep
            )
    threshold = val.get(f"threshold_{check_score(score)}")
    return Calibration(
        temperature=temperature,
        unknown_score=check_score(score),
        unknown_threshold=threshold,
        keep=None if threshold is None else float(keep),
        fitted_on=fitted_on,
        val=val,
    )

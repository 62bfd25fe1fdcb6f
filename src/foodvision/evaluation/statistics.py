"""How sure a measured number is: seeded bootstrap intervals of accuracy and F1 scores, and McNemar's paired
test of two models evaluated on the same photos.

A test set of 125 photos per class moves a class's F1 by several points from one photo, and two runs half
a point apart cannot be told apart: every headline number gets an interval, and a comparison a p-value.
Pure functions of label arrays (numpy, math): no files, no models.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

DEFAULT_RESAMPLES = 1000
DEFAULT_LEVEL = 0.95
DEFAULT_SEED = 0
# Resamples drawn at once: memory is chunk x photos indices plus chunk x classes^2 counts.
CHUNK_CELLS = 4_000_000


def _f1_from_confusions(confusions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy ``(R,)`` and per-class F1 ``(R, K)`` of ``R`` confusion matrices ``(R, K, K)`` (rows: true);
    a class never predicted or absent has F1 0 (as :func:`foodvision.evaluation.metrics.classification_metrics`)."""
    confusions = confusions.astype(np.float64)
    tp = np.diagonal(confusions, axis1=1, axis2=2)
    support = confusions.sum(axis=2)
    predicted = confusions.sum(axis=1)
    total = support.sum(axis=1)
    denominator = support + predicted  # F1 = 2 tp / (2 tp + fp + fn) = 2 tp / (support + predicted)
    f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
    accuracy = np.divide(tp.sum(axis=1), total, out=np.zeros_like(total), where=total > 0)
    return accuracy, f1


def bootstrap_intervals(
    true: Sequence[int] | np.ndarray,
    predicted: Sequence[int] | np.ndarray,
    num_classes: int,
    resamples: int = DEFAULT_RESAMPLES,
    level: float = DEFAULT_LEVEL,
    seed: int = DEFAULT_SEED,
) -> dict[str, Any]:
    """Percentile bootstrap intervals of accuracy, macro F1 and each class's F1: ``resamples`` resamples of
    the photos with replacement (numpy's PCG64 seeded with ``seed``: the same intervals on every run).

    Returns ``{"acc": (low, high), "f1_macro": (low, high), "f1": [(low, high) per class], "resamples",
    "level", "seed"}``."""
    true = np.asarray(true, dtype=np.int64)
    predicted = np.asarray(predicted, dtype=np.int64)
    if true.shape != predicted.shape or true.ndim != 1:
        raise ValueError("true and predicted must be 1-D arrays of the same length")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    n, k = len(true), int(num_classes)
    if n == 0:
        raise ValueError("no photos to bootstrap")
    rng = np.random.default_rng(seed)
    cell = true * k + predicted
    accuracies, f1s = [], []
    chunk = max(1, min(int(resamples), CHUNK_CELLS // max(n, k * k)))
    done = 0
    while done < resamples:
        size = min(chunk, resamples - done)
        draws = rng.integers(0, n, size=(size, n))
        flat = (np.arange(size)[:, None] * (k * k) + cell[draws]).ravel()
        confusions = np.bincount(flat, minlength=size * k * k).reshape(size, k, k)
        accuracy, f1 = _f1_from_confusions(confusions)
        accuracies.append(accuracy)
        f1s.append(f1)
        done += size
    accuracy = np.concatenate(accuracies)
    f1 = np.concatenate(f1s)
    tail = 100 * (1 - level) / 2
    quantiles = (tail, 100 - tail)

    def interval(values: np.ndarray) -> tuple[float, float]:
        low, high = np.percentile(values, quantiles)
        return float(low), float(high)

    return {
        "acc": interval(accuracy),
        "f1_macro": interval(f1.mean(axis=1)),
        "f1": [interval(f1[:, c]) for c in range(k)],
        "resamples": int(resamples),
        "level": float(level),
        "seed": int(seed),
    }


# ---- paired comparison --------------------------------------------------------------------------------------
def _binomial_two_sided(smaller: int, n: int) -> float:
    """Two-sided exact binomial p-value of ``smaller`` or fewer successes (or as many failures) in ``n``
    fair trials: McNemar's exact test on the discordant pairs."""
    if n == 0:
        return 1.0
    log_half = n * math.log(0.5)
    tail = sum(
        math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + log_half)
        for i in range(smaller + 1)
    )
    return float(min(1.0, 2 * tail))


def mcnemar(correct_a: Sequence[bool] | np.ndarray, correct_b: Sequence[bool] | np.ndarray) -> dict[str, Any]:
    """McNemar's test of two models' per-photo correctness on the same photos (exact binomial on the
    photos exactly one of them got right: valid for any count, no continuity correction needed).

    Returns ``only_a`` (photos only A got right), ``only_b``, ``photos``, ``difference`` (accuracy of A minus
    B), ``p_value`` and ``method``."""
    a = np.asarray(correct_a, dtype=bool)
    b = np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError("both models must be judged on the same photos (equal-length 1-D arrays)")
    only_a = int((a & ~b).sum())
    only_b = int((~a & b).sum())
    discordant = only_a + only_b
    return {
        "only_a": only_a,
        "only_b": only_b,
        "photos": int(len(a)),
        "difference": float((only_a - only_b) / len(a)) if len(a) else 0.0,
        "p_value": _binomial_two_sided(min(only_a, only_b), discordant),
        "method": "McNemar exact (binomial on the discordant photos)",
    }


def significant(p_value: float, level: float = DEFAULT_LEVEL) -> bool:
    return p_value < 1 - level

"""Bootstrap intervals (contain the estimate, reproducible, narrower with more photos) and McNemar's paired
test (identical predictions: not significant; a clearly better model: significant)."""

from __future__ import annotations

import numpy as np
import pytest

from foodvision.evaluation.metrics import classification_metrics, confusion_matrix
from foodvision.evaluation.statistics import bootstrap_intervals, mcnemar, significant


def predictions(
    n: int, classes: int = 5, accuracy: float = 0.8, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    true = rng.integers(0, classes, n)
    wrong = rng.random(n) > accuracy
    predicted = np.where(wrong, (true + rng.integers(1, classes, n)) % classes, true)
    return true, predicted


def test_intervals_contain_the_estimate_and_are_reproducible() -> None:
    true, predicted = predictions(600)
    scores = classification_metrics(confusion_matrix(true, predicted, 5))
    intervals = bootstrap_intervals(true, predicted, 5, resamples=1000, seed=3)
    low, high = intervals["acc"]
    assert low < scores["accuracy"] < high and 0.03 < high - low < 0.1
    low, high = intervals["f1_macro"]
    assert low < scores["f1_macro"] < high
    for (low, high), f1 in zip(intervals["f1"], scores["per_class"]["f1"], strict=True):
        assert low < f1 < high
    assert bootstrap_intervals(true, predicted, 5, resamples=1000, seed=3) == intervals
    assert bootstrap_intervals(true, predicted, 5, resamples=1000, seed=4) != intervals


def test_intervals_narrow_with_more_photos() -> None:
    small = bootstrap_intervals(*predictions(200), 5, seed=0)
    large = bootstrap_intervals(*predictions(5000), 5, seed=0)
    width = lambda interval: interval[1] - interval[0]  # noqa: E731
    assert width(large["acc"]) < width(small["acc"]) / 3  # ~ 1/sqrt(n): 5x narrower for 25x the photos
    assert width(large["f1_macro"]) < width(small["f1_macro"]) / 3
    assert all(width(a) < width(b) for a, b in zip(large["f1"], small["f1"], strict=True))


def test_intervals_are_the_same_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Resamples drawn in chunks (memory) give the very same intervals."""
    import foodvision.evaluation.statistics as statistics

    true, predicted = predictions(300)
    whole = bootstrap_intervals(true, predicted, 5, resamples=200, seed=1)
    monkeypatch.setattr(statistics, "CHUNK_CELLS", 300 * 7)  # 7 resamples at a time
    assert bootstrap_intervals(true, predicted, 5, resamples=200, seed=1) == whole


def test_identical_predictions_are_not_significantly_different() -> None:
    true, predicted = predictions(1000)
    correct = predicted == true
    result = mcnemar(correct, correct)
    assert result["p_value"] == 1.0 and result["only_a"] == result["only_b"] == 0
    assert not significant(result["p_value"])


def test_a_clearly_better_model_is_significant_and_a_close_one_is_not() -> None:
    true, worse = predictions(1000, accuracy=0.75, seed=1)
    better = worse.copy()
    fixed = np.flatnonzero(worse != true)[:80]  # 80 more photos right, none newly wrong: 8 points
    better[fixed] = true[fixed]
    result = mcnemar(better == true, worse == true)
    assert result["only_a"] == 80 and result["only_b"] == 0 and result["difference"] == pytest.approx(0.08)
    assert result["p_value"] < 1e-20 and significant(result["p_value"])
    # 4 photos one way, 2 the other (0.2 points): chance
    close = mcnemar(np.r_[np.ones(4), np.zeros(2)].astype(bool), np.r_[np.zeros(4), np.ones(2)].astype(bool))
    assert close["p_value"] == pytest.approx(2 * (1 + 6 + 15) / 64) and not significant(close["p_value"])

"""Class imbalance: seeded resampling of the training split, and inverse-frequency class weights.

Two alternatives (use one): ``data.balance`` changes which training samples an epoch sees;
``model.class_weights`` keeps the samples and weights the training loss instead. Validation and
test are never resampled, so their metrics stay comparable with any other run.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from foodvision.data.splits import Sample

BALANCE_MODES = ("none", "down", "up", "mean")


def check_balance_mode(mode: str | None) -> str:
    """``None``/``False`` mean ``none``; anything but the four modes is an error that lists them."""
    mode = "none" if mode in (None, False) else str(mode).lower()
    if mode not in BALANCE_MODES:
        raise ValueError(f"data.balance must be one of {', '.join(BALANCE_MODES)}, got {mode!r}")
    return mode


def class_counts(samples: Sequence[Sample], num_classes: int) -> list[int]:
    """How many samples each class index has (zeros included)."""
    counts = [0] * num_classes
    for _, label in samples:
        counts[label] += 1
    return counts


def balance_target(counts: Sequence[int], mode: str) -> int:
    """The per-class size ``mode`` resamples to: the smallest, the largest or the (rounded) mean class."""
    present = [c for c in counts if c > 0]
    if mode == "down":
        return min(present)
    if mode == "up":
        return max(present)
    if mode == "mean":
        return max(1, round(sum(present) / len(present)))
    raise ValueError(f"no target size for balance mode {mode!r}")


def balance_samples(samples: Sequence[Sample], mode: str | None, seed: int) -> list[Sample]:
    """Resample every class to the same size (see :func:`balance_target`), seeded and order-independent.

    A class above the target keeps a random subset (no duplicates); a class below it keeps all its
    samples, repeated as often as they fit, plus a random subset of them for the remainder, so every
    sample appears ``k`` or ``k + 1`` times. Each class has its own random stream (seed and label),
    and the result is grouped by class in label order, like the unbalanced split.
    """
    mode = check_balance_mode(mode)
    if mode == "none" or not samples:
        return list(samples)
    by_class: dict[int, list[Sample]] = {}
    for sample in samples:
        by_class.setdefault(sample[1], []).append(sample)
    target = balance_target([len(v) for v in by_class.values()], mode)
    balanced: list[Sample] = []
    for label in sorted(by_class):
        members = sorted(by_class[label])
        rng = random.Random(f"balance:{seed}:{label}")
        if len(members) >= target:
            chosen = rng.sample(members, target)
        else:
            repeats, remainder = divmod(target, len(members))
            chosen = members * repeats + rng.sample(members, remainder)
        balanced += sorted(chosen)
    return balanced


def inverse_frequency_weights(counts: Sequence[int]) -> list[float]:
    """``n / (k * n_c)`` per class (scikit-learn's "balanced"): 1.0 everywhere for balanced counts, the
    weighted mean over the samples is 1. A class without samples gets 0 (it never appears in the loss)."""
    present = [c for c in counts if c > 0]
    if not present:
        raise ValueError("class weights need at least one training sample")
    total, k = sum(present), len(present)
    return [total / (k * c) if c > 0 else 0.0 for c in counts]


def resolve_class_weights(
    spec: str | Sequence[float] | None, counts: Sequence[int] | None, num_classes: int
) -> list[float] | None:
    """``model.class_weights``: ``None``/``none`` (unweighted), ``auto`` (inverse class frequency of the
    training split, from ``counts``) or an explicit list with one weight per class."""
    if spec is None or (isinstance(spec, str) and spec.lower() in ("none", "null", "")):
        return None
    if isinstance(spec, str):
        if spec.lower() != "auto":
            raise ValueError(
                f"model.class_weights must be null, auto or a list of {num_classes} numbers, got {spec!r}"
            )
        if counts is None:
            raise ValueError("model.class_weights=auto needs the training split's class counts")
        if len(counts) != num_classes:
            raise ValueError(f"{len(counts)} class counts for {num_classes} classes")
        return inverse_frequency_weights(counts)
    weights = [float(w) for w in spec]
    if len(weights) != num_classes or any(w < 0 for w in weights):
        raise ValueError(f"model.class_weights needs {num_classes} non-negative numbers, got {list(spec)}")
    return weights

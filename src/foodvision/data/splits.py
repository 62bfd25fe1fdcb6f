"""Stratified, seeded splits of a class -> files mapping, and their audit file."""

from __future__ import annotations

import csv
import random
from collections.abc import Mapping, Sequence
from pathlib import Path

SPLITS = ("train", "val", "test")
Sample = tuple[str, int]  # (path, class index)


def split_counts(n: int, fractions: Sequence[float]) -> list[int]:
    """Divide ``n`` items by ``fractions`` (which sum to 1), largest remainder first.

    Every split with a positive fraction gets at least one item when ``n`` allows, so a
    rare class never vanishes from validation or test.
    """
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must sum to 1, got {list(fractions)}")
    raw = [n * f for f in fractions]
    counts = [int(r) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: raw[i] - counts[i], reverse=True)[: n - sum(counts)]:
        counts[i] += 1
    for i, fraction in enumerate(fractions):
        if fraction > 0 and counts[i] == 0 and n >= len([f for f in fractions if f > 0]):
            donor = max(range(len(counts)), key=lambda j: counts[j])
            counts[donor] -= 1
            counts[i] += 1
    return counts


def stratified_split(
    files_by_class: Mapping[str, Sequence[str]],
    fractions: Sequence[float],
    seed: int,
    names: Sequence[str] = SPLITS,
) -> dict[str, dict[str, list[str]]]:
    """Split every class separately with its own seeded shuffle.

    Paths are sorted before shuffling, so the result depends only on the file names and
    ``seed``, not on the order the file system lists them in.
    """
    result: dict[str, dict[str, list[str]]] = {name: {} for name in names}
    for class_name in sorted(files_by_class):
        files = sorted(files_by_class[class_name])
        random.Random(f"{seed}:{class_name}").shuffle(files)
        start = 0
        for name, count in zip(names, split_counts(len(files), fractions), strict=True):
            result[name][class_name] = sorted(files[start : start + count])
            start += count
    return result


def cap_per_class(files: Sequence[str], cap: int | None, seed: int, class_name: str) -> list[str]:
    """A seeded random subset of at most ``cap`` files (all of them when ``cap`` is None)."""
    files = sorted(files)
    if cap is None or cap >= len(files):
        return files
    return sorted(random.Random(f"cap:{seed}:{class_name}").sample(files, cap))


def write_split_file(
    path: str | Path, splits: Mapping[str, Sequence[Sample]], classes: Sequence[str]
) -> Path:
    """Write ``split,class,path`` rows so a split can be audited and reproduced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["split", "class", "path"])
        for split, samples in splits.items():
            for file, label in samples:
                writer.writerow([split, classes[label], file])
    return path

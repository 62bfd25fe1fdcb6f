"""Stratified, seeded splits of a class -> files mapping, and their audit file."""

from __future__ import annotations

import csv
import itertools
import random
from collections.abc import Mapping, Sequence
from pathlib import Path

from foodvision.atomic import atomic_open, ensure_dir

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
    groups: Mapping[str, str] | None = None,
) -> dict[str, dict[str, list[str]]]:
    """Split every class separately with its own seeded shuffle.

    Paths are sorted before shuffling, so the result depends only on the file names and
    ``seed``, not on the order the file system lists them in.

    ``groups`` (path -> group key, e.g. a content digest): files with the same key land in one split, so a
    photo and its copies never sit on both sides of a boundary. A group is placed where its first file (in
    path order) would go, counted in that file's class; its files of other classes follow it. Without
    groups of two or more files the result is exactly the ungrouped split.
    """
    followers: dict[str, list[tuple[str, str]]] = {}  # first file of a group -> the group's other files
    following: set[str] = set()
    if groups:
        members: dict[str, list[tuple[str, str]]] = {}
        for class_name, class_files in files_by_class.items():
            for file in class_files:
                members.setdefault(groups.get(file, file), []).append((file, class_name))
        for group in members.values():
            if len(group) > 1:
                group.sort()
                followers[group[0][0]] = group[1:]
                following.update(file for file, _ in group[1:])
    result: dict[str, dict[str, list[str]]] = {name: {} for name in names}
    placed: dict[str, dict[str, list[str]]] = {name: {} for name in names}
    for class_name in sorted(files_by_class):
        files = sorted(f for f in files_by_class[class_name] if f not in following)
        random.Random(f"{seed}:{class_name}").shuffle(files)
        weights = [1 + sum(c == class_name for _, c in followers.get(f, ())) for f in files]
        ends = list(itertools.accumulate(split_counts(sum(weights), fractions)))
        position, split = 0, 0
        for file, weight in zip(files, weights, strict=True):
            while split < len(names) - 1 and position >= ends[split]:
                split += 1
            placed[names[split]].setdefault(class_name, []).append(file)
            for other, other_class in followers.get(file, ()):
                placed[names[split]].setdefault(other_class, []).append(other)
            position += weight
    for name in names:
        for class_name in sorted(files_by_class):
            result[name][class_name] = sorted(placed[name].get(class_name, []))
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
    ensure_dir(path.parent)
    with atomic_open(path, "w", newline="") as handle:  # a failed write leaves the previous file
        writer = csv.writer(handle)
        writer.writerow(["split", "class", "path"])
        for split, samples in splits.items():
            for file, label in samples:
                writer.writerow([split, classes[label], file])
    return path

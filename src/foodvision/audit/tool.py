"""`python audit.py data=... data.root=...`: what is wrong with a data set before any training.

Finds exact duplicates (content digest) and near duplicates (perceptual hash, and cosine similarity of the
frozen backbone's pooled features) within splits, across splits and across classes; likely label errors
(cleanlab on out-of-fold probabilities of a linear head trained k-fold on those features); class balance,
sizes, formats, modes, tiny images and extreme aspect ratios. The splits are the ones training makes of the
same data config. Writes ``audit.json`` (everything, strict JSON), ``audit.html`` (thumbnails) and prints a
summary; ``python train.py data.exclude_label_issues=<audit.json>`` leaves the flagged photos out of train.
"""

from __future__ import annotations

import datetime as dt
import inspect
import logging
import statistics
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf, open_dict

from foodvision.atomic import ensure_dir, write_json, write_text
from foodvision.audit.features import pooled_features
from foodvision.audit.labels import head_accuracy, label_issues, out_of_fold_probabilities
from foodvision.audit.neighbours import cosine_pairs, join_pairs, phash_pairs
from foodvision.audit.page import audit_page
from foodvision.data.datamodule import FoodDataModule, default_num_workers
from foodvision.data.duplicates import AUDIT_KIND
from foodvision.data.fingerprints import Fingerprint, fingerprints
from foodvision.data.roots import resolve_data_root
from foodvision.data.splits import SPLITS
from foodvision.errors import ToolError

log = logging.getLogger(__name__)

AUDIT_FORMAT = 1
# Below this out-of-fold accuracy the head's suggestions are mostly its own errors (food101-64px, 101 classes,
# MobileNetV2 at 224 px: 0.39, with 38 % of the photos flagged; food101-mini, 10 classes: 0.79).
WEAK_HEAD = 0.6


# ---- the data, as training would split it ----------------------------------------------------------------
def audit_datamodule(cfg: DictConfig) -> FoodDataModule:
    """The FoodDataModule of ``cfg.data`` (root found as train.py finds it), writing nothing to a run dir."""
    container = OmegaConf.create({"seed": cfg.seed, "paths": cfg.paths, "data": cfg.data})
    OmegaConf.set_struct(container, False)
    container.data.augment = None
    container.data.output_dir = None
    container.data.exclude_label_issues = None  # the audit looks at every photo
    with open_dict(container):
        resolve_data_root(container)
    data = OmegaConf.to_container(container.data, resolve=True)
    accepted = set(inspect.signature(FoodDataModule.__init__).parameters) - {"self"}
    data = {k: v for k, v in data.items() if k in accepted}
    return FoodDataModule(**data)


def output_dir(cfg: DictConfig, root: Path) -> Path:
    if cfg.get("output_dir"):
        return Path(str(cfg.output_dir)).expanduser()
    stamp = dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    return Path(str(cfg.paths.log_dir)) / "audits" / f"{stamp}_{root.name or 'data'}"


# ---- duplicates --------------------------------------------------------------------------------------------
def _member(index: int, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    row = rows[index]
    return {"path": row["path"], "split": row["split"], "class": row["class"]}


def _group(
    kind: str, members: Sequence[int], rows: Sequence[Mapping[str, Any]], **extra: Any
) -> dict[str, Any]:
    files = [_member(i, rows) for i in members]
    files.sort(key=lambda f: (SPLITS.index(f["split"]), f["path"]))
    return {
        "kind": kind,
        "files": files,
        "cross_split": len({f["split"] for f in files}) > 1,
        "cross_class": len({f["class"] for f in files}) > 1,
        **extra,
    }


def find_duplicates(
    rows: Sequence[Mapping[str, Any]],
    prints: Mapping[str, Fingerprint],
    features: np.ndarray | None,
    readable: np.ndarray | None,
    options: Mapping[str, Any],
) -> dict[str, Any]:
    """Exact groups (same digest) and near groups (perceptual hash or feature cosine, joined transitively;
    a near group holds at least two different files), each with its files' paths, splits and classes."""
    n = len(rows)
    digests = [prints[r["path"]].digest if r["path"] in prints else "" for r in rows]
    by_digest: dict[str, list[int]] = {}
    for i, digest in enumerate(digests):
        if digest:
            by_digest.setdefault(digest, []).append(i)
    exact = [sorted(m) for m in by_digest.values() if len(m) > 1]
    exact_pairs = [(m[0], j) for m in exact for j in m[1:]]

    hashes = [prints[r["path"]].phash if r["path"] in prints else "" for r in rows]
    started = time.perf_counter()
    hashed = [
        (i, j, d)
        for i, j, d in phash_pairs(hashes, int(options["phash_distance"]))
        if digests[i] != digests[j]
    ]
    phash_seconds = time.perf_counter() - started
    similar: list[tuple[int, int, float]] = []
    cosine_seconds = 0.0
    if features is not None:
        started = time.perf_counter()
        similar = [
            (i, j, s)
            for i, j, s in cosine_pairs(
                features, float(options["cosine"]), int(options["neighbours"]), readable
            )
            if digests[i] != digests[j]
        ]
        cosine_seconds = time.perf_counter() - started
    evidence: dict[tuple[int, int], dict[str, Any]] = {}
    for i, j, d in hashed:
        evidence.setdefault((i, j), {})["phash_distance"] = d
    for i, j, s in similar:
        evidence.setdefault((i, j), {})["cosine"] = round(s, 4)
    components = join_pairs(n, [*exact_pairs, *evidence])
    near = []
    for members in components:
        if len({digests[i] for i in members}) < 2:
            continue  # one exact group, nothing near about it
        inside = set(members)
        pairs = [
            {"a": rows[i]["path"], "b": rows[j]["path"], **e}
            for (i, j), e in sorted(evidence.items())
            if i in inside and j in inside
        ]
        near.append(_group("near", members, rows, pairs=pairs[:50]))
    exact_groups = [_group("exact", m, rows, digest=digests[m[0]]) for m in sorted(exact)]
    return {
        "exact": exact_groups,
        "near": near,
        "timing": {"phash_seconds": round(phash_seconds, 2), "cosine_seconds": round(cosine_seconds, 2)},
        "pairs": {"phash": len(hashed), "cosine": len(similar)},
    }


def _count(groups: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    return {
        "groups": len(groups),
        "files": sum(len(g["files"]) for g in groups),
        "cross_split": sum(bool(g["cross_split"]) for g in groups),
        "cross_class": sum(bool(g["cross_class"]) for g in groups),
    }


# ---- label issues ------------------------------------------------------------------------------------------
def find_label_issues(
    rows: Sequence[Mapping[str, Any]],
    features: np.ndarray,
    readable: np.ndarray,
    classes: Sequence[str],
    options: Mapping[str, Any],
    seed: int,
) -> dict[str, Any]:

    kept = np.flatnonzero(readable)
    labels = np.array([rows[i]["label"] for i in kept], dtype=np.int64)
    if len(set(labels.tolist())) < 2:
        return {"skipped": "fewer than two classes", "issues": [], "flagged": 0}
    started = time.perf_counter()
    probabilities = out_of_fold_probabilities(
        features[kept],
        labels,
        len(classes),
        folds=int(options["folds"]),
        seed=seed,
        dims=int(options["pca_dims"]),
        l2=float(options["l2"]),
    )
    ranked, scores = label_issues(probabilities, labels, str(options["filter_by"]))
    issues = []
    for rank, position in enumerate(ranked):
        row = rows[kept[position]]
        suggested = int(probabilities[position].argmax())
        issues.append(
            {
                "rank": rank + 1,
                "path": row["path"],
                "split": row["split"],
                "given": row["class"],
                "suggested": classes[suggested],
                "score": round(float(scores[position]), 6),
                "suggested_probability": round(float(probabilities[position, suggested]), 6),
                "flagged": True,
            }
        )
    by_split = Counter(issue["split"] for issue in issues)
    accuracy = head_accuracy(probabilities, labels)
    note = None
    if accuracy < WEAK_HEAD:
        note = (
            f"the out-of-fold head agrees with only {100 * accuracy:.1f} % of the labels: most flags are the head's "
            "own mistakes; look at the top-ranked photos only (or pass a stronger backbone: model=...)"
        )
        log.warning("label issues: %s", note)
    return {
        "method": "cleanlab.filter.find_label_issues on out-of-fold probabilities of a linear head "
        f"({int(options['folds'])}-fold, pooled features); score: self-confidence (low = likely wrong)",
        "filter_by": str(options["filter_by"]),
        "head_accuracy": round(accuracy, 4),
        "note": note,
        "flagged": len(issues),
        "flagged_by_split": {s: by_split.get(s, 0) for s in SPLITS},
        "seconds": round(time.perf_counter() - started, 2),
        "issues": issues,
    }


# ---- stats -------------------------------------------------------------------------------------------------
def data_stats(
    rows: Sequence[Mapping[str, Any]],
    prints: Mapping[str, Fingerprint],
    classes: Sequence[str],
    options: Mapping[str, Any],
) -> dict[str, Any]:
    """Class balance per split, formats, modes, sizes, and the tiny, extreme-aspect and unreadable files."""
    counts = {s: {c: 0 for c in classes} for s in SPLITS}
    for row in rows:
        counts[row["split"]][row["class"]] += 1
    balance = {}
    for split in SPLITS:
        present = [v for v in counts[split].values() if v]
        balance[split] = {
            "images": sum(counts[split].values()),
            "largest_class": max(counts[split], key=counts[split].get) if present else None,
            "smallest_class": min(counts[split], key=counts[split].get) if present else None,
            "imbalance_ratio": round(max(present) / min(present), 3) if present else None,
        }
    tiny_side, ratio = int(options["tiny_side"]), float(options["aspect_ratio"])
    formats: Counter[str] = Counter()
    modes: Counter[str] = Counter()
    widths, heights, sizes = [], [], []
    tiny, extreme, unreadable, mismatched = [], [], [], []
    extension_format = {
        "jpg": "JPEG",
        "jpeg": "JPEG",
        "png": "PNG",
        "gif": "GIF",
        "bmp": "BMP",
        "webp": "WEBP",
    }
    for row in rows:
        fp = prints.get(row["path"])
        base = {"path": row["path"], "split": row["split"], "class": row["class"]}
        if fp is None or fp.error:
            unreadable.append({**base, "error": fp.error if fp is not None else "file not found"})
            continue
        formats[fp.format] += 1
        modes[fp.mode] += 1
        widths.append(fp.width)
        heights.append(fp.height)
        sizes.append(fp.file_size)
        short, long = min(fp.width, fp.height), max(fp.width, fp.height)
        if short < tiny_side:
            tiny.append({**base, "width": fp.width, "height": fp.height})
        if short and long / short > ratio:
            extreme.append(
                {**base, "width": fp.width, "height": fp.height, "aspect_ratio": round(long / short, 2)}
            )
        expected = extension_format.get(Path(row["path"]).suffix.lower().lstrip("."))
        if expected and fp.format and fp.format != expected:
            mismatched.append({**base, "format": fp.format})

    def spread(values: Sequence[int]) -> dict[str, Any]:
        if not values:
            return {}
        return {"min": min(values), "median": statistics.median(values), "max": max(values)}

    return {
        "images": len(rows),
        "classes": len(classes),
        "class_counts": counts,
        "balance": balance,
        "formats": dict(formats.most_common()),
        "modes": dict(modes.most_common()),
        "width": spread(widths),
        "height": spread(heights),
        "file_bytes": spread(sizes),
        "tiny": {"shorter_side_below": tiny_side, "count": len(tiny), "files": tiny},
        "extreme_aspect": {"ratio_above": ratio, "count": len(extreme), "files": extreme},
        "unreadable": {"count": len(unreadable), "files": unreadable},
        "extension_mismatch": {"count": len(mismatched), "files": mismatched},
    }


# ---- the command -------------------------------------------------------------------------------------------
def run_audit(cfg: DictConfig) -> dict[str, Any]:
    """Audit ``cfg.data``; writes ``audit.json`` and ``audit.html`` and returns the audit."""
    started = time.perf_counter()
    datamodule = audit_datamodule(cfg)
    splits = datamodule.discover()
    classes = splits.classes
    rows = [
        {"path": path, "label": label, "class": classes[label], "split": split}
        for split in SPLITS
        for path, label in splits.splits[split]
    ]
    if not rows:
        raise ToolError(f"no images found under data.root={datamodule.root}")
    root = Path(str(datamodule.root))
    out = ensure_dir(output_dir(cfg, root))
    progress = bool(cfg.get("progress", True))
    workers = cfg.get("num_workers")
    cache = Path(str(cfg.paths.cache_dir))
    log.info("auditing %d photos of %d classes from %s -> %s", len(rows), len(classes), root, out)
    timing: dict[str, float] = {}
    t = time.perf_counter()
    prints = fingerprints([r["path"] for r in rows], cache / "fingerprints", workers, progress)
    timing["fingerprints_seconds"] = round(time.perf_counter() - t, 2)

    features = readable = None
    facts: dict[str, Any] = {}
    if cfg.features.enabled:
        t = time.perf_counter()
        model = OmegaConf.to_container(cfg.model, resolve=True)
        features, readable, facts = pooled_features(
            [r["path"] for r in rows],
            model,
            image_size=cfg.features.get("image_size"),
            engine=str(cfg.features.get("engine", "auto")),
            device=str(cfg.features.get("device", "auto")),
            batch_size=int(cfg.features.get("batch_size", 64)),
            num_workers=int(workers) if workers is not None else _default_workers(),
            cache_dir=cache / "audit",
            progress=progress,
        )
        timing["features_seconds"] = round(time.perf_counter() - t, 2)
    duplicates = find_duplicates(rows, prints, features, readable, cfg.duplicates)
    timing.update(duplicates.pop("timing"))
    labels: dict[str, Any] = {"skipped": "features.enabled=false", "issues": [], "flagged": 0}
    if features is not None and readable is not None and cfg.label_issues.enabled:
        labels = find_label_issues(rows, features, readable, classes, cfg.label_issues, int(cfg.seed))
        timing["label_issues_seconds"] = labels.pop("seconds", 0.0)
    elif not cfg.label_issues.enabled:
        labels = {"skipped": "label_issues.enabled=false", "issues": [], "flagged": 0}
    stats = data_stats(rows, prints, classes, cfg.stats)
    timing["total_seconds"] = round(time.perf_counter() - started, 2)
    audit = {
        "kind": AUDIT_KIND,
        "format": AUDIT_FORMAT,
        "data": {
            "root": str(root),
            "origin": splits.origin,
            "classes": classes,
            "splits": {s: len(splits.splits[s]) for s in SPLITS},
            "seed": int(cfg.seed),
        },
        "features": facts or None,
        "settings": OmegaConf.to_container(
            OmegaConf.create({k: cfg[k] for k in ("duplicates", "features", "label_issues", "stats")}),
            resolve=True,
        ),
        "summary": {
            "images": len(rows),
            "classes": len(classes),
            "exact_duplicates": _count(duplicates["exact"]),
            "near_duplicates": _count(duplicates["near"]),
            "label_issues": labels.get("flagged", 0),
            "tiny": stats["tiny"]["count"],
            "extreme_aspect": stats["extreme_aspect"]["count"],
            "unreadable": stats["unreadable"]["count"],
        },
        "duplicates": duplicates,
        "label_issues": labels,
        "stats": stats,
        "timing": timing,
    }
    write_json(out / "audit.json", audit)

    write_text(out / "audit.html", audit_page(audit, cfg.html))
    print(summary_text(audit, out), flush=True)
    audit["output_dir"] = str(out)
    return audit


def _default_workers() -> int:

    return default_num_workers()


def summary_text(audit: Mapping[str, Any], out: Path) -> str:
    s = audit["summary"]
    data = audit["data"]
    parts = ", ".join(f"{k} {v:,}" for k, v in data["splits"].items())
    lines = [f"audit of {data['root']}: {s['images']:,} photos, {s['classes']} classes ({parts})"]
    for key, label in (("exact_duplicates", "exact duplicates"), ("near_duplicates", "near duplicates")):
        c = s[key]
        lines.append(
            f"  {label + ':':<21}{c['groups']:,} groups ({c['files']:,} files), {c['cross_split']:,} across "
            f"splits, {c['cross_class']:,} across classes"
        )
    labels = audit["label_issues"]
    if "skipped" in labels:
        lines.append(f"  {'likely label errors:':<21}not searched ({labels['skipped']})")
    else:
        lines.append(
            f"  {'likely label errors:':<21}{labels['flagged']:,} flagged (the out-of-fold head agrees with "
            f"{100 * labels['head_accuracy']:.1f} % of the labels)"
        )
        if labels.get("note"):
            lines.append(f"  {'':<21}note: {labels['note']}")
    stats = audit["stats"]
    ratio = stats["balance"]["train"]["imbalance_ratio"]
    lines.append(
        f"  {'files:':<21}{s['unreadable']:,} unreadable, {s['tiny']:,} tiny (< {stats['tiny']['shorter_side_below']} px), "
        f"{s['extreme_aspect']:,} extreme aspect (> {stats['extreme_aspect']['ratio_above']:g}:1); "
        f"formats {stats['formats']}, modes {stats['modes']}"
    )
    if ratio is not None:
        lines.append(f"  {'class balance:':<21}largest / smallest train class {ratio:.2f}")
    lines.append(
        f"audit: {out / 'audit.json'}\n       {out / 'audit.html'} ({audit['timing']['total_seconds']:.1f} s)"
    )
    return "\n".join(lines)

"""Exact duplicates in the splits training uses, and leaving out likely label errors an audit flagged.

A photo in both train and test makes the test accuracy partly a measure of memory. When foodvision makes
the split itself, duplicate groups stay in one split (:func:`foodvision.data.splits.stratified_split`'s
``groups``). When the user gave the split, the up-front image check hashes every file while it decodes it,
and :func:`apply_duplicates_policy` warns (``data.duplicates=warn``), stops (``error``) or drops the copies
from the later split (``drop``: val and test lose them, train keeps them), writing the groups to
``duplicates.json`` in the run dir. ``data.exclude_label_issues=<audit.json>`` leaves the photos that
``audit.py`` flagged as likely label errors out of the train split.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from foodvision.atomic import write_json, write_text
from foodvision.data.sources import DataLayoutError
from foodvision.data.splits import SPLITS, Sample

log = logging.getLogger(__name__)

DUPLICATE_MODES = ("warn", "error", "drop", "off")
DUPLICATES_FILE = "duplicates.json"
EXCLUDED_FILE = "excluded_label_issues.csv"
AUDIT_KIND = "foodvision-audit"


def check_duplicates_mode(mode: Any) -> str:
    value = "off" if mode in (None, False) else str(mode).lower()
    if value not in DUPLICATE_MODES:
        raise DataLayoutError(f"data.duplicates must be one of {', '.join(DUPLICATE_MODES)}, got {mode!r}")
    return value


def duplicate_groups(
    splits: Mapping[str, Sequence[Sample]], classes: Sequence[str], digests: Mapping[str, str]
) -> list[dict[str, Any]]:
    """Byte-identical files of the splits: ``[{"digest", "files": [{"path", "split", "class"}, ...],
    "cross_split", "cross_class"}]``, two or more files per group, in path order."""
    by_digest: dict[str, list[dict[str, str]]] = {}
    for split in SPLITS:
        for path, label in splits.get(split, []):
            digest = digests.get(path)
            if digest:
                by_digest.setdefault(digest, []).append(
                    {"path": path, "split": split, "class": classes[label]}
                )
    groups = []
    for digest, files in by_digest.items():
        if len(files) > 1:
            files.sort(key=lambda f: (SPLITS.index(f["split"]), f["path"]))
            groups.append(
                {
                    "digest": digest,
                    "files": files,
                    "cross_split": len({f["split"] for f in files}) > 1,
                    "cross_class": len({f["class"] for f in files}) > 1,
                }
            )
    return sorted(groups, key=lambda g: g["files"][0]["path"])


@dataclass
class DuplicateCheck:
    """What the check found and did: the groups, how many span splits or classes, the files dropped."""

    groups: list[dict[str, Any]] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    report: Path | None = None

    @property
    def cross_split(self) -> int:
        return sum(g["cross_split"] for g in self.groups)

    @property
    def cross_class(self) -> int:
        return sum(g["cross_class"] for g in self.groups)

    def summary(self) -> dict[str, Any]:
        """For metrics.json."""
        return {
            "exact_duplicate_groups": len(self.groups),
            "cross_split_duplicate_groups": self.cross_split,
            "cross_class_duplicate_groups": self.cross_class,
            "dropped_duplicates": len(self.dropped),
        }


def apply_duplicates_policy(
    splits: dict[str, list[Sample]],
    classes: Sequence[str],
    digests: Mapping[str, str],
    mode: str,
    report_path: Path | None,
) -> DuplicateCheck:
    """Find exact duplicates across the splits and act on ``mode`` (see the module docstring); ``splits``
    loses the dropped copies in place. The groups are written to ``report_path`` when there are any."""
    mode = check_duplicates_mode(mode)
    if mode == "off":
        return DuplicateCheck()
    check = DuplicateCheck(duplicate_groups(splits, classes, digests))
    if not check.groups:
        return check
    if report_path is not None:
        report_path.parent.mkdir(parents=True, exist_ok=True)
        write_json(report_path, {"kind": "foodvision-duplicates", "exact": check.groups})
        check.report = report_path
    where = f" (listed in {report_path})" if report_path is not None else ""
    if check.cross_class:
        log.warning(
            "%d photo(s) are byte-identical copies under different classes%s: at least one label of each is "
            "wrong (python audit.py lists them with thumbnails)",
            check.cross_class,
            where,
        )
    if not check.cross_split:
        return check
    crossing = [g for g in check.groups if g["cross_split"]]
    copies = sum(len(g["files"]) for g in crossing)
    message = (
        f"{len(crossing)} photo(s) appear in more than one split ({copies} files){where}: the val/test "
        "metrics are partly measured on photos the model trains on"
    )
    if mode == "error":
        raise DataLayoutError(
            message + ". Remove the copies, or set data.duplicates=drop to leave them out of val/test "
            "(data.duplicates=warn: train anyway)."
        )
    if mode == "warn":
        log.warning("%s. data.duplicates=drop leaves the copies out of val/test; =error stops.", message)
        return check
    drop: set[str] = set()
    for group in crossing:
        first = group["files"][0]["split"]  # files are in split order: train, val, test
        drop |= {f["path"] for f in group["files"] if f["split"] != first}
    for split in SPLITS:
        before = {label for _, label in splits[split]}
        splits[split] = [s for s in splits[split] if s[0] not in drop]
        emptied = sorted(before - {label for _, label in splits[split]})
        if emptied:
            raise DataLayoutError(
                f"after dropping {len(drop)} duplicate(s) (data.duplicates=drop), the {split} split has no "
                f"images of {', '.join(classes[i] for i in emptied)}{where}"
            )
    check.dropped = sorted(drop)
    log.warning("%s; dropped %d copies from the later splits (data.duplicates=drop).", message, len(drop))
    return check


# ---- likely label errors flagged by audit.py ---------------------------------------------------------------
def read_label_issues(audit_path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The flagged label issues of an ``audit.json`` (each with ``path``, ``given``, ``suggested``,
    ``score``); an error naming ``data.exclude_label_issues`` when the file is missing or not an audit."""
    path = Path(audit_path).expanduser()
    try:
        audit = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataLayoutError(
            f"data.exclude_label_issues={audit_path}: no such file (write it with audit.py)"
        ) from None
    except (OSError, ValueError) as error:
        raise DataLayoutError(
            f"data.exclude_label_issues={audit_path}: not readable JSON ({error})"
        ) from None
    if not isinstance(audit, dict) or audit.get("kind") != AUDIT_KIND:
        raise DataLayoutError(
            f"data.exclude_label_issues={audit_path}: not an audit.json written by audit.py"
        )
    issues = (audit.get("label_issues") or {}).get("issues") or []
    return [issue for issue in issues if issue.get("flagged", True)]


def exclude_label_issues(
    train: Sequence[Sample],
    audit_path: str | os.PathLike[str],
    out_file: Path | None,
    classes: Sequence[str],
) -> tuple[list[Sample], list[dict[str, Any]]]:
    """``train`` without the photos the audit flagged, and the excluded issues (written to ``out_file``);
    an error when a class would have no train photos left."""
    issues = read_label_issues(audit_path)
    flagged = {os.path.realpath(issue["path"]): issue for issue in issues}
    kept, excluded = [], []
    for path, label in train:
        issue = flagged.get(os.path.realpath(path))
        if issue is None:
            kept.append((path, label))
        else:
            excluded.append({**issue, "path": path})
    emptied = sorted({label for _, label in train} - {label for _, label in kept})
    if emptied:
        raise DataLayoutError(
            f"data.exclude_label_issues={audit_path} flags every train photo of "
            f"{', '.join(classes[i] for i in emptied)}: check that class folder by hand"
        )
    if len(excluded) > 0.1 * len(train):
        log.warning(
            "data.exclude_label_issues leaves out %d of %d train photos (%.0f %%): more than an audit's head can "
            "be trusted on (see the audit's head accuracy); consider a stricter audit (label_issues.filter_by=both)",
            len(excluded),
            len(train),
            100 * len(excluded) / max(1, len(train)),
        )
    if issues and not excluded:
        log.warning(
            "data.exclude_label_issues=%s: none of its %d flagged photos is in this train split (an audit of "
            "other data, or of another split seed?)",
            audit_path,
            len(issues),
        )
    if out_file is not None:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["path", "given", "suggested", "score"])
        for issue in excluded:
            writer.writerow([issue["path"], issue.get("given"), issue.get("suggested"), issue.get("score")])
        out_file.parent.mkdir(parents=True, exist_ok=True)
        write_text(out_file, buffer.getvalue())
    log.info(
        "data.exclude_label_issues: left %d flagged photo(s) out of the train split (listed in %s)",
        len(excluded),
        out_file,
    )
    return kept, excluded

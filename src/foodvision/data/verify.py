"""One up-front check of every photo of every split, before any training starts.

Training used to meet a bad file only when it reached it: a truncated JPEG in the test split stopped a
run after all its epochs, and each run named one bad file. Here each photo is decoded once (as training
will decode it: RGB, JPEG draft mode), in parallel worker processes, and every bad file is reported at
once. Verdicts are cached per file (path, size, modification time), so later runs on the same data only
decode what changed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from foodvision.data.images import BadImageError, load_rgb
from foodvision.data.sources import DataLayoutError
from foodvision.hardware import cpu_cores

log = logging.getLogger(__name__)

VERDICTS_FORMAT = 1
SHOWN = 12  # bad files named in an error message; the run dir's bad_images.tsv lists all


class BadImagesError(DataLayoutError):
    """Some photos of the data cannot be decoded; the message lists them (all of them are in the log)."""


def image_list_digest(paths: Sequence[str]) -> str:
    """sha256 of the files' paths, sizes and modification times (a changed photo changes it)."""
    digest = hashlib.sha256()
    for path in paths:
        stat = os.stat(path)
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _stamp(path: str) -> list[int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


class _Decode(Dataset):
    """path -> reason it cannot be decoded, or "" (in worker processes)."""

    def __init__(self, paths: Sequence[str], draft_size: int | None):
        self.paths = list(paths)
        self.draft = (draft_size, draft_size) if draft_size else None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> str:
        try:
            load_rgb(self.paths[index], draft_size=self.draft)
        except BadImageError as error:
            return error.reason
        except FileNotFoundError:
            return "file not found"
        except Exception as error:  # noqa: BLE001 - whatever a decoder raises makes the file bad, not the run
            return f"{type(error).__name__}: {error}"
        return ""


def default_verify_workers() -> int:
    cores = cpu_cores()
    return max(1, min(16, cores))


def find_bad_images(
    paths: Sequence[str],
    draft_size: int | None = None,
    cache_dir: str | Path | None = None,
    num_workers: int | None = None,
    progress: bool = True,
) -> dict[str, str]:
    """``{path: reason}`` of the files that cannot be decoded, each file decoded at most once per change.

    ``cache_dir``: where per-file verdicts are kept between runs (keyed by the file list and draft size).
    """
    paths = sorted(set(map(str, paths)))
    cache_file = None
    known: dict[str, list] = {}
    if cache_dir is not None:
        key = hashlib.sha256(json.dumps([VERDICTS_FORMAT, draft_size, paths]).encode()).hexdigest()[:24]
        cache_file = Path(cache_dir) / f"verdicts-{key}.json"
        if cache_file.is_file():
            try:
                known = json.loads(cache_file.read_text())
            except (OSError, ValueError):
                known = {}
    stamps = {path: _stamp(path) for path in paths}
    verdicts: dict[str, str] = {}
    todo = []
    for path in paths:
        entry = known.get(path)
        if stamps[path] is not None and entry is not None and entry[:2] == stamps[path]:
            verdicts[path] = entry[2]
        else:
            todo.append(path)
    if todo:
        workers = default_verify_workers() if num_workers is None else num_workers
        loader = DataLoader(
            _Decode(todo, draft_size),
            batch_size=32,
            num_workers=workers if len(todo) > 64 else 0,
            collate_fn=list,
        )
        with tqdm(
            total=len(todo), desc="checking images", unit="img", disable=not progress, leave=False
        ) as bar:
            done = 0
            for reasons in loader:
                for path, reason in zip(todo[done : done + len(reasons)], reasons, strict=True):
                    verdicts[path] = reason
                done += len(reasons)
                bar.update(len(reasons))
        log.info("checked %d images (%d known from earlier runs)", len(todo), len(paths) - len(todo))
        if cache_file is not None:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            entries = {p: [*stamps[p], verdicts[p]] for p in paths if stamps[p] is not None}
            temporary = cache_file.with_suffix(f".{os.getpid()}.tmp")
            temporary.write_text(json.dumps(entries))
            temporary.replace(cache_file)  # atomic: parallel runs or ranks never read half a file
    return {path: reason for path, reason in verdicts.items() if reason}


def describe_bad_images(bad: dict[str, str], where: str, log_path: Path | None) -> str:
    """The error message: how many, the first few with their reasons, and where the full list is."""
    lines = [f"  {path}: {reason}" for path, reason in sorted(bad.items())[:SHOWN]]
    more = f"\n  ... and {len(bad) - SHOWN} more" if len(bad) > SHOWN else ""
    listed = f" (all listed in {log_path})" if log_path is not None else ""
    return (
        f"{len(bad)} image(s) of {where} cannot be decoded{listed}:\n"
        + "\n".join(lines)
        + more
        + "\nRemove or replace them, or set data.skip_bad_images=true to train without them."
    )

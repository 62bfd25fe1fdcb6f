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
from collections.abc import Sequence
from pathlib import Path

from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from foodvision.atomic import DiskWriteError, fallback_cache_dir, writable_cache_dir, write_text
from foodvision.data.fingerprints import file_digest, file_stamp
from foodvision.data.images import BadImageError, load_rgb
from foodvision.data.sources import DataLayoutError
from foodvision.hardware import cpu_cores

log = logging.getLogger(__name__)

VERDICTS_FORMAT = 2  # 2: each verdict also keeps the file's content digest (exact duplicates)
SHOWN = 12  # bad files named in an error message; the run dir's bad_images.tsv lists all


class BadImagesError(DataLayoutError):
    """Some photos of the data cannot be decoded; the message lists them (all of them are in the log)."""


def image_list_digest(paths: Sequence[str]) -> str:
    """sha256 of the files' paths, sizes and modification times (a changed photo changes it). A file that
    vanished since the image check counts as changed, not as a crash: reading it then makes it a bad
    photo (skipped with data.skip_bad_images=true, else an error naming it)."""
    digest = hashlib.sha256()
    for path in paths:
        stamp = file_stamp(path)
        described = "missing" if stamp is None else f"{stamp[0]}\0{stamp[1]}"
        digest.update(f"{path}\0{described}\n".encode())
    return digest.hexdigest()


class _Decode(Dataset):
    """path -> (reason it cannot be decoded or "", content digest or "") (in worker processes). The bytes
    are hashed as they are read for decoding: exact duplicates across splits cost no second pass."""

    def __init__(self, paths: Sequence[str], draft_size: int | None):
        self.paths = list(paths)
        self.draft = (draft_size, draft_size) if draft_size else None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[str, str]:
        try:
            digest = file_digest(self.paths[index])
            load_rgb(self.paths[index], draft_size=self.draft)
        except BadImageError as error:
            return error.reason, digest
        except FileNotFoundError:
            return "file not found", ""
        except Exception as error:  # noqa: BLE001 - whatever a decoder raises makes the file bad, not the run
            return f"{type(error).__name__}: {error}", ""
        return "", digest


def default_verify_workers() -> int:
    cores = cpu_cores()
    return max(1, min(16, cores))


def find_bad_images(
    paths: Sequence[str],
    draft_size: int | None = None,
    cache_dir: str | Path | None = None,
    num_workers: int | None = None,
    progress: bool = True,
    digests: dict[str, str] | None = None,
) -> dict[str, str]:
    """``{path: reason}`` of the files that cannot be decoded, each file decoded at most once per change.
    ``digests``, when given, is filled with every file's content digest (exact duplicates, see
    :mod:`foodvision.data.duplicates`).

    ``cache_dir``: where per-file verdicts are kept between runs (keyed by the file list and draft size).
    """
    paths = sorted(set(map(str, paths)))
    cache_name = None
    caches: list[dict[str, list]] = []
    if cache_dir is not None:
        key = hashlib.sha256(json.dumps([VERDICTS_FORMAT, draft_size, paths]).encode()).hexdigest()[:24]
        cache_name = f"verdicts-{key}.json"
        # A read-only cache dir's verdicts were written to a temporary fallback by an earlier run: read both.
        caches = [
            _read_verdicts(folder / cache_name) for folder in (Path(cache_dir), fallback_cache_dir(cache_dir))
        ]
    stamps = {path: file_stamp(path) for path in paths}
    verdicts: dict[str, str] = {}
    found: dict[str, str] = {}  # content digests
    todo = []
    for path in paths:
        entries = [cache[path] for cache in caches if isinstance(cache.get(path), list)]
        entry = next((e for e in entries if len(e) == 4 and e[:2] == stamps[path]), None)
        if stamps[path] is not None and entry is not None:
            verdicts[path], found[path] = entry[2], entry[3]
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
                for path, (reason, digest) in zip(todo[done : done + len(reasons)], reasons, strict=True):
                    verdicts[path], found[path] = reason, digest
                done += len(reasons)
                bar.update(len(reasons))
        log.info("checked %d images (%d known from earlier runs)", len(todo), len(paths) - len(todo))
        if cache_dir is not None and cache_name is not None:
            entries = {p: [*stamps[p], verdicts[p], found[p]] for p in paths if stamps[p] is not None}
            _write_verdicts(cache_dir, cache_name, entries)
    if digests is not None:
        digests.update({path: digest for path, digest in found.items() if digest})
    return {path: reason for path, reason in verdicts.items() if reason}


def _read_verdicts(path: Path) -> dict[str, list]:
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _write_verdicts(cache_dir: str | Path, name: str, entries: dict[str, list]) -> None:
    """Keep the verdicts for later runs. A cache that cannot be written (read-only folder: a temporary
    fallback is used; full disk) costs a re-check next time, never this run: one warning line."""
    try:
        folder = writable_cache_dir(cache_dir, "image check's verdict cache")
        # Atomic, under a per-process temporary name: parallel runs or ranks never read half a file.
        write_text(folder / name, json.dumps(entries))
    except DiskWriteError as error:
        log.warning("image verdicts not cached (%s): the next run checks these photos again", error)


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

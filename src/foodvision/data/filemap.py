"""A function of each file, computed once per file change: a parallel map over files with a per-file cache.

The image check (verdicts, :mod:`foodvision.data.verify`) and the fingerprints (content digests, perceptual
hashes, :mod:`foodvision.data.fingerprints`) both read every photo of a data set, which is slow on a large one
and mostly repeated work between runs. :func:`cached_map` reads the files in DataLoader worker processes with
a progress bar, and keeps each result in a JSON cache file under the file's stamp (size, modification time):
a later run reads only the files that changed. A cache entry is ``[size, mtime_ns, *fields]``, the fields
being what the caller's ``encode`` makes of a result; an entry that does not match its file's stamp, or that
``decode`` cannot read, is computed again (never misread).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from foodvision.atomic import DiskWriteError, fallback_cache_dir, writable_cache_dir, write_text
from foodvision.hardware import cpu_cores

__all__ = ["cached_map", "default_workers", "file_stamp"]

log = logging.getLogger(__name__)

T = TypeVar("T")

BATCH = 32  # files per worker task: few inter-process round trips, a progress bar that still moves
IN_PROCESS_UP_TO = 64  # so few files to read that starting worker processes would cost more than it saves


def file_stamp(path: str) -> list[int] | None:
    """``[size, mtime_ns]``: what a per-file cache (verdicts, fingerprints) keys on; None for a vanished file."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


def default_workers() -> int:
    """Worker processes reading files: every core (decoding is CPU-bound), at most 16."""
    return max(1, min(16, cpu_cores()))


class _Apply(Dataset):
    """path -> ``function(path)`` in DataLoader worker processes (``None`` for a file that cannot be opened)."""

    def __init__(self, paths: Sequence[str], function: Callable[[str], Any]):
        self.paths, self.function = list(paths), function

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Any:
        try:
            return self.function(self.paths[index])
        except OSError:
            return None


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or unreadable: computed again
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _cached_value(entry: Any, stamp: list[int] | None, decode: Callable[[list], T]) -> tuple[bool, T | None]:
    """``(True, value)`` when ``entry`` is a readable result for a file with ``stamp``, else ``(False, None)``."""
    if stamp is None or not isinstance(entry, list) or len(entry) < 3 or entry[:2] != stamp:
        return False, None
    try:
        return True, decode(entry[2:])
    except (TypeError, ValueError, KeyError, IndexError):  # an entry of another layout: computed again
        return False, None


def cached_map(
    paths: Sequence[str],
    function: Callable[[str], T | None],
    *,
    encode: Callable[[T], list],
    decode: Callable[[list], T],
    cache_file: str | Path | None = None,
    num_workers: int | None = None,
    progress: bool = True,
    desc: str = "reading files",
    done: str = "read",
    what: str = "cache",
) -> dict[str, T]:
    """``{path: function(path)}`` for every path where it is not None, each file computed at most once per
    change (size, modification time), in parallel worker processes, with a progress bar (``desc``).

    ``function`` must be picklable (a module-level function or a ``functools.partial`` of one); an
    ``OSError`` it raises (a file that vanished) counts as None. A file that vanished is never cached.
    ``encode`` turns a result into the JSON list kept after the stamp, ``decode`` reads it back (raising
    TypeError/ValueError/KeyError/IndexError for an entry it does not recognise).

    ``cache_file``: the JSON cache (None: no cache). When its folder is read-only the file goes to the
    folder's temporary fallback (:func:`foodvision.atomic.writable_cache_dir`, which names ``what`` in its one
    warning); both are read, and entries of files not in ``paths`` are kept when it is written.
    One INFO line says how many files were ``done`` (e.g. "checked").
    """
    paths = sorted(set(map(str, paths)))
    if not paths:
        return {}
    cache = None if cache_file is None else Path(cache_file)
    # The cache folder first: its entries win; its fallback holds what a read-only cache folder could not take.
    caches = (
        []
        if cache is None
        else [_read_cache(cache), _read_cache(fallback_cache_dir(cache.parent) / cache.name)]
    )
    stored: dict[str, Any] = {}
    for entries in reversed(caches):
        stored.update(entries)
    stamps = {path: file_stamp(path) for path in paths}
    results: dict[str, T] = {}
    todo = []
    for path in paths:
        for entries in caches:
            found, value = _cached_value(entries.get(path), stamps[path], decode)
            if found:
                results[path] = value  # type: ignore[assignment]
                stored[path] = entries[path]
                break
        else:
            todo.append(path)
    if not todo:
        return results
    workers = default_workers() if num_workers is None else num_workers
    loader = DataLoader(
        _Apply(todo, function),
        batch_size=BATCH,
        num_workers=workers if len(todo) > IN_PROCESS_UP_TO else 0,
        collate_fn=list,
    )
    with tqdm(total=len(todo), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        start = 0
        for values in loader:
            for path, value in zip(todo[start : start + len(values)], values, strict=True):
                if value is not None:
                    results[path] = value
            start += len(values)
            bar.update(len(values))
    log.info("%s %d files (%d known from earlier runs)", done, len(todo), len(paths) - len(todo))
    if cache is not None:
        fresh = {p: [*stamps[p], *encode(results[p])] for p in todo if p in results and stamps[p] is not None}
        try:
            folder = writable_cache_dir(cache.parent, what)
            # Atomic, under a per-process temporary name: parallel runs or ranks never read half a file.
            write_text(folder / cache.name, json.dumps(stored | fresh))
        except DiskWriteError as error:  # a cache is a speed-up: not being able to keep it is no failure
            log.warning("%s not kept (%s): the next run reads these files again", what, error)
    return results

"""What each photo file is, cheaply and once: a content digest (exact duplicates), a perceptual hash (near
duplicates: a resized or re-encoded copy) and its header facts (size, format, mode).

Used by the automatic split (duplicate groups stay in one split, :func:`content_digests` only: no decoding),
by the up-front image check (:func:`file_digest` while it decodes) and by ``audit.py`` (:func:`fingerprints`).
Files are read in parallel worker processes (all cores, as the image check), and results are cached per file
(path, size, modification time) in one JSON file per data folder, so a second run reads only what changed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from foodvision.atomic import DiskWriteError, fallback_cache_dir, writable_cache_dir, write_text
from foodvision.hardware import cpu_cores

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
CHUNK = 1 << 20
# Side the perceptual hash is computed from: JPEG draft mode decodes at 1/2..1/8 scale, never below it (the
# hash itself looks at 32x32 grey pixels), so hashing a 4000 px photo costs about what a thumbnail does.
PHASH_DRAFT = 128


def file_digest(path: str | os.PathLike[str]) -> str:
    """blake2b-128 of the file's bytes (hex): equal digests are byte-identical files."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Fingerprint:
    """One file: digest, 64-bit perceptual hash (hex; ``""`` when it cannot be decoded) and header facts."""

    digest: str
    phash: str
    width: int
    height: int
    format: str
    mode: str
    file_size: int
    error: str = ""


def fingerprint_file(path: str) -> Fingerprint:
    """Reads ``path`` once for its digest, then decodes it (JPEG draft mode) for its perceptual hash."""
    import warnings

    import imagehash
    from PIL import Image, ImageOps

    size = os.path.getsize(path)
    digest = file_digest(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as image:
                width, height, fmt, mode = image.width, image.height, image.format or "", image.mode
                if image.format == "JPEG":
                    image.draft("RGB", (PHASH_DRAFT, PHASH_DRAFT))
                image.load()
                rotated = ImageOps.exif_transpose(image)
                if rotated.size != image.size:  # a photo shown rotated: its shown shape is what counts
                    width, height = height, width
                phash = str(imagehash.phash(rotated.convert("L")))
    except Exception as error:  # noqa: BLE001 - a bad file is a finding, not a crash
        return Fingerprint(digest, "", 0, 0, "", "", size, f"{type(error).__name__}: {error}")
    return Fingerprint(digest, phash, width, height, fmt, mode, size)


def file_stamp(path: str) -> list[int] | None:
    """``[size, mtime_ns]``: what a per-file cache (verdicts, fingerprints) keys on; None for a vanished file."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


class _Apply(Dataset):
    """path -> ``function(path)`` in DataLoader worker processes (``None`` for a file that vanished)."""

    def __init__(self, paths: Sequence[str], function: Callable[[str], Any]):
        self.paths, self.function = list(paths), function

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Any:
        try:
            return self.function(self.paths[index])
        except OSError:
            return None


def default_workers() -> int:
    return max(1, min(16, cpu_cores()))


def _cache_file(cache_dir: str | Path, kind: str, paths: Sequence[str]) -> Path:
    """One cache file per data folder (the paths' common folder), so a subset of a folder reuses it."""
    try:
        common = os.path.commonpath([os.path.abspath(p) for p in paths])
    except ValueError:  # paths on different drives
        common = ""
    key = hashlib.sha256(f"{CACHE_FORMAT}:{kind}:{common}".encode()).hexdigest()[:20]
    return Path(cache_dir) / f"{kind}-{key}.json"


def _cached_map(
    paths: Sequence[str],
    function: Callable[[str], Any],
    kind: str,
    encode: Callable[[Any], Any],
    decode: Callable[[Any], Any],
    cache_dir: str | Path | None,
    num_workers: int | None,
    progress: bool,
    desc: str,
) -> dict[str, Any]:
    """``{path: function(path)}`` for every readable path, parallel, cached per (path, size, mtime)."""
    paths = sorted(set(map(str, paths)))
    if not paths:
        return {}
    cache_name = _cache_file(cache_dir, kind, paths).name if cache_dir is not None else None
    known: dict[str, list] = {}
    if cache_dir is not None and cache_name is not None:
        # A read-only cache dir's entries went to its temporary fallback (foodvision.atomic): read both.
        for folder in (fallback_cache_dir(cache_dir), Path(cache_dir)):
            try:
                loaded = json.loads((folder / cache_name).read_text())
            except (OSError, ValueError):
                continue
            if isinstance(loaded, dict):
                known.update(loaded)
    stamps = {path: file_stamp(path) for path in paths}
    results: dict[str, Any] = {}
    todo = []
    for path in paths:
        entry = known.get(path)
        if stamps[path] is not None and entry is not None and entry[:2] == stamps[path]:
            results[path] = decode(entry[2])
        elif stamps[path] is not None:
            todo.append(path)
    if todo:
        workers = default_workers() if num_workers is None else num_workers
        loader = DataLoader(
            _Apply(todo, function),
            batch_size=32,
            num_workers=workers if len(todo) > 64 else 0,
            collate_fn=list,
        )
        with tqdm(total=len(todo), desc=desc, unit="img", disable=not progress, leave=False) as bar:
            done = 0
            for values in loader:
                for path, value in zip(todo[done : done + len(values)], values, strict=True):
                    if value is not None:
                        results[path] = value
                done += len(values)
                bar.update(len(values))
        log.info("%s: %d files read (%d known from earlier runs)", desc, len(todo), len(paths) - len(todo))
        if cache_dir is not None and cache_name is not None:
            # Entries of other files of the folder (another subset, another run) are kept.
            fresh = {p: [*stamps[p], encode(results[p])] for p in todo if p in results}
            merged = {p: e for p, e in known.items() if p not in fresh} | fresh
            try:
                write_text(writable_cache_dir(cache_dir, f"{kind} cache") / cache_name, json.dumps(merged))
            except DiskWriteError as error:  # a cache is a speed-up: not being able to keep it is no failure
                log.warning("%s not cached (%s): the next run reads these files again", kind, error)
    return results


def content_digests(
    paths: Sequence[str],
    cache_dir: str | Path | None = None,
    num_workers: int | None = None,
    progress: bool = True,
) -> dict[str, str]:
    """``{path: file_digest(path)}``: reads the files (no decoding), in parallel, cached per file."""
    return _cached_map(
        paths,
        file_digest,
        "digests",
        lambda v: v,
        lambda v: v,
        cache_dir,
        num_workers,
        progress,
        "hashing files",
    )


def fingerprints(
    paths: Sequence[str],
    cache_dir: str | Path | None = None,
    num_workers: int | None = None,
    progress: bool = True,
) -> dict[str, Fingerprint]:
    """``{path: Fingerprint}`` of every file that exists, in parallel, cached per file."""
    return _cached_map(
        paths,
        fingerprint_file,
        "fingerprints",
        asdict,
        lambda v: Fingerprint(**v),
        cache_dir,
        num_workers,
        progress,
        "fingerprinting images",
    )


def groups_of_equal(values: dict[str, str]) -> list[list[str]]:
    """Paths sharing a value (a digest), two or more per group; each group and the list sorted."""
    by_value: dict[str, list[str]] = {}
    for path, value in values.items():
        if value:
            by_value.setdefault(value, []).append(path)
    return sorted(sorted(group) for group in by_value.values() if len(group) > 1)

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
from functools import partial
from pathlib import Path

from foodvision.data.filemap import cached_map, file_stamp
from foodvision.data.fingerprints import file_digest
from foodvision.data.images import BadImageError, load_rgb
from foodvision.data.sources import DataLayoutError

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


def check_image(path: str, draft_size: int | None = None) -> tuple[str, str]:
    """``(reason it cannot be decoded or "", content digest or "")`` of one photo (in worker processes). The
    bytes are hashed as they are read for decoding: exact duplicates across splits cost no second pass."""
    draft = (draft_size, draft_size) if draft_size else None
    try:
        digest = file_digest(path)
        load_rgb(path, draft_size=draft)
    except BadImageError as error:
        return error.reason, digest
    except FileNotFoundError:
        return "file not found", ""
    except Exception as error:  # noqa: BLE001 - whatever a decoder raises makes the file bad, not the run
        return f"{type(error).__name__}: {error}", ""
    return "", digest


def _verdict_fields(verdict: tuple[str, str]) -> list:
    """A verdict as its cache entry keeps it after the file's stamp: ``[reason, digest]``."""
    return list(verdict)


def _verdict(fields: list) -> tuple[str, str]:
    reason, digest = fields  # ValueError for an entry of another layout: the file is checked again
    if not isinstance(reason, str) or not isinstance(digest, str):
        raise TypeError("not a verdict")
    return reason, digest


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
    cache_file = None
    if cache_dir is not None:
        key = hashlib.sha256(json.dumps([VERDICTS_FORMAT, draft_size, paths]).encode()).hexdigest()[:24]
        cache_file = Path(cache_dir) / f"verdicts-{key}.json"
    # A cache that cannot be written (read-only folder: a temporary fallback is used; full disk) costs a
    # re-check next time, never this run: one warning line.
    verdicts = cached_map(
        paths,
        partial(check_image, draft_size=draft_size),
        encode=_verdict_fields,
        decode=_verdict,
        cache_file=cache_file,
        num_workers=num_workers,
        progress=progress,
        desc="checking images",
        done="checked",
        what="image check's verdict cache",
    )
    if digests is not None:
        digests.update({path: digest for path, (_, digest) in verdicts.items() if digest})
    return {path: reason for path, (reason, _) in verdicts.items() if reason}


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

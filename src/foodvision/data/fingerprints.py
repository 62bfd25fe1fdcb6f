"""What each photo file is, cheaply and once: a content digest (exact duplicates), a perceptual hash (near
duplicates: a resized or re-encoded copy) and its header facts (size, format, mode).

Used by the automatic split (duplicate groups stay in one split, :func:`content_digests` only: no decoding),
by the up-front image check (:func:`file_digest` while it decodes) and by ``audit.py`` (:func:`fingerprints`).
Files are read in parallel worker processes (all cores, as the image check), and results are cached per file
(path, size, modification time) in one JSON file per data folder, so a second run reads only what changed.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from foodvision.data.filemap import cached_map

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


def _cache_file(cache_dir: str | Path | None, kind: str, paths: Sequence[str]) -> Path | None:
    """One cache file per data folder (the paths' common folder), so a subset of a folder reuses it (entries
    of the folder's other files are kept, see :func:`foodvision.data.filemap.cached_map`)."""
    if cache_dir is None or not paths:
        return None
    try:
        common = os.path.commonpath([os.path.abspath(p) for p in map(str, paths)])
    except ValueError:  # paths on different drives
        common = ""
    key = hashlib.sha256(f"{CACHE_FORMAT}:{kind}:{common}".encode()).hexdigest()[:20]
    return Path(cache_dir) / f"{kind}-{key}.json"


def _digest(fields: list) -> str:
    (digest,) = fields  # ValueError for an entry of another layout: the file is read again
    if not isinstance(digest, str):
        raise TypeError("not a digest")
    return digest


def _fingerprint(fields: list) -> Fingerprint:
    (values,) = fields
    return Fingerprint(**values)  # TypeError for an entry of another layout: the file is read again


def content_digests(
    paths: Sequence[str],
    cache_dir: str | Path | None = None,
    num_workers: int | None = None,
    progress: bool = True,
) -> dict[str, str]:
    """``{path: file_digest(path)}``: reads the files (no decoding), in parallel, cached per file."""
    return cached_map(
        paths,
        file_digest,
        encode=lambda digest: [digest],
        decode=_digest,
        cache_file=_cache_file(cache_dir, "digests", paths),
        num_workers=num_workers,
        progress=progress,
        desc="hashing files",
        done="hashed",
        what="digests cache",
    )


def fingerprints(
    paths: Sequence[str],
    cache_dir: str | Path | None = None,
    num_workers: int | None = None,
    progress: bool = True,
) -> dict[str, Fingerprint]:
    """``{path: Fingerprint}`` of every file that exists, in parallel, cached per file."""
    return cached_map(
        paths,
        fingerprint_file,
        encode=lambda fingerprint: [asdict(fingerprint)],
        decode=_fingerprint,
        cache_file=_cache_file(cache_dir, "fingerprints", paths),
        num_workers=num_workers,
        progress=progress,
        desc="fingerprinting images",
        done="fingerprinted",
        what="fingerprints cache",
    )


def groups_of_equal(values: dict[str, str]) -> list[list[str]]:
    """Paths sharing a value (a digest), two or more per group; each group and the list sorted."""
    by_value: dict[str, list[str]] = {}
    for path, value in values.items():
        if value:
            by_value.setdefault(value, []).append(path)
    return sorted(sorted(group) for group in by_value.values() if len(group) > 1)

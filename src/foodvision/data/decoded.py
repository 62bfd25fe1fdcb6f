"""A decoded-photo cache: every photo of a split decoded once, kept as uint8 pixels in a memory-mapped store.

Why: an augmented recipe decodes and resizes every JPEG again every epoch, in loader workers that compete
with training for the same cores. Decoded once to the working size, a photo costs one memory-mapped read of
its row afterwards (``data.pipeline=decoded``), and the random part of the augmentation runs batched on the
training device (:mod:`foodvision.data.batched`).

What is stored, per photo: ``photos`` (uint8 ``[3, side, side]``), the photo decoded as the PIL path decodes
it (:func:`foodvision.data.images.load_rgb` with JPEG draft mode), its shorter side resized to ``side``
(the model's interpolation, antialiased) and centre-cropped to a square; ``ok`` (1, or 0 for a file that
could not be decoded: its row is zeros and the split's dataset skips it). ``side`` (:func:`photo_side`):

- the eval resize (``Preprocessing.resize_size``, e.g. 256 for 224 px at crop_pct 0.875) for the eval
  transform and the presets that start from it (``none``, ``seed``, ``light``): what those transforms read
  is then exactly what the PIL path reads (the same decode, the same resize, the same centre square), so
  validation on the cache is the PIL path's to the bit;
- ``max(resize_size, ceil(image_size * 1.15))`` for the random-resized-crop presets (``crop``,
  ``randaugment``): a 15 % margin for the crops to draw from. They draw from the photo's centre square,
  not from the whole photo as the PIL path does (a landscape photo's sides are not in the cache).

Entries live under ``<cache_dir>/decoded`` (``paths.cache_dir``: ``$FOODVISION_CACHE``, else
``data/cache``), named by a key over what the pixels depend on: the files (paths, sizes, modification
times), ``side``, the interpolation and the store format; nothing else (not the model's mean/std, not
the batch size), so that runs and sweeps of different models at one size share them. A changed photo
changes the key: the split is decoded again. Rows are written as they are decoded, so memory stays flat
in the number of photos (Food-101's 68k training photos at 256 px: 13 GB on disk, paged in as read).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode, v2
from tqdm.auto import tqdm

from foodvision.atomic import fallback_cache_dir, writable_cache_dir
from foodvision.data.datasets import unreadable
from foodvision.data.images import BadImageError, load_rgb
from foodvision.data.store import Store, StoreError, StoreWriter, open_store, remove_store
from foodvision.data.transforms import Preprocessing
from foodvision.data.verify import image_list_digest

log = logging.getLogger(__name__)

DECODED_FORMAT = 1
CROP_MARGIN = 1.15  # the random-resized-crop presets' cache side: image_size * CROP_MARGIN (at least)
RANDOM_CROP_PRESETS = ("crop", "randaugment")
FOLDER = "decoded"
BUILD_BATCH = 16  # photos per worker batch while building (small: a batch is held until written)


def photo_side(pre: Preprocessing, augment: Mapping[str, Any] | None = None) -> int:
    """The side of the stored squares for the eval transform (``augment`` None) or a train preset."""
    name = (augment or {}).get("name", "none")
    if name in RANDOM_CROP_PRESETS:
        return max(pre.resize_size, math.ceil(pre.image_size * CROP_MARGIN))
    return pre.resize_size


def unique_paths(paths: Sequence[str]) -> list[str]:
    """Each path once, in order of first appearance (a balanced split lists some photos several times:
    they are decoded and stored once)."""
    return list(dict.fromkeys(paths))


def decoded_cache_key(paths: Sequence[str], side: int, interpolation: str) -> str:
    """Everything the stored pixels depend on, and nothing else."""
    payload = {
        "format": DECODED_FORMAT,
        "side": int(side),
        "interpolation": str(interpolation),
        "images": image_list_digest(paths),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


class _DecodeSquare(Dataset):
    """path -> (uint8 [3, side, side] or None, reason or "") in loader workers."""

    def __init__(self, paths: Sequence[str], side: int, interpolation: str):
        self.paths = list(paths)
        self.side = int(side)
        self.steps = v2.Compose(
            [
                v2.Resize(self.side, interpolation=InterpolationMode(interpolation), antialias=True),
                v2.CenterCrop(self.side),
                v2.PILToTensor(),
            ]
        )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, str]:
        path = self.paths[index]
        try:
            image = load_rgb(path, draft_size=(self.side, self.side))
            return self.steps(image).contiguous(), ""
        except Exception as error:  # noqa: BLE001 - whatever the decoder raises makes the file bad, not the build
            return None, unreadable(path, error).reason


class DecodedPhotos:
    """A split's decoded photos: the store (memory-mapped, pickles as its path) and the row of each path."""

    def __init__(self, store: Store, paths: Sequence[str]):
        self.store = store
        self.paths = unique_paths(paths)
        if len(self.paths) != store.rows:
            raise StoreError(store.path, f"{store.rows} rows for {len(self.paths)} photos")
        self.row_of = {path: row for row, path in enumerate(self.paths)}
        self.bad: dict[str, str] = dict(store.meta.get("bad") or {})

    @property
    def side(self) -> int:
        return int(self.store.meta["side"])

    def rows(self, paths: Sequence[str]) -> list[int]:
        return [self.row_of[path] for path in paths]


def _find(folder: Path, name: str) -> Store | None:
    """The complete entry in the cache folder or its temporary fallback; a damaged one is named, removed
    and counts as missing (rebuilt)."""
    for place in (folder, fallback_cache_dir(folder)):
        path = place / name
        try:
            store = open_store(path)
        except StoreError as error:
            log.warning(
                "decoded-photo cache entry %s is damaged (%s): decoding again", error.path, error.reason
            )
            remove_store(path)
            continue
        if store is not None:
            return store
    return None


def decoded_cache_folder(cache_dir: str | Path | None) -> Path:
    """``<cache_dir>/decoded``; without a cache dir, a per-user temporary folder (kept between runs)."""
    if cache_dir is None:
        return fallback_cache_dir(Path("data") / "cache") / FOLDER
    return Path(cache_dir).expanduser() / FOLDER


# A new decoded-photo cache may take at most this share of the free space of its disk; beyond it the
# tensor path decodes every epoch instead (Food-101's 68k training photos at 256 px are 13 GB).
MAX_SHARE_OF_FREE_DISK = 0.5


def decoded_bytes(count: int, side: int) -> int:
    """Bytes a decoded-photo cache of ``count`` photos at ``side`` px takes (uint8 RGB squares)."""
    return count * 3 * side * side


def fits_on_disk(count: int, side: int, cache_dir: str | Path | None) -> bool:
    """Whether a new cache of ``count`` photos at ``side`` px fits in :data:`MAX_SHARE_OF_FREE_DISK` of the
    free space where it would be written (the nearest existing folder above it)."""
    folder = decoded_cache_folder(cache_dir)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return True  # unknown: try, and let the store's writer name a full disk
    return decoded_bytes(count, side) <= MAX_SHARE_OF_FREE_DISK * free


def load_or_build_decoded(
    paths: Sequence[str],
    side: int,
    interpolation: str,
    cache_dir: str | Path | None,
    workers: int = 0,
    skip_bad_images: bool = False,
    on_bad: Callable[[BadImageError], None] | None = None,
    progress: bool = True,
    what: str = "photos",
) -> tuple[DecodedPhotos | None, bool]:
    """The decoded photos of ``paths`` (``what`` names them in messages) and whether they were decoded now
    (False: found in the cache); ``(None, False)`` when there is no cache of them and a new one would not
    fit on its disk (:func:`fits_on_disk`). A file that cannot be decoded is a :class:`BadImageError` naming it, or,
    with ``skip_bad_images``, a zero row marked bad (``on_bad`` is told, here and on every later hit)."""
    unique = unique_paths(paths)
    folder = decoded_cache_folder(cache_dir)
    name = f"{decoded_cache_key(unique, side, interpolation)}-{side}px"
    store = _find(folder, name)
    if store is not None:
        decoded = DecodedPhotos(store, unique)
        log.info("decoded-photo cache hit: %s (%s, %d photos at %d px)", store.path, what, store.rows, side)
        for path, reason in decoded.bad.items():
            if not skip_bad_images:
                raise BadImageError(path, reason)
            if on_bad is not None:
                on_bad(BadImageError(path, reason))
        return decoded, False
    if not fits_on_disk(len(unique), side, cache_dir):
        return None, False
    target = writable_cache_dir(folder, "decoded-photo cache") / name
    started = time.perf_counter()
    bad: dict[str, str] = {}
    loader = DataLoader(
        _DecodeSquare(unique, side, interpolation),
        batch_size=BUILD_BATCH,
        num_workers=workers,
        collate_fn=list,
    )
    zeros = torch.zeros(3, side, side, dtype=torch.uint8)
    meta = {"side": int(side), "interpolation": str(interpolation), "photos": len(unique)}
    with (
        StoreWriter(target, meta) as writer,
        tqdm(
            total=len(unique), desc=f"decoding {what} once", unit="img", disable=not progress, leave=False
        ) as bar,
    ):
        done = 0
        for batch in loader:
            for offset, (photo, reason) in enumerate(batch):
                if photo is None:
                    path = unique[done + offset]
                    if not skip_bad_images:
                        raise BadImageError(path, reason)
                    bad[path] = reason
                    if on_bad is not None:
                        on_bad(BadImageError(path, reason))
            photos = torch.stack([zeros if photo is None else photo for photo, _ in batch])
            ok = torch.tensor([photo is not None for photo, _ in batch], dtype=torch.uint8)
            writer.append(photos=photos, ok=ok)
            done += len(batch)
            bar.update(len(batch))
        writer.meta["bad"] = bad
        store = writer.commit()
    seconds = time.perf_counter() - started
    log.info(
        "decoded-photo cache: decoded %d %s once in %.1f s (%.0f photos/s) -> %s (%.0f MB)",
        len(unique),
        what,
        seconds,
        len(unique) / max(seconds, 1e-9),
        store.path,
        store.nbytes / 2**20,
    )
    return DecodedPhotos(store, unique), True

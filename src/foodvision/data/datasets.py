"""Map-style datasets over (path, label) lists, tolerant of bad files when asked.

:class:`ImageListDataset` decodes and transforms in loader workers (``data.pipeline=pil``). The tensor data
path's datasets leave that to the training device: :class:`EncodedFileDataset` only reads each file's bytes
(``data.pipeline=tensor``), :class:`DecodedPhotoDataset` only reads a photo's row of the decoded-photo cache
(``data.pipeline=decoded``); both collate into a :class:`RawBatch`, which ``FoodDataModule`` decodes and
transforms batch-wise once it is on the device (:mod:`foodvision.data.batched`).
"""

from __future__ import annotations

import fcntl
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, default_collate
from torchvision.io import read_file

from foodvision.data.images import BadImageError, load_rgb
from foodvision.data.splits import Sample
from foodvision.data.store import Store

log = logging.getLogger(__name__)


class ImageListDataset(Dataset):
    """Decodes each photo to RGB (JPEG draft mode: never decodes more pixels than needed).

    With ``skip_bad_images`` a file that cannot be decoded yields ``None`` (dropped by
    :func:`collate_skipping_none`) and its path is appended to ``bad_images_log``; without it,
    :class:`BadImageError` names the file. A file that changed after the up-front check (deleted, or
    overwritten with a corrupt file) is such a file too, not a crash. With ``item_seed`` a random transform draws the same result
    for an index every time (seeded from ``item_seed`` and the index), so an augmented view can be cached.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        transform: Callable[[Any], torch.Tensor],
        draft_size: int | None = None,
        skip_bad_images: bool = False,
        bad_images_log: str | Path | None = None,
        item_seed: int | None = None,
    ):
        self.samples = list(samples)
        self.transform = transform
        self.draft_size = draft_size
        self.skip_bad_images = skip_bad_images
        self.bad_images_log = Path(bad_images_log) if bad_images_log else None
        self.item_seed = item_seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        path, label = self.samples[index]
        draft = (self.draft_size, self.draft_size) if self.draft_size else None
        try:
            image = load_rgb(path, draft_size=draft)
        except Exception as error:  # noqa: BLE001 - whatever the decoder raises makes the file bad, not the run
            bad = unreadable(path, error)
            if not self.skip_bad_images:
                if bad is error:
                    raise
                raise bad from error
            self._record_bad(bad)
            return None
        if self.item_seed is None:
            return self.transform(image), label
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.item_seed * 1_000_003 + index) % 2**63)
            return self.transform(image), label

    def _record_bad(self, error: BadImageError) -> None:
        record_bad_image(self.bad_images_log, error)


def record_bad_image(bad_images_log: Path | None, error: BadImageError) -> None:
    """Warn about a file skipped under ``data.skip_bad_images`` and append it to the run's log."""
    log.warning("skipping %s (%s)", error.path, error.reason)
    if bad_images_log is None:
        return
    bad_images_log.parent.mkdir(parents=True, exist_ok=True)
    with bad_images_log.open("a") as handle:  # workers append concurrently
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.write(f"{error.path}\t{error.reason}\n")


def unreadable(path: str, error: Exception) -> BadImageError:
    """``error`` (from decoding ``path``) as the :class:`BadImageError` that names the file."""
    if isinstance(error, BadImageError):
        return error
    if isinstance(error, FileNotFoundError):
        return BadImageError(path, "file not found (deleted or moved after the image check?)")
    return BadImageError(path, f"{type(error).__name__}: {error}")


def collate_skipping_none(batch: list[Any]) -> Any:
    """Default collation without the samples a dataset could not read."""
    kept = [item for item in batch if item is not None]
    if not kept:
        return None
    return default_collate(kept)


def read_bad_images_log(path: str | Path) -> list[str]:
    """Distinct files listed in a bad-images log (a file is logged once per epoch it is met)."""
    path = Path(path)
    if not path.is_file():
        return []
    return sorted({line.split("\t", 1)[0] for line in path.read_text().splitlines() if line})


# ---- the tensor data path: workers read, the training device decodes and transforms -------------------
@dataclass
class RawBatch:
    """A batch as loader workers leave it: the files' bytes (``encoded``: all files end to end in one
    uint8 tensor, ``lengths`` bytes each: one shared-memory block per batch between processes, not one
    per file) or their decoded photos (``photos``: uint8 ``[B, 3, S, S]`` from the decoded-photo cache),
    with the class ``targets``, the photos' positions in their split (``indices``: what the augmentation
    draws are a function of), their paths (``names``: errors name the file) and whether the split is
    augmented (``train``)."""

    targets: torch.Tensor
    indices: torch.Tensor
    names: list[str]
    train: bool
    encoded: torch.Tensor | None = None
    lengths: torch.Tensor | None = None
    photos: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def payloads(self) -> list[torch.Tensor] | None:
        """Each file's bytes (1-D uint8 views of ``encoded``), or None for a batch of decoded photos."""
        if self.encoded is None or self.lengths is None:
            return None
        return list(torch.split(self.encoded, self.lengths.tolist()))

    def pin_memory(self) -> RawBatch:
        """Pinned photos (DataLoader ``pin_memory``): their copy to a GPU overlaps compute. The file bytes
        stay where they are: nvJPEG reads them from ordinary host memory."""
        photos = self.photos.pin_memory() if self.photos is not None else None
        return RawBatch(
            self.targets, self.indices, self.names, self.train, self.encoded, self.lengths, photos
        )


def _raw_batch(items: list[Any], train: bool, encoded: bool) -> RawBatch | None:
    kept = [item for item in items if item is not None]
    if not kept:
        return None
    data, labels, indices, names = zip(*kept, strict=True)
    content = (
        {"encoded": torch.cat(data), "lengths": torch.tensor([len(d) for d in data], dtype=torch.long)}
        if encoded
        else {"photos": torch.stack(data)}
    )
    return RawBatch(
        torch.tensor(labels, dtype=torch.long),
        torch.tensor(indices, dtype=torch.long),
        list(names),
        train,
        **content,
    )


class EncodedFileDataset(Dataset):
    """Each photo's file bytes (``torchvision.io.read_file``): the cheapest work a loader worker can do.
    A file that vanished or cannot be read is bad: with ``skip_bad_images`` it is logged and skipped, else
    a :class:`BadImageError` names it (decode failures are found, and treated the same, on the device)."""

    def __init__(
        self,
        samples: Sequence[Sample],
        train: bool = False,
        skip_bad_images: bool = False,
        bad_images_log: str | Path | None = None,
    ):
        self.samples = list(samples)
        self.train = train
        self.skip_bad_images = skip_bad_images
        self.bad_images_log = Path(bad_images_log) if bad_images_log else None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int, str] | None:
        path, label = self.samples[index]
        try:
            payload = read_file(path)
        except Exception as error:  # noqa: BLE001 - a file that cannot be read is a bad file
            bad = unreadable(path, error)
            if not self.skip_bad_images:
                raise bad from error
            record_bad_image(self.bad_images_log, bad)
            return None
        return payload, label, index, path

    def collate(self, items: list[Any]) -> RawBatch | None:
        return _raw_batch(items, self.train, encoded=True)


class DecodedPhotoDataset(Dataset):
    """Each photo's row of a decoded-photo cache (:mod:`foodvision.data.decoded`): a copy of that row of
    the memory-mapped store, nothing else in memory. ``rows[i]`` is the store row of ``samples[i]``; a
    row marked bad (the file could not be decoded when the cache was built) is skipped."""

    def __init__(self, store: Store, samples: Sequence[Sample], rows: Sequence[int], train: bool = False):
        if len(rows) != len(samples):
            raise ValueError(f"{len(rows)} rows for {len(samples)} samples")
        self.store = store
        self.samples = list(samples)
        self.rows = list(rows)
        self.train = train

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def row_bytes(self) -> int:
        return self.store.nbytes // max(1, self.store.rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int, str] | None:
        path, label = self.samples[index]
        row = self.rows[index]
        if not self.store.array("ok")[row]:
            return None
        return self.store.read("photos", [row])[0], label, index, path

    def collate(self, items: list[Any]) -> RawBatch | None:
        return _raw_batch(items, self.train, encoded=False)

"""Map-style datasets over (path, label) lists, tolerant of bad files when asked."""

from __future__ import annotations

import fcntl
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, default_collate

from foodvision.data.images import BadImageError, load_rgb
from foodvision.data.splits import Sample

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
        log.warning("skipping %s (%s)", error.path, error.reason)
        if self.bad_images_log is None:
            return
        self.bad_images_log.parent.mkdir(parents=True, exist_ok=True)
        with self.bad_images_log.open("a") as handle:  # workers append concurrently
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

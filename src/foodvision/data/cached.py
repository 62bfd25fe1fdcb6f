"""Cached backbone outputs of a split, served as explicit model inputs.

A batch of these is a mapping ``{"entry", "inputs", "targets"[, "mirrored"]}``: ``entry`` names the model's
entry point (``pooled`` or ``prefixK``, see ``ImageClassifier.forward_entry``), so the model never guesses
from a tensor's shape what it was given; ``mirrored`` (the same outputs of the mirrored photos) lets
validation on cached outputs apply test-time flip exactly as testing on images does.

The outputs live in memory-mapped stores (:mod:`foodvision.data.store`): a batch reads its own rows, sorted,
from the files (:meth:`CachedInputs.__getitems__`), so training never loads a split whole.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset, default_collate

from foodvision.data.store import Store


class StoredView(Dataset):
    """One cached view of a split: the ``features`` and ``labels`` fields of a :class:`Store`, read row
    by row or a sorted batch of rows at a time. Pickles as the store's path (see :class:`Store`)."""

    def __init__(self, store: Store):
        self.store = store

    def __len__(self) -> int:
        return len(self.store)

    @property
    def row_bytes(self) -> int:
        return self.store.nbytes // max(1, len(self.store))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = self.rows(np.array([index]))
        return inputs[0], targets[0]

    def rows(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``indices`` (sorted: the file is read in order)."""
        return self.store.read("features", indices), self.store.read("labels", indices)


View = StoredView | TensorDataset


def _rows(view: View, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(view, StoredView):
        return view.rows(indices)
    index = torch.from_numpy(indices)
    inputs, targets = view.tensors[:2]
    return inputs[index], targets[index]


def _row_bytes(view: View) -> int:
    if isinstance(view, StoredView):
        return view.row_bytes
    return sum(t[0].numel() * t.element_size() for t in view.tensors) if len(view) else 1


class CachedInputs(Dataset):
    """``views``: one or more cached views of the same samples (training draws one per sample and epoch,
    from torch's generator, which ``EpochSeed`` reseeds per epoch); ``mirrored``: the mirrored photos' view.
    Views are :class:`StoredView` (memory-mapped) or in-memory ``TensorDataset``s; both give the same
    batches."""

    def __init__(self, entry: str, views: Sequence[View], mirrored: View | None = None):
        if not views:
            raise ValueError("CachedInputs needs at least one view")
        lengths = {len(v) for v in views} | ({len(mirrored)} if mirrored is not None else set())
        if len(lengths) != 1:
            raise ValueError(f"every cached view needs the same samples, got lengths {sorted(lengths)}")
        self.entry = entry
        self.views = list(views)
        self.mirrored = mirrored

    def __len__(self) -> int:
        return len(self.views[0])

    @property
    def row_bytes(self) -> int:
        """Bytes one sample reads (every view, since a batch may draw from each): sizes the chunks of the
        shuffled order (:class:`foodvision.data.store.QuasiRandomSampler`)."""
        views = self.views + ([self.mirrored] if self.mirrored is not None else [])
        return sum(_row_bytes(v) for v in views)

    def _draw_views(self, count: int) -> list[int]:
        # One draw per sample, in the batch's order: the draws of `count` __getitem__ calls.
        if len(self.views) == 1:
            return [0] * count
        return [int(torch.randint(len(self.views), ())) for _ in range(count)]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        view = self.views[self._draw_views(1)[0]]
        inputs, targets = view[index]
        item = {"inputs": inputs, "targets": targets}
        if self.mirrored is not None:
            item["mirrored"] = self.mirrored[index][0]
        return item

    def __getitems__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """A whole batch (the DataLoader's fetcher calls this with a batch's indices): each view's rows are
        read in sorted order, then put back in the batch's order; equal to collating ``__getitem__``'s."""
        wanted = np.asarray(list(indices), dtype=np.int64)
        choice = np.asarray(self._draw_views(len(wanted)))
        batch: dict[str, torch.Tensor] = {}
        for number in np.unique(choice).tolist():
            positions = np.flatnonzero(choice == number)
            self._fill(batch, ("inputs", "targets"), self.views[number], wanted, positions, len(wanted))
        if self.mirrored is not None:
            self._fill(batch, ("mirrored", None), self.mirrored, wanted, np.arange(len(wanted)), len(wanted))
        return batch

    @staticmethod
    def _fill(
        batch: dict[str, torch.Tensor],
        keys: tuple[str, str | None],
        view: View,
        wanted: np.ndarray,
        positions: np.ndarray,
        size: int,
    ) -> None:
        order = np.argsort(wanted[positions], kind="stable")
        inputs, targets = _rows(view, wanted[positions][order])
        where = torch.from_numpy(positions[order])
        for key, values in zip(keys, (inputs, targets), strict=True):
            if key is None:
                continue
            if key not in batch:
                batch[key] = values.new_empty((size, *values.shape[1:]))
            batch[key][where] = values

    def collate(self, items: list[dict[str, torch.Tensor]] | Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """One batch (from :meth:`__getitems__`, or a list of items); inputs stored in float16 (compact train
        maps, see ``foodvision.callbacks.feature_cache.COMPACT_MAPS_DTYPE``) are served as float32, a batch
        at a time."""
        batch = dict(items) if isinstance(items, Mapping) else default_collate(items)
        for key in ("inputs", "mirrored"):
            if key in batch and batch[key].dtype == torch.float16:
                batch[key] = batch[key].float()
        batch["entry"] = self.entry
        return batch

"""Cached backbone outputs of a split, served as explicit model inputs.

A batch of these is a mapping ``{"entry", "inputs", "targets"[, "mirrored"]}``: ``entry`` names the model's
entry point (``pooled`` or ``prefixK``, see ``ImageClassifier.forward_entry``), so the model never guesses
from a tensor's shape what it was given; ``mirrored`` (the same outputs of the mirrored photos) lets
validation on cached outputs apply test-time flip exactly as testing on images does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, TensorDataset, default_collate


class CachedInputs(Dataset):
    """``views``: one or more cached views of the same samples (training draws one per sample and epoch,
    from torch's generator, which ``EpochSeed`` reseeds per epoch); ``mirrored``: the mirrored photos' view."""

    def __init__(self, entry: str, views: Sequence[TensorDataset], mirrored: TensorDataset | None = None):
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

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        view = self.views[int(torch.randint(len(self.views), ()))] if len(self.views) > 1 else self.views[0]
        inputs, targets = view[index]
        item = {"inputs": inputs, "targets": targets}
        if self.mirrored is not None:
            item["mirrored"] = self.mirrored[index][0]
        return item

    def collate(self, items: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        """One batch; inputs stored in float16 (compact train maps, see
        ``foodvision.callbacks.feature_cache.COMPACT_MAPS_DTYPE``) are served as float32, a batch at a time."""
        batch = default_collate(items)
        for key in ("inputs", "mirrored"):
            if key in batch and batch[key].dtype == torch.float16:
                batch[key] = batch[key].float()
        batch["entry"] = self.entry
        return batch

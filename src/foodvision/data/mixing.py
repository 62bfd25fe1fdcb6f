"""MixUp and CutMix of training batches: ``augment.mixup`` / ``augment.cutmix`` (Beta alphas; 0 = off), run by
torchvision's ``transforms.v2.MixUp`` / ``CutMix`` on whole batches, after collation (as torchvision's docs
recommend), in the main process (the draws come from torch's generator, which ``EpochSeed`` reseeds each
epoch: a resumed run mixes the batches the uninterrupted run mixed).

A mixed batch has soft targets (rows of class probabilities that sum to 1). The training loss takes them
as they are: ``cross_entropy`` with probability targets applies label smoothing and class weights too.
Training accuracy compares the prediction with the dominant label of each mixed sample (the argmax of its
target). Validation and testing never mix.

With both alphas set, each batch gets one of the two (``RandomChoice``). Images are mixed; batches of
cached backbone outputs (:class:`foodvision.data.cached.CachedInputs`) are not, unless
``augment.mix_features=true``: then pooled feature vectors get MixUp (CutMix has no meaning for a vector)
and cached prefix feature maps get either. Mixing images means they must reach the model, so with
``mix_features=false`` the training images count as augmented and the feature cache (``enabled: auto``)
stays off.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torchvision.transforms import v2

log = logging.getLogger(__name__)


def mixing_settings(augment: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``{"mixup", "cutmix", "features"}`` from an augment config, or None when both alphas are 0."""
    augment = dict(augment or {})
    mixup, cutmix = float(augment.get("mixup") or 0.0), float(augment.get("cutmix") or 0.0)
    for key, value in (("mixup", mixup), ("cutmix", cutmix)):
        if value < 0:
            raise ValueError(f"augment.{key} must be >= 0 (a Beta alpha; 0 = off), got {value!r}")
    if mixup == 0 and cutmix == 0:
        return None
    return {"mixup": mixup, "cutmix": cutmix, "features": bool(augment.get("mix_features", False))}


def mixes_images(augment: Mapping[str, Any] | None) -> bool:
    """Whether training images themselves are mixed (so cached features cannot stand in for them)."""
    settings = mixing_settings(augment)
    return settings is not None and not settings["features"]


class BatchMixer:
    """Mixes a training batch: an ``(images, targets)`` tuple, or a cached-inputs mapping (with ``features``)."""

    def __init__(self, num_classes: int, mixup: float = 0.0, cutmix: float = 0.0, features: bool = False):
        self.num_classes = int(num_classes)
        self.features = features
        self.mixup = v2.MixUp(alpha=mixup, num_classes=num_classes) if mixup > 0 else None
        cut = v2.CutMix(alpha=cutmix, num_classes=num_classes) if cutmix > 0 else None
        both = [t for t in (self.mixup, cut) if t is not None]
        self.spatial = both[0] if len(both) == 1 else v2.RandomChoice(both)

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any] | None, num_classes: int) -> BatchMixer | None:
        if not settings:
            return None
        return cls(
            num_classes,
            settings.get("mixup", 0.0),
            settings.get("cutmix", 0.0),
            settings.get("features", False),
        )

    def __call__(self, batch: Any) -> Any:
        if batch is None:
            return None
        if isinstance(batch, Mapping):
            return self._mix_cached(batch)
        images, targets = batch
        images, targets = self.spatial(images, targets)
        return images, targets

    def _mix_cached(self, batch: Mapping[str, Any]) -> Any:
        if not self.features:
            return batch
        inputs, targets = batch["inputs"], batch["targets"]
        if (
            inputs.ndim == 2
        ):  # pooled features: MixUp only, on (B, C, 1, 1) as torchvision wants a batch of maps
            if self.mixup is None:
                return batch
            mixed, targets = self.mixup(inputs[:, :, None, None], targets)
            mixed = mixed.flatten(1)
        else:
            mixed, targets = self.spatial(inputs, targets)
        return {**batch, "inputs": mixed, "targets": targets}


def hard_targets(targets: torch.Tensor) -> torch.Tensor:
    """Class indices for metrics: soft (mixed) targets by their dominant class, indices as they are."""
    return targets.argmax(dim=1) if targets.ndim > 1 else targets

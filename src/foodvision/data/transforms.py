"""Preprocessing (what a model expects) and train-only augmentation presets."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torchvision.transforms import InterpolationMode, v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """Resize, crop and normalisation of a model; saved in checkpoints so inference needs no config."""

    image_size: int = 224
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    interpolation: str = "bilinear"
    crop_pct: float = 1.0

    @property
    def resize_size(self) -> int:
        """Shorter side before the centre crop (timm's convention: image_size / crop_pct)."""
        return int(math.floor(self.image_size / self.crop_pct))

    @property
    def interpolation_mode(self) -> InterpolationMode:
        return InterpolationMode(self.interpolation)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Preprocessing:
        values = dict(values)
        values["mean"], values["std"] = tuple(values["mean"]), tuple(values["std"])
        return cls(**values)

    @classmethod
    def from_timm(cls, data_config: Mapping[str, Any], image_size: int | None = None) -> Preprocessing:
        """From ``timm.data.resolve_model_data_config``; ``image_size`` overrides the model's size."""
        size = int(image_size or data_config["input_size"][-1])
        return cls(
            image_size=size,
            mean=tuple(float(v) for v in data_config["mean"]),
            std=tuple(float(v) for v in data_config["std"]),
            interpolation=str(data_config.get("interpolation", "bicubic")),
            crop_pct=float(data_config.get("crop_pct", 0.875)),
        )

    def tensor_steps(self) -> list[Any]:
        return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)]

    def resize_crop(self) -> list[Any]:
        return [
            v2.Resize(self.resize_size, interpolation=self.interpolation_mode, antialias=True),
            v2.CenterCrop(self.image_size),
        ]

    def eval_transform(self) -> v2.Compose:
        """Deterministic: shorter side to ``resize_size``, centre crop, scale to 0-1, normalise."""
        return v2.Compose(self.resize_crop() + self.tensor_steps())


AUGMENT_PRESETS = ("none", "crop", "seed", "light", "randaugment")


def build_train_transform(pre: Preprocessing, augment: Mapping[str, Any] | None) -> v2.Compose:
    """Train-time transform for an augmentation preset (see ``conf/augment/``).

    ``none`` is exactly the eval transform, which is what lets a frozen backbone's features be
    cached. ``crop`` is a random resized crop and a horizontal flip (the views the feature cache can
    store, ``feature_cache.views``). ``seed`` mirrors the Keras reference (flip, rotation, zoom, translation); ``light`` adds
    colour jitter; ``randaugment`` uses TrivialAugment (or RandAugment) plus random erasing.
    """
    augment = dict(augment or {"name": "none"})
    name = augment.get("name", "none")
    if name not in AUGMENT_PRESETS:
        raise ValueError(f"unknown augment preset {name!r}; choose one of {AUGMENT_PRESETS}")
    if name == "none":
        return pre.eval_transform()
    interpolation = pre.interpolation_mode
    if name == "crop":
        crop = v2.RandomResizedCrop(
            pre.image_size, scale=(augment.get("min_scale", 0.35), 1.0), interpolation=interpolation
        )
        return v2.Compose([crop, v2.RandomHorizontalFlip(), *pre.tensor_steps()])
    if name == "randaugment":
        policy = (
            v2.RandAugment(num_ops=augment.get("num_ops", 2), magnitude=augment.get("magnitude", 9))
            if augment.get("policy", "trivial") == "rand"
            else v2.TrivialAugmentWide(interpolation=interpolation)
        )
        steps = [
            v2.RandomResizedCrop(
                pre.image_size, scale=(augment.get("min_scale", 0.35), 1.0), interpolation=interpolation
            ),
            v2.RandomHorizontalFlip(),
            policy,
            *pre.tensor_steps(),
            v2.RandomErasing(p=augment.get("erasing", 0.25)),
        ]
        return v2.Compose(steps)
    zoom, translate = float(augment.get("zoom", 0.2)), float(augment.get("translate", 0.2))
    steps = [*pre.resize_crop()]
    if augment.get("hflip", True):
        steps.append(v2.RandomHorizontalFlip())
    steps.append(
        v2.RandomAffine(
            degrees=float(augment.get("rotation", 36.0)),
            translate=(translate, translate),
            scale=(1 - zoom, 1 + zoom),
            interpolation=InterpolationMode.BILINEAR,
        )
    )
    if name == "light":
        steps.append(
            v2.ColorJitter(
                brightness=augment.get("brightness", 0.2), saturation=augment.get("saturation", 0.2)
            )
        )
    return v2.Compose(steps + pre.tensor_steps())

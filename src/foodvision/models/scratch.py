"""A from-scratch CNN built from config, as in the Keras baselines: conv blocks, then flatten or pool."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class ScratchCNN(nn.Module):
    """Conv(k) [+BN] + ReLU + pool per width; ``global_pool`` chooses average pooling over flatten.

    ``num_features`` is the size of the vector handed to the head, worked out with a dry run at
    ``image_size`` (flatten depends on it).
    """

    def __init__(
        self,
        widths: Sequence[int] = (16, 32, 64, 128),
        kernel_size: int = 3,
        pool: str = "max",
        batch_norm: bool = False,
        global_pool: bool = False,
        image_size: int = 224,
        in_channels: int = 3,
    ):
        super().__init__()
        if pool not in ("max", "avg"):
            raise ValueError(f"pool must be 'max' or 'avg', got {pool!r}")
        layers: list[nn.Module] = []
        channels = in_channels
        for width in widths:
            layers.append(
                nn.Conv2d(channels, width, kernel_size, padding=kernel_size // 2, bias=not batch_norm)
            )
            if batch_norm:
                layers.append(nn.BatchNorm2d(width))
            layers += [nn.ReLU(inplace=True), nn.MaxPool2d(2) if pool == "max" else nn.AvgPool2d(2)]
            channels = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()) if global_pool else nn.Flatten()
        with torch.no_grad():
            self.num_features = int(
                self.forward(torch.zeros(1, in_channels, image_size, image_size)).shape[1]
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features(x))

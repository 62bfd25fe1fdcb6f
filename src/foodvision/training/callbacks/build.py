"""The run's callbacks, built from ``cfg.callbacks`` (conf/callbacks/): the one place that turns that group
into objects, for training and for the tuners' short trainers alike."""

from __future__ import annotations

import hydra
import lightning as L
from omegaconf import DictConfig


def build_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """Every ``callbacks.<name>`` with a ``_target_`` (conf/callbacks/*.yaml), in config order; a target
    may build nothing (``callbacks.ema.enabled=false``)."""
    built = [
        hydra.utils.instantiate(c, _convert_="all")
        for c in (cfg.get("callbacks") or {}).values()
        if c and "_target_" in c
    ]
    return [c for c in built if c is not None]

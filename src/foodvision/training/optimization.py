"""A run's optimizer and learning-rate scheduler from their config groups (conf/optimizer/, conf/scheduler/).

Each group names its class with Hydra's ``_target_`` (``_partial_: true``: the parameter groups and the
optimizer are known only when fitting) beside foodvision's own keys, which are read here and never passed to
the class: ``name`` (the label runs tables, sweeps and ``ckpt_path=last`` compare), the optimizer's
``backbone_lr_factor``, the scheduler's ``interval``/``frequency``/``monitor`` (Lightning's). Settings written
before ``_target_`` existed (old checkpoints' hyperparameters, recorded runs, code that passes
``{"name": "adamw", ...}``) name the class by ``name`` alone and are read as the old dispatch read them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import hydra
import torch
from hydra.errors import InstantiationException

from foodvision.config.check import ConfigError

log = logging.getLogger(__name__)

# name -> the class conf/optimizer/<name>.yaml names; a `name` among these must go with its own class
OPTIMIZERS = {"adam": "torch.optim.Adam", "adamw": "torch.optim.AdamW", "sgd": "torch.optim.SGD"}
SCHEDULERS = {
    "cosine": "foodvision.training.schedules.cosine_annealing",
    "stage2": "foodvision.training.schedules.Stage2Schedule",
    "plateau": "torch.optim.lr_scheduler.ReduceLROnPlateau",
}
NO_SCHEDULER = "none"
OPTIMIZER_KEYS = ("name", "backbone_lr_factor")  # foodvision's keys of an optimizer config
LIGHTNING_SCHEDULER_KEYS = ("interval", "frequency", "monitor")  # Lightning's lr_scheduler dict
SCHEDULER_KEYS = ("name", *LIGHTNING_SCHEDULER_KEYS)
# What the name-only dispatch used: defaults, and for schedulers the only keys it read (others were ignored).
LEGACY_OPTIMIZER_DEFAULTS: dict[str, dict[str, Any]] = {
    "adam": {"lr": 1e-3, "weight_decay": 0.0},
    "adamw": {"lr": 1e-3, "weight_decay": 0.0},
    "sgd": {"lr": 1e-3, "weight_decay": 0.0, "momentum": 0.9},
}
LEGACY_SCHEDULER_KEYS: dict[str, dict[str, Any]] = {
    "cosine": {"min_lr": 0.0},
    "stage2": {"warmup_epochs": 0.0, "decay": "cosine"},
    "plateau": {"factor": 0.5, "patience": 2},
}
LEGACY_SCHEDULER_FIXED: dict[str, dict[str, Any]] = {
    "cosine": {"interval": "epoch"},
    "stage2": {"interval": "step"},
    "plateau": {"mode": "min", "monitor": "val/loss", "interval": "epoch"},
}


def _legacy_switch(group: str, settings: dict[str, Any], known: Mapping[str, str]) -> dict[str, Any] | None:
    """``<group>.name=<other preset>`` on top of a shipped preset (the spelling that switched the class
    before ``_target_``): that preset's class, with a one-line notice; None when the name agrees."""
    name, target = settings.get("name"), settings.get("_target_")
    if name not in known or known[name] == target:
        return None
    if target not in known.values():  # a class of the user's own with a shipped preset's label
        raise ConfigError(
            f"{group}.name={name!r} is the label of {known[name]}, but {group}._target_ is {target!r}: choose "
            f"the {group} with `{group}={name}` (conf/{group}/{name}.yaml), or give your own "
            f"{group}._target_ a {group}.name of its own"
        )
    log.warning("%s.name=%s switches the class as before; write %s=%s from now on", group, name, group, name)
    return {k: v for k, v in settings.items() if k not in ("_target_", "_partial_")}


def optimizer_settings(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """The optimizer config with its ``_target_``: a name-only one (``{"name": "sgd", ...}``, the default
    ``adamw``) gets its class and the old dispatch's defaults. A ConfigError for an unknown name or a name
    that contradicts the ``_target_``."""
    settings = dict(config or {})
    target = settings.get("_target_")
    if target is None:
        name = str(settings.get("name") or "adamw").lower()
        if name not in OPTIMIZERS:
            raise ConfigError(
                f"optimizer.name must be {', '.join(OPTIMIZERS)} (or name a class with optimizer._target_), "
                f"got {name!r}"
            )
        return {"_target_": OPTIMIZERS[name], **LEGACY_OPTIMIZER_DEFAULTS[name], **settings, "name": name}
    legacy = _legacy_switch("optimizer", settings, OPTIMIZERS)
    if legacy is not None:
        name = legacy["name"]
        own = {k: v for k, v in legacy.items() if k in LEGACY_OPTIMIZER_DEFAULTS[name] or k in OPTIMIZER_KEYS}
        return {"_target_": OPTIMIZERS[name], **LEGACY_OPTIMIZER_DEFAULTS[name], **own}
    return settings


def scheduler_settings(config: Mapping[str, Any] | None, epochs: int) -> dict[str, Any] | None:
    """The scheduler config with its ``_target_``, or None for no scheduler (``name: none``, or nothing).
    ``epochs``: the run's, for a cosine schedule that does not say (name-only settings, ``epochs: null``)."""
    settings = dict(config or {})
    target = settings.get("_target_")
    if target is None:
        name = settings.get("name", NO_SCHEDULER)
        if name in (None, NO_SCHEDULER):
            return None
        if name not in SCHEDULERS:
            raise ConfigError(
                f"scheduler.name must be {NO_SCHEDULER}, {', '.join(SCHEDULERS)} (or name a class with "
                f"scheduler._target_), got {name!r}"
            )
        kwargs = {key: settings.get(key, default) for key, default in LEGACY_SCHEDULER_KEYS[name].items()}
        settings = {"_target_": SCHEDULERS[name], "name": name, **kwargs, **LEGACY_SCHEDULER_FIXED[name]}
    legacy = _legacy_switch("scheduler", settings, SCHEDULERS)
    if legacy is not None:
        return scheduler_settings({"name": legacy["name"], **legacy}, epochs)
    if settings["_target_"] == SCHEDULERS["cosine"] and settings.get("epochs") is None:
        settings["epochs"] = epochs
    return settings


def _instantiate(group: str, settings: Mapping[str, Any], skip: tuple[str, ...], argument: Any) -> Any:
    """``instantiate(settings less skip)(argument)``, with an error naming the group's key."""
    kwargs = {key: value for key, value in settings.items() if key not in skip}
    # the argument is passed here, not merged into the config; plain lists (betas) so checkpoints stay data
    kwargs.update(_partial_=True, _convert_="all")
    try:
        factory = hydra.utils.instantiate(kwargs)
    except InstantiationException as error:
        raise ConfigError(f"{group}._target_={settings['_target_']!r}: {error}") from None
    try:
        return factory(argument)
    except (TypeError, ValueError) as error:
        raise ConfigError(
            f"{group}: {settings['_target_']} does not accept these settings: {error}"
        ) from None


def build_optimizer(config: Mapping[str, Any] | None, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """The configured optimizer over ``groups`` (each with its own ``lr``)."""
    settings = optimizer_settings(config)
    return _instantiate("optimizer", settings, OPTIMIZER_KEYS, groups)


def build_scheduler(
    config: Mapping[str, Any] | None, optimizer: torch.optim.Optimizer, epochs: int
) -> dict[str, Any] | None:
    """Lightning's lr_scheduler dict for the configured scheduler (None: none), stepped per ``interval``
    (default: epoch)."""
    settings = scheduler_settings(config, epochs)
    if settings is None:
        return None
    scheduler = _instantiate("scheduler", settings, SCHEDULER_KEYS, optimizer)
    lightning = {key: settings[key] for key in LIGHTNING_SCHEDULER_KEYS if settings.get(key) is not None}
    return {"scheduler": scheduler, "interval": "epoch", **lightning}

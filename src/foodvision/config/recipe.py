"""What a run's config trained, in one summary: the training run's hyperparameters, ``compare.py``'s
leaderboard and a sweep's summary all describe runs with it."""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

NO_FREEZING = "all (no freezing)"
FROZEN = "none"  # callbacks.finetune.unfreeze: stage 2 unfreezes nothing (feature extraction)
FROZEN_SPELLINGS = ("none", "null")  # any case, and YAML's null and the number 0: one meaning


def normalise_unfreeze(value: Any) -> str | int:
    """``callbacks.finetune.unfreeze`` in one form: ``"none"`` (also null, 0, "None"), ``"all"``, a count of
    top blocks (an int >= 1, also as text) or a block name; a ValueError for a bool or a negative or
    fractional number. Every reader of the key (config check, callback, summaries) goes through it."""
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(
            f"callbacks.finetune.unfreeze={value!r}: use none, all, a number of top blocks or a block name"
        )
    text = "none" if value is None else str(int(value) if isinstance(value, float) else value).strip()
    if text.lower() in FROZEN_SPELLINGS:
        return FROZEN
    if text.lower() == "all":
        return "all"
    if text.lstrip("-").isdigit():
        count = int(text)
        if count < 0:
            raise ValueError(f"callbacks.finetune.unfreeze={value!r}: a number of top blocks must be >= 0")
        return count or FROZEN
    return text


def _get(config: Any, key: str, default: Any = None) -> Any:
    if config is None:
        return default
    value = OmegaConf.select(config, key, default=default, throw_on_missing=False)
    return OmegaConf.to_container(value, resolve=False) if OmegaConf.is_config(value) else value


def model_label(config: Any) -> str | None:
    """``model.name``, with the conv widths for scratch CNNs (``scratch_cnn[16, 32, 64, 128]``)."""
    name, widths = _get(config, "model.name"), _get(config, "model.scratch.widths")
    if _get(config, "model.kind") == "scratch" and widths:
        return f"{name}{list(widths)}"
    return name


def finetune_settings(config: Any) -> dict[str, Any] | None:
    """The fine-tuning callback's options, or None when the run had none (a scratch CNN). Configs of runs
    from before callbacks were configured (a top-level ``finetune`` with ``enabled``) are read too."""
    settings = _get(config, "callbacks.finetune")
    if isinstance(settings, dict) and "_target_" in settings:
        return settings
    legacy = _get(config, "finetune")
    if isinstance(legacy, dict) and legacy.get("enabled"):
        return legacy
    return None


def recipe_summary(config: Any) -> dict[str, Any]:
    """model, image size, learning rate, epochs, augmentation and what stage 2 unfreezes."""
    finetune = finetune_settings(config)
    return {
        "model": model_label(config),
        "image_size": _get(config, "data.image_size"),
        "lr": _get(config, "optimizer.lr"),
        "epochs": _get(config, "trainer.max_epochs"),
        "augment": _get(config, "augment.name", "none"),
        "unfreeze": _unfreeze_label(finetune.get("unfreeze")) if finetune else NO_FREEZING,
    }


def _unfreeze_label(value: Any) -> str:
    """How a summary shows ``unfreeze``: normalised (``none`` for null, 0 or none), else as written."""
    try:
        return str(normalise_unfreeze(value))
    except ValueError:  # a stored config of a run that this version would refuse: shown as it was
        return str(value)

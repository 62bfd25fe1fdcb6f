"""Config values checked when a command starts, with errors that name the key and what it accepts.

Without this, ``trainer.max_epochs=0`` "trained" and wrote metrics of an untrained model, a negative image
size failed at the first batch in torch's words, and ``callbacks.finetune.stage1_epochs >= trainer.max_epochs``
silently never reached stage 2.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, OmegaConf

from foodvision.config.recipe import FROZEN, normalise_unfreeze
from foodvision.errors import ToolError


class ConfigError(ToolError):
    """A config value outside what it accepts; the message names the key."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


Rule = tuple[str, Callable[[Any], bool], str, bool]  # key, check, what is accepted, null allowed

TRAIN_RULES: tuple[Rule, ...] = (
    # numpy's generator (seed_everything, the splits) takes 0..2**32-1; a negative seed failed in its words
    ("seed", lambda v: _is_int(v) and 0 <= v <= 2**32 - 1, "an integer from 0 to 2**32-1", False),
    ("trainer.max_epochs", lambda v: _is_int(v) and v >= 1, "an integer >= 1", False),
    ("data.image_size", lambda v: _is_int(v) and v >= 16, "an integer >= 16 (pixels)", False),
    ("data.batch_size", lambda v: _is_int(v) and v >= 1, "an integer >= 1", False),
    ("data.eval_batch_size", lambda v: _is_int(v) and v >= 1, "an integer >= 1, or null", True),
    ("data.num_workers", lambda v: _is_int(v) and v >= 0, "an integer >= 0, or null (half the cores)", True),
    ("data.max_per_class.train", lambda v: _is_int(v) and v >= 1, "an integer >= 1, or null (no cap)", True),
    ("data.max_per_class.val", lambda v: _is_int(v) and v >= 1, "an integer >= 1, or null (no cap)", True),
    ("data.max_per_class.test", lambda v: _is_int(v) and v >= 1, "an integer >= 1, or null (no cap)", True),
    ("data.val_fraction", lambda v: _number(v) and 0 < v < 1, "a fraction between 0 and 1", True),
    ("data.pipeline", lambda v: v in ("auto", "pil", "tensor", "decoded"), "auto|pil|tensor|decoded", False),
    ("optimizer.lr", lambda v: _number(v) and v > 0, "a number > 0", False),
    ("optimizer.weight_decay", lambda v: _number(v) and v >= 0, "a number >= 0", True),
    ("label_smoothing", lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)", True),
    ("model.head.dropout", lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)", True),
    ("optimizer.backbone_lr_factor", lambda v: _number(v) and v > 0, "a number > 0", True),
    ("callbacks.finetune.stage1_epochs", lambda v: _is_int(v) and v >= 0, "an integer >= 0, or null", True),
    ("callbacks.finetune.patience", lambda v: _is_int(v) and v >= 1, "an integer >= 1, or null", True),
    ("scheduler.warmup_epochs", lambda v: _number(v) and v >= 0, "a number >= 0", True),
    (
        "callbacks.finetune.stage1_share",
        lambda v: _number(v) and 0 < v < 1,
        "a number in (0, 1), or null",
        True,
    ),
    ("callbacks.ema.decay", lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)", True),
    ("augment.mixup", lambda v: _number(v) and v >= 0, "a number >= 0 (a Beta alpha; 0 = off)", True),
    ("augment.cutmix", lambda v: _number(v) and v >= 0, "a number >= 0 (a Beta alpha; 0 = off)", True),
)

_ABSENT = object()


def check_values(cfg: DictConfig, rules: tuple[Rule, ...]) -> None:
    """Every rule whose key is present in ``cfg``; one error listing all that fail."""
    problems = []
    for key, check, accepted, nullable in rules:
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is _ABSENT or (value is None and nullable):
            continue
        if value is None or not check(value):
            problems.append(f"{key}={value!r} (must be {accepted})")
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))


def check_train_config(cfg: DictConfig) -> None:
    """What ``train.py`` refuses before doing any work."""
    check_values(cfg, TRAIN_RULES)
    finetune = OmegaConf.select(cfg, "callbacks.finetune", default=None) or {}
    if finetune and OmegaConf.select(cfg, "model.kind", default=None) == "scratch":
        raise ConfigError(
            f"callbacks.finetune freezes a pretrained backbone, but model.name={cfg.model.get('name')} is a "
            "scratch CNN with nothing pretrained to freeze. Train it with its recipe "
            "(e.g. experiment=scratch_baseline), or drop the callback: callbacks.finetune=null"
        )
    quick = bool(OmegaConf.select(cfg, "trainer.fast_dev_run", default=False))  # one batch of each stage
    try:  # none, null and 0 mean the same (one normalising function), anything unknown is named here
        unfreeze = normalise_unfreeze(finetune.get("unfreeze")) if finetune else FROZEN
    except ValueError as error:
        raise ConfigError(f"invalid config: {error}") from None
    if (
        unfreeze != FROZEN
        and finetune.get("patience") is None  # with patience, stage 1 may end earlier
        and not quick
    ):
        stage1, epochs = finetune.get("stage1_epochs"), cfg.trainer.max_epochs
        if stage1 is not None and stage1 >= epochs:
            raise ConfigError(
                f"callbacks.finetune.stage1_epochs={stage1} >= trainer.max_epochs={epochs}: stage 2 "
                f"(callbacks.finetune.unfreeze={finetune.get('unfreeze')}) would never start. Set "
                f"trainer.max_epochs above {stage1}, lower callbacks.finetune.stage1_epochs, or set "
                "callbacks.finetune.unfreeze=none for a frozen backbone only"
            )

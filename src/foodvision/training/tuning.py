"""``python train.py tune=lr_find|batch_size``: Lightning's learning-rate finder and batch-size finder, run on
what the recipe really trains.

The learning-rate finder (Lightning's ``LearningRateFinder``, the callback behind ``Tuner.lr_find``) runs in
a throw-away trainer whose callbacks are the run's own fine-tuning and feature-cache callbacks, placed
*before* the finder: the backbone is frozen as in stage 1 and the head trains on cached pooled features, so
the sweep takes seconds (``Tuner.lr_find`` puts its finder first, which would sweep the head on images
through the frozen backbone). The features it caches are the ones the training run then finds on disk.

How the suggestion is chosen (:func:`suggest_lr`): Lightning records an exponential moving average of the
loss (beta 0.98, a lag of up to ~50 steps: a 100-step sweep's curve is shifted to higher rates) and picks its
steepest point, one noisy derivative (fastai's ``lr_find`` has the same instability, fastai #3295/#3658).
Here the per-step losses are recovered exactly from that average, smoothed without lag (a 5-point running
median against single-step spikes, then Savitzky-Golay over a fifth of the sweep, quadratic), cut where
the smoothed loss has clearly turned up (:func:`divergence_index`: risen from its lowest value so far by a
quarter of the descent made), and the suggestion is the rate of steepest descent of the smoothed loss per
decade of learning rate before its lowest point.

The batch-size finder (``Tuner.scale_batch_size``) tries growing batches of the most memory-hungry step,
stage 2 on images (the unfrozen blocks train, no cache), until the GPU runs out of memory. On a CPU memory
is not what limits a batch (it would grow until RAM is full or the trial limit; larger batches are not
faster per image there and change the optimisation), so there it is refused unless ``tune.allow_cpu=true``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import numpy as np
from omegaconf import DictConfig, OmegaConf, open_dict

from foodvision.atomic import write_json, write_with
from foodvision.config.check import ConfigError
from foodvision.training.callbacks.build import build_callbacks

log = logging.getLogger(__name__)

TUNERS = ("none", "lr_find", "batch_size")
LIGHTNING_LOSS_BETA = 0.98  # lightning.pytorch.tuner.lr_finder._LRCallback's smoothing


def tune_name(cfg: DictConfig) -> str:
    name = str(OmegaConf.select(cfg, "tune.name", default="none") or "none")
    if name not in TUNERS:
        raise ConfigError(f"tune={name}: choose one of {', '.join(TUNERS)} (conf/tune/)")
    return name


# ---- the suggestion ------------------------------------------------------------------------------------
def raw_losses(smoothed: list[float], beta: float = LIGHTNING_LOSS_BETA, start_step: int = 0) -> np.ndarray:
    """Undo Lightning's bias-corrected moving average (``avg = beta*avg + (1-beta)*loss``, recorded as
    ``avg / (1 - beta**(global_step+1))``, global_step counted after the step): the per-step losses. NaN
    entries (a skipped step) leave the average unchanged, as they do in Lightning."""
    losses = np.full(len(smoothed), np.nan)
    average, step = 0.0, start_step
    for i, value in enumerate(smoothed):
        if not math.isfinite(value):
            continue
        step += 1
        current = value * (1 - beta ** (step + 1))
        losses[i] = (current - beta * average) / (1 - beta)
        average = current
    return losses


def smooth(values: np.ndarray, window_fraction: float = 0.2) -> np.ndarray:
    """A 5-point running median (single-step spikes of a diverging sweep removed), then Savitzky-Golay
    smoothing (quadratic) over an odd window of ``window_fraction`` of the points: both centred, so, unlike
    a moving average, they do not shift the curve."""
    from scipy.signal import medfilt, savgol_filter

    count = len(values)
    if count < 5:
        return values.copy()
    odd = count if count % 2 else count - 1
    window = min(max(5, int(count * window_fraction) | 1), odd)
    return savgol_filter(medfilt(values, 5), window, polyorder=2, mode="interp")


def divergence_index(curve: np.ndarray) -> int:
    """The first point where the smoothed loss has clearly turned up: risen above its lowest value so far
    by a quarter of the descent made until then (and by 10 % of that lowest value); ``len(curve)`` if never."""
    lowest = np.minimum.accumulate(curve)
    rise = curve - lowest
    risen = np.nonzero(rise > np.maximum(0.25 * (curve[0] - lowest), 0.1 * np.abs(lowest)))[0]
    return int(risen[0]) if len(risen) else len(curve)


def suggest_lr(lrs: list[float], smoothed_losses: list[float], skip_begin: int = 3) -> dict[str, Any]:
    """The suggestion and the curves behind it (see the module docstring): ``suggested_lr``, its index,
    ``lowest_loss_lr`` (the smoothed loss's minimum before divergence), ``divergence_lr`` (where it has
    clearly turned up, :func:`divergence_index`; None if never), and the raw and smoothed losses."""
    lr = np.asarray(lrs, dtype=float)
    raw = raw_losses(list(smoothed_losses))
    keep = np.isfinite(raw) & np.isfinite(lr) & (lr > 0)
    lr, raw = lr[keep], raw[keep]
    if len(lr) < 5:
        raise ConfigError(
            f"the learning-rate finder recorded only {len(lr)} steps: raise tune.num_training or use more data"
        )
    curve = smooth(raw)
    log_lr = np.log10(lr)
    diverged = divergence_index(curve)
    bottom = int(np.argmin(curve[: max(1, diverged)]))
    start = min(skip_begin, max(0, bottom - 2))
    slope = np.gradient(curve, log_lr)
    end = max(bottom, start + 1)
    best = start + int(np.argmin(slope[start:end]))
    return {
        "suggested_lr": float(lr[best]),
        "suggested_index": best,
        "lowest_loss_lr": float(lr[bottom]),
        "divergence_lr": float(lr[diverged]) if diverged < len(lr) else None,
        "lr": lr.tolist(),
        "loss": raw.tolist(),
        "smoothed_loss": curve.tolist(),
        "method": "steepest descent of the smoothed per-step loss (running median, Savitzky-Golay) before its "
        "minimum, the curve cut where it diverges",
    }


def plot_lr_curve(result: dict[str, Any], path: Path) -> None:
    """``lr_find.png``: per-step and smoothed loss against the learning rate (log scale), suggestion marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    axis.plot(result["lr"], result["loss"], color="0.7", linewidth=1, label="loss per step")
    axis.plot(result["lr"], result["smoothed_loss"], color="C0", linewidth=2, label="smoothed")
    index = result["suggested_index"]
    axis.plot(
        [result["suggested_lr"]],
        [result["smoothed_loss"][index]],
        "o",
        color="C3",
        markersize=9,
        label=f"suggested lr {result['suggested_lr']:.2e}",
    )
    axis.axvline(result["lowest_loss_lr"], color="0.5", linestyle=":", label="lowest loss")
    if result["divergence_lr"] is not None:
        axis.axvline(result["divergence_lr"], color="C3", linestyle=":", label="diverging")
    before = result["lr"].index(result["lowest_loss_lr"]) + 1
    low = min(result["smoothed_loss"])
    high = max(result["smoothed_loss"][:before] + result["loss"][:before])
    axis.set_ylim(low - 0.1 * (high - low), high + 0.3 * (high - low))  # divergence would flatten the rest
    axis.set_xscale("log")
    axis.set_xlabel("learning rate")
    axis.set_ylabel("training loss")
    axis.set_title(f"learning-rate finder ({result['what']})")
    axis.legend()
    figure.tight_layout()
    write_with(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110))
    plt.close(figure)


# ---- running the finders -------------------------------------------------------------------------------
def _tuning_trainer(cfg: DictConfig, run_dir: Path, extra: list[L.Callback], stage: int) -> L.Trainer:
    """A trainer like the run's, with only the callbacks that decide what trains (fine-tuning, feature cache,
    epoch seed) and no logger or checkpoints; ``stage`` 1: stage 1 throughout; 2: stage 2 from the start."""
    every = OmegaConf.to_container(cfg.get("callbacks") or {}, resolve=True)
    callbacks_cfg = OmegaConf.create(
        {k: v for k, v in every.items() if k in ("finetune", "feature_cache") and v}
    )
    if "finetune" in callbacks_cfg and callbacks_cfg.finetune:
        callbacks_cfg.finetune.patience = None
        callbacks_cfg.finetune.stage1_epochs = 10**6 if stage == 1 else 0
        if "stage1_share" in callbacks_cfg.finetune:
            callbacks_cfg.finetune.stage1_share = None
    if stage == 2 and "feature_cache" in callbacks_cfg and callbacks_cfg.feature_cache:
        callbacks_cfg.feature_cache.enabled = False  # the batch-size search measures the step on images
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    for key in ("max_time", "max_steps", "callbacks", "logger", "default_root_dir"):
        trainer_cfg.pop(key, None)
    trainer_cfg.update(
        max_epochs=10**6,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    return hydra.utils.instantiate(
        trainer_cfg,
        callbacks=[*build_callbacks(OmegaConf.create({"callbacks": callbacks_cfg})), *extra],
        logger=False,
        default_root_dir=str(run_dir),
    )


def _finder_class() -> type:
    from lightning.pytorch.callbacks import LearningRateFinder

    class AfterCacheLRFinder(LearningRateFinder):
        """Lightning's finder, started at ``on_train_start`` instead of ``on_fit_start``: Lightning runs tuner
        callbacks first, and the feature cache's ``on_fit_start`` must have put the cached features in place
        (the loaders are built between the two hooks)."""

        def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            return

        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            # The sweep drives the loss to divergence on purpose: the module's non-finite-loss guard (which
            # ends a training run) is off meanwhile; Lightning's finder stops on the diverging loss itself.
            guarded = getattr(pl_module, "stop_on_divergence", False)
            pl_module.stop_on_divergence = False
            try:
                self.lr_find(trainer, pl_module)
            finally:
                pl_module.stop_on_divergence = guarded

    return AfterCacheLRFinder


def find_lr(cfg: DictConfig, module: L.LightningModule, datamodule: Any, run_dir: Path) -> dict[str, Any]:
    """Sweep the learning rate of stage 1 (the head on the frozen backbone, on cached features where the
    recipe caches them); write ``lr_find.json`` and ``lr_find.png`` in ``run_dir``; the result."""
    tune = cfg.tune
    stage = int(tune.get("stage", 1))
    if stage != 1:
        raise ConfigError(f"tune.stage={stage}: the learning-rate finder sweeps stage 1 (the head) only")
    min_lr, max_lr = float(tune.min_lr), float(tune.max_lr)
    if not 0 < min_lr < max_lr:
        raise ConfigError(f"tune.min_lr={min_lr} and tune.max_lr={max_lr}: need 0 < min_lr < max_lr")
    finder = _finder_class()(
        min_lr=min_lr,
        max_lr=max_lr,
        num_training_steps=int(tune.num_training),
        mode="exponential",
        early_stop_threshold=tune.get("early_stop_threshold"),
        update_attr=False,
    )
    finder._early_exit = True  # as Tuner.lr_find does: stop the fit once the sweep is done
    trainer = _tuning_trainer(cfg, run_dir, [finder], stage=1)
    trainer.fit(module, datamodule=datamodule)
    cached = datamodule.serves_cached("train")
    for split in ("train", "val"):  # the run's own feature cache decides again what it serves
        datamodule.use_cached(split, None)
    if finder.optimal_lr is None:
        raise ConfigError("the learning-rate finder did not run (trainer.fast_dev_run is on?)")
    recorded = finder.optimal_lr.results
    result = suggest_lr(recorded["lr"], recorded["loss"])
    result.update(
        what="stage 1: the head" + (" on cached features" if cached else " on images"),
        min_lr=min_lr,
        max_lr=max_lr,
        steps=len(result["lr"]),
        lightning_suggestion=finder.optimal_lr.suggestion(),
        configured_lr=float(cfg.optimizer.lr),
    )
    write_json(run_dir / "lr_find.json", result)
    plot_lr_curve(result, run_dir / "lr_find.png")
    print(
        f"lr finder ({result['what']}, {result['steps']} steps from {min_lr:g} to {max_lr:g}): "
        f"suggested optimizer.lr={result['suggested_lr']:.3g} (lowest loss at {result['lowest_loss_lr']:.3g}; "
        f"configured {result['configured_lr']:g})\n  curve: {run_dir / 'lr_find.png'}",
        flush=True,
    )
    return result


def find_batch_size(
    cfg: DictConfig, module: L.LightningModule, datamodule: Any, run_dir: Path
) -> dict[str, Any]:
    """The largest batch of the stage-2 training step on images that fits the accelerator's memory
    (Lightning's ``Tuner.scale_batch_size``); refused on a CPU unless ``tune.allow_cpu``."""
    from lightning.pytorch.tuner import Tuner

    tune = cfg.tune
    accelerator = str(cfg.trainer.accelerator)
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not _cuda())
    if on_cpu and not tune.get("allow_cpu", False):
        raise ConfigError(
            "tune=batch_size looks for the largest batch that fits the GPU's memory; on a CPU memory is not "
            "the limit (it would grow the batch until RAM runs out, no faster per image): set "
            "data.batch_size yourself, or tune.allow_cpu=true to run the search anyway (up to tune.max_val)"
        )
    trainer = _tuning_trainer(cfg, run_dir, [], stage=2)
    found = Tuner(trainer).scale_batch_size(
        module,
        datamodule=datamodule,
        mode=str(tune.mode),
        steps_per_trial=int(tune.steps_per_trial),
        init_val=int(tune.get("init_val") or cfg.data.batch_size),
        max_trials=int(tune.max_trials),
        max_val=int(tune.max_val),
    )
    for split in ("train", "val"):
        datamodule.use_cached(split, None)
    result = {"batch_size": int(found or cfg.data.batch_size), "searched_on": "stage 2 on images"}
    write_json(run_dir / "batch_size.json", result)
    print(
        f"batch-size finder: data.batch_size={result['batch_size']} fits ({result['searched_on']})",
        flush=True,
    )
    return result


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run_tuner(
    cfg: DictConfig, module: L.LightningModule, datamodule: Any, run_dir: Path
) -> dict[str, Any] | None:
    """The configured tuner (``tune.name``), with its result applied to ``cfg`` and the module when
    ``tune.apply``; ``None`` for ``tune=none``. The result has ``apply``: whether training follows."""
    name = tune_name(cfg)
    if name == "none":
        return None
    if name == "lr_find":
        result = find_lr(cfg, module, datamodule, run_dir)
        if cfg.tune.get("apply"):
            with open_dict(cfg):
                cfg.optimizer.lr = result["suggested_lr"]
            module.hparams.optimizer["lr"] = result["suggested_lr"]
            log.info("training with the suggested optimizer.lr=%.3g", result["suggested_lr"])
    else:
        result = find_batch_size(cfg, module, datamodule, run_dir)
        if cfg.tune.get("apply"):
            with open_dict(cfg):
                cfg.data.batch_size = result["batch_size"]
            datamodule.batch_size = result["batch_size"]
    result["apply"] = bool(cfg.tune.get("apply"))
    return result

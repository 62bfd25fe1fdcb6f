"""`python train.py ...`: seed, build data/model/callbacks/loggers/trainer from config, fit, test, report."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from foodvision.checkpoints import checkpoint_info, read_checkpoint
from foodvision.cli import EXPECTED_ERRORS
from foodvision.config_check import ConfigError, check_train_config
from foodvision.data.datamodule import FoodDataModule
from foodvision.data.sources import default_food101_root
from foodvision.errors import ModelLoadError
from foodvision.hardware import auto_precision
from foodvision.module import LitClassifier
from foodvision.recipe import recipe_summary
from foodvision.sweep import run_trial

log = logging.getLogger(__name__)
# Expected here: the frozen backbone's norm layers are in eval mode on purpose.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def resolve_precision(precision: Any, accelerator: str) -> Any:
    """``auto``: :func:`foodvision.hardware.auto_precision` for the device the trainer will use."""
    if precision != "auto":
        return precision
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return auto_precision("cuda" if on_gpu else "cpu")


def resolve_data_root(cfg: DictConfig) -> None:
    """Food-101 at data.root, else $FOOD101_ROOT, data/food-101, ../shared/data/food101-mini/food-101."""
    if cfg.data.source != "food101" or cfg.data.root is not None or cfg.data.get("download"):
        return
    root = Path(cfg.paths.root_dir)
    candidates = [
        os.environ.get("FOOD101_ROOT", ""),
        root / "data" / "food-101",
        root / "../shared/data/food101-mini/food-101",
    ]
    cfg.data.root = str(default_food101_root(candidates).resolve())


def resolve_checkpoint(ckpt_path: str | None, log_dir: str) -> str | None:
    """``last``: the newest ``last.ckpt`` of any run under ``log_dir``; a path must exist."""
    if not ckpt_path:
        return None
    if ckpt_path == "last":
        found = sorted(Path(log_dir).glob("**/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise ConfigError(
                f"ckpt_path=last but there is no last.ckpt under {log_dir} (paths.log_dir): nothing to resume"
            )
        return str(found[-1])
    if not Path(ckpt_path).is_file():
        raise ConfigError(f"ckpt_path={ckpt_path}: no such checkpoint file")
    return ckpt_path


def resume_run_dir(ckpt_path: str | None, log_dir: str, fresh: str) -> str:
    """The run dir a run writes to: the interrupted run's (``<run>/checkpoints/x.ckpt``) when resuming,
    else ``fresh``. Used by Hydra's ``hydra.run.dir`` (resolver ``fv_run_dir``), so a resumed run appends to
    its own ``train.log`` instead of leaving a stray run dir; never raises (train() reports bad paths)."""
    try:
        path = resolve_checkpoint(ckpt_path, log_dir)
    except ConfigError:
        return fresh
    if path is None or Path(path).resolve().parent.name != "checkpoints":
        return fresh
    return str(Path(path).resolve().parent.parent)


def hydra_subdir(ckpt_path: str | None) -> str:
    """Where Hydra keeps its record of a run: ``.hydra``, or ``.hydra/resume-<time>`` for each resume (the
    original record stays)."""
    return f".hydra/resume-{dt.datetime.now():%Y-%m-%d_%H-%M-%S}" if ckpt_path else ".hydra"


for _name, _resolver in (("fv_run_dir", resume_run_dir), ("fv_hydra_subdir", hydra_subdir)):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _resolver)


def check_resumable(ckpt_path: str, module: LitClassifier) -> None:
    """Refuse, with the differences spelled out, a damaged checkpoint or one of another architecture or
    class set."""
    saved = checkpoint_info(read_checkpoint(ckpt_path), ckpt_path)
    problems = []
    for key in ("kind", "name", "head", "scratch"):
        theirs, ours = saved.model.get(key), module.hparams.model.get(key)
        if theirs != ours:
            problems.append(f"model.{key}: checkpoint {theirs!r}, this run {ours!r}")
    if saved.class_names != module.class_names:
        missing = sorted(set(module.class_names) - set(saved.class_names))
        extra = sorted(set(saved.class_names) - set(module.class_names))
        problems.append(
            f"classes differ (data has {missing or 'none'} not in the checkpoint; checkpoint has {extra or 'none'} not in the data)"
        )
    if problems:
        raise ModelLoadError(f"cannot resume from {ckpt_path}: " + "; ".join(problems))


def build_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """Every ``callbacks.<name>`` with a ``_target_`` (conf/callbacks/*.yaml), in config order."""
    return [
        hydra.utils.instantiate(c, _convert_="all")
        for c in (cfg.get("callbacks") or {}).values()
        if c and "_target_" in c
    ]


def build_module(cfg: DictConfig, datamodule: FoodDataModule) -> LitClassifier:
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg["image_size"] = cfg.data.image_size
    class_weights = model_cfg.pop("class_weights", None)  # a loss setting, not part of the architecture
    return LitClassifier(
        num_classes=datamodule.num_classes,
        class_names=datamodule.classes,
        model=model_cfg,
        optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True),
        scheduler=OmegaConf.to_container(cfg.scheduler, resolve=True),
        label_smoothing=cfg.label_smoothing,
        channels_last=cfg.channels_last,
        max_epochs=cfg.trainer.max_epochs,
        class_weights=class_weights,
        class_counts=datamodule.class_counts("train") if class_weights is not None else None,
    )


def train(cfg: DictConfig) -> tuple[float | None, dict[str, Any]]:
    """Fit and test; returns the optimised metric (for sweepers) and the final metrics."""
    started = time.time()
    check_train_config(cfg)
    resume = resolve_checkpoint(cfg.get("ckpt_path"), cfg.paths.log_dir)
    with open_dict(cfg):
        resolve_data_root(cfg)
        if resume:  # keep writing into the interrupted run's dir
            cfg.paths.output_dir = str(Path(resume).resolve().parent.parent)
        cfg.trainer.precision = resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator)
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)

    datamodule: FoodDataModule = hydra.utils.instantiate(
        cfg.data, augment=OmegaConf.to_container(cfg.augment)
    )
    datamodule.discover()
    module = build_module(cfg, datamodule)
    datamodule.preprocessing = module.preprocessing
    if resume:
        check_resumable(resume, module)
    datamodule.verify_images()  # every split, before any training: all bad files reported at once
    loggers = [
        hydra.utils.instantiate(c) for c in (cfg.get("logger") or {}).values() if c and "_target_" in c
    ]
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=build_callbacks(cfg), logger=loggers or False
    )
    if trainer.is_global_zero and not resume:  # a resumed run keeps the config it was started with
        OmegaConf.save(cfg, run_dir / "config.yaml")
    hparams = _flat_hparams(cfg, datamodule, module)
    for logger in loggers:
        logger.log_hyperparams(hparams)
    log.info("classes (%d): %s", datamodule.num_classes, ", ".join(datamodule.classes))
    if resume:
        log.info("resuming from %s", resume)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume, weights_only=True)
    fit_seconds = time.time() - started

    metrics: dict[str, Any] = {"train_seconds": round(fit_seconds, 1), "run_dir": str(run_dir)}
    metrics.update({k: v for k, v in module.last_results.get("train", {}).items() if not isinstance(v, dict)})
    metrics.update(
        {k: v for k, v in module.last_results.get("val", {}).items() if not isinstance(v, (dict, list))}
    )
    for key in ("train/loss", "val/loss"):  # the last epoch's (logged by Lightning, not in last_results)
        if key in trainer.callback_metrics:
            metrics[key] = float(trainer.callback_metrics[key])
    if cfg.get("test") and trainer.is_global_zero:
        metrics.update(evaluate_best_checkpoint(cfg, trainer, run_dir))
        for logger in loggers:
            logger.log_metrics(
                {k: v for k, v in metrics.items() if k.startswith("test/") and isinstance(v, float)},
                step=trainer.global_step,
            )
    bad = datamodule.bad_images()
    metrics["skipped_bad_images"] = len(bad)
    metrics["bad_images"] = bad
    metrics["wall_seconds"] = round(time.time() - started, 1)
    if trainer.is_global_zero:
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        for logger in loggers:
            logger.log_hyperparams(
                hparams,
                {f"hp/{k}": v for k, v in metrics.items() if isinstance(v, float) and "/" in k},
            )
        log.info("run dir: %s", run_dir)
        summary = {
            k: round(v, 4) for k, v in metrics.items() if k.startswith("test/") and isinstance(v, float)
        }
        print(f"\nrun dir: {run_dir}\ntest: {summary}\nwall time: {metrics['wall_seconds']} s", flush=True)
    value = metrics.get(cfg.get("optimized_metric") or "")
    return (float(value) if value is not None else None), metrics


def eval_precision(trainer_precision: Any) -> str:
    """The trainer's precision in eval.py's vocabulary (``32`` or ``bf16``)."""
    return "bf16" if str(trainer_precision).startswith("bf16") else "32"


def evaluate_best_checkpoint(cfg: DictConfig, trainer: L.Trainer, run_dir: Path) -> dict[str, Any]:
    """Evaluate the best checkpoint (else ``last.ckpt``) on the test split with ``eval.py``'s code: the
    same metrics, keys and files (``<run>/eval-test/``) as ``python eval.py ckpt_path=<it>`` gives."""
    from foodvision.evaluate import evaluate

    checkpoint_callback = trainer.checkpoint_callback
    best = getattr(checkpoint_callback, "best_model_path", "") if checkpoint_callback else ""
    last = run_dir / "checkpoints" / "last.ckpt"
    checkpoint = best or (str(last) if last.is_file() else "")
    if not checkpoint:
        log.warning("no checkpoint was written (checkpoint callbacks off?): the test split is not evaluated")
        return {}
    eval_cfg = OmegaConf.load(Path(CONFIG_DIR) / "eval.yaml")
    del eval_cfg["defaults"]
    eval_cfg.merge_with(
        {
            "paths": OmegaConf.to_container(cfg.paths, resolve=True),
            "ckpt_path": checkpoint,
            "output_dir": str(run_dir / "eval-test"),
            "seed": cfg.seed,
            "data": {"split": "test"},
            "precision": eval_precision(cfg.trainer.precision),
            "device": trainer.strategy.root_device.type,
            "num_workers": cfg.data.get("num_workers"),
            "progress": trainer.progress_bar_callback is not None,
        },
        OmegaConf.to_container(cfg.get("eval") or {}, resolve=True),
    )
    log.info("testing %s on the test split (eval.py's code) -> %s", checkpoint, eval_cfg.output_dir)
    result = evaluate(eval_cfg)
    tested = {k: v for k, v in result.items() if k.startswith("test/")}
    tested.update(
        best_checkpoint=checkpoint,
        test_engine=result["engine"],
        test_images=result["num_images"],
        eval_dir=result["eval_dir"],
    )
    return tested


def _flat_hparams(cfg: DictConfig, datamodule: FoodDataModule, module: LitClassifier) -> dict[str, Any]:
    flat = {
        **recipe_summary(cfg),
        "optimizer": cfg.optimizer.name,
        "batch_size": cfg.data.batch_size,
        "num_classes": datamodule.num_classes,
        "classes": ",".join(datamodule.classes),
        "weights": module.weights_source,
        "precision": str(cfg.trainer.precision),
    }
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat.items()}


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    # In a multirun a failing trial is logged and written to <trial dir>/failed.json and the sweep goes on.
    # A user error (bad data, config or checkpoint) ends a single run with one message, no traceback.
    try:
        return run_trial(train, cfg)
    except EXPECTED_ERRORS as error:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {error}\n(HYDRA_FULL_ERROR=1 shows the traceback)", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()

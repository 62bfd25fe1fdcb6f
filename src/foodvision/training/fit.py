"""`python train.py ...`: seed, build data/model/callbacks/loggers/trainer from config, fit, test, report."""

from __future__ import annotations

import datetime as dt
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from foodvision.atomic import (
    ensure_dir,
    write_json,
    write_problem,
    write_text,
)
from foodvision.config import CONFIG_DIR
from foodvision.config.check import ConfigError, check_train_config
from foodvision.config.recipe import recipe_summary
from foodvision.data.datamodule import FoodDataModule
from foodvision.data.roots import data_root_of, resolve_data_root
from foodvision.errors import ModelLoadError
from foodvision.evaluation.evaluate import calibrate_checkpoint, evaluate
from foodvision.hardware import inference_precision_of_trainer, trainer_precision
from foodvision.inference.checkpoints import checkpoint_info, read_checkpoint
from foodvision.runs.layout import CHECKPOINTS, CONFIG, LAST_CKPT, METRICS, SPLITS, eval_dir
from foodvision.training.callbacks.build import build_callbacks
from foodvision.training.callbacks.checkpointing import use_atomic_checkpoints
from foodvision.training.module import LitClassifier
from foodvision.training.resume import (
    HeldRunLog,
    check_not_finished,
    find_last,
    remove_unused_run_dir,
    resume_target,
    run_identity,
    unique_run_dir,
    write_resume_record,
)
from foodvision.training.tuning import run_tuner

log = logging.getLogger(__name__)
# Expected here: the frozen backbone's norm layers are in eval mode on purpose.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
# Expected: the module mixes training batches (augment.mixup/cutmix) in its on_after_batch_transfer.
warnings.filterwarnings("ignore", message=r".*overridden `on_after_batch_transfer` in `LightningModule`.*")


def resume_identity(cfg: DictConfig) -> tuple[dict[str, Any], Callable[[Mapping[str, Any]], Any]]:
    """This run's :func:`foodvision.training.resume.run_identity` (from the config as composed, unresolved) and how
    to find the data root a recorded config reads."""
    root_dir = str(OmegaConf.select(cfg, "paths.root_dir", default=".") or ".")

    def root_of(config: Mapping[str, Any]) -> Any:
        data = config.get("data")
        return data_root_of(data if isinstance(data, Mapping) else {}, root_dir)

    plain = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(plain, dict)
    return run_identity(plain, root_of(plain)), root_of


def resolve_checkpoint(ckpt_path: str | None, log_dir: str, cfg: DictConfig | None = None) -> str | None:
    """``last``: the ``last.ckpt`` of the newest interrupted run of this config (``cfg``) under ``log_dir``
    (:func:`foodvision.training.resume.find_last`); a path must exist."""
    if not ckpt_path:
        return None
    if ckpt_path == "last":
        if cfg is None:
            raise ValueError("ckpt_path=last needs the run's config to find a run of the same config")
        ours, root_of = resume_identity(cfg)
        return str(find_last(log_dir, ours, root_of))
    if not Path(ckpt_path).is_file():
        raise ConfigError(f"ckpt_path={ckpt_path}: no such checkpoint file")
    return ckpt_path


def resume_run_dir(ckpt_path: str | None, log_dir: str, fresh: str, *, _root_: DictConfig) -> str:
    """The run dir a run writes to: the interrupted run's (``<run>/checkpoints/x.ckpt``) when resuming,
    else a new one (``fresh``, made unique: :func:`foodvision.training.resume.unique_run_dir`). Used by Hydra's
    ``hydra.run.dir`` (resolver ``fv_run_dir``, ``_root_`` the composed config), so a resumed run appends
    to its own ``train.log`` instead of leaving a stray run dir; never raises (train() reports bad paths
    and refusals)."""
    try:
        path = resolve_checkpoint(ckpt_path, log_dir, _root_)
    except Exception:  # noqa: BLE001 - train() meets the same error and reports it in one line
        path = None
    target = resume_target(path) if path else None
    if target is None or target.run_dir is None:
        return unique_run_dir(fresh)
    return str(target.run_dir)


def hydra_subdir(ckpt_path: str | None, mode: Any = "RUN") -> str | None:
    """Where Hydra keeps its record of a run: ``.hydra``; none for a single resumed run, whose record
    train() writes once the resume is accepted (:func:`foodvision.training.resume.write_resume_record`), so a
    refused resume writes nothing into the run; ``.hydra/resume-<time>`` for a trial of a multirun."""
    if not ckpt_path:
        return ".hydra"
    if getattr(mode, "name", str(mode)) == "RUN":
        return None
    return f".hydra/resume-{dt.datetime.now():%Y-%m-%d_%H-%M-%S}"


for _name, _resolver in (("fv_run_dir", resume_run_dir), ("fv_hydra_subdir", hydra_subdir)):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _resolver)


def check_resumable(ckpt_path: str, module: LitClassifier, max_epochs: int | None = None) -> None:
    """Refuse, with the differences spelled out, a damaged checkpoint or one of another architecture or
    class set, or (with ``max_epochs``) one of a finished run with no epoch left to train."""
    checkpoint = read_checkpoint(ckpt_path)
    saved = checkpoint_info(checkpoint, ckpt_path)
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
    if max_epochs is not None:
        check_not_finished(resume_target(ckpt_path), checkpoint, max_epochs)


def accept_resume(
    datamodule: FoodDataModule, run_dir: Path, held: HeldRunLog | None, composed: str, fresh: bool
) -> None:
    """Once a resume is accepted: the held log lines go to the run's train.log, Hydra's record of this
    invocation to ``.hydra/resume-<time>/``, and splits.csv is written (a warning if the data changed)."""
    if held is not None:
        held.release()
    if rank_zero_only.rank != 0:
        return
    write_resume_record(run_dir, composed, fresh)
    splits = run_dir / SPLITS
    before = splits.read_bytes() if splits.is_file() else None
    datamodule.save_splits()
    if before is not None and splits.is_file() and splits.read_bytes() != before:
        log.warning(
            "the data changed since this run started: %s now lists other files (the resumed epochs train on "
            "them, so the run no longer repeats the uninterrupted one)",
            splits,
        )


def build_module(cfg: DictConfig, datamodule: FoodDataModule) -> LitClassifier:
    """The LightningModule ``cfg.module`` describes (conf/module/default.yaml, a partial): what only the data
    knows is added here, the classes and, for ``model.class_weights``, the training split's class counts."""
    if OmegaConf.select(cfg, "module._target_") is None:
        raise ConfigError(
            "no module config: conf/train.yaml's defaults list `module: default` (conf/module/)"
        )
    weighted = OmegaConf.select(cfg, "model.class_weights") is not None
    factory = hydra.utils.instantiate(cfg.module)
    module = factory(
        num_classes=datamodule.num_classes,
        class_names=datamodule.classes,
        class_counts=datamodule.class_counts("train") if weighted else None,
    )
    if not isinstance(module, LitClassifier):
        raise ConfigError(
            f"module._target_={cfg.module._target_!r} built a {type(module).__name__}; train.py needs a "
            "foodvision.training.module.LitClassifier (or a subclass)"
        )
    return module


def train(cfg: DictConfig) -> tuple[float | None, dict[str, Any]]:
    """Fit and test; returns the optimised metric (for sweepers) and the final metrics."""
    started = time.time()
    check_train_config(cfg)
    composed = OmegaConf.to_yaml(cfg)  # for the record of a resume, written once it is accepted
    try:
        resume = resolve_checkpoint(cfg.get("ckpt_path"), cfg.paths.log_dir, cfg)
    except ConfigError:  # no run to resume: the new dir Hydra made for this invocation goes again
        remove_unused_run_dir(OmegaConf.select(cfg, "paths.output_dir", throw_on_resolution_failure=False))
        raise
    target = resume_target(resume) if resume else None
    continued = target.run_dir if target is not None else None  # the interrupted run's dir, if any
    # Nothing is written into that run until the resume is accepted: its train.log waits (foodvision.training.resume).
    held = HeldRunLog(continued) if continued is not None else None
    with open_dict(cfg):
        resolve_data_root(cfg)
        if continued is not None:  # keep writing into the interrupted run's dir
            cfg.paths.output_dir = str(continued)
        cfg.trainer.precision = trainer_precision(cfg.trainer.precision, cfg.trainer.accelerator)
    run_dir = ensure_dir(cfg.paths.output_dir)
    L.seed_everything(cfg.seed, workers=True)

    datamodule: FoodDataModule = hydra.utils.instantiate(
        cfg.data, augment=OmegaConf.to_container(cfg.augment)
    )
    datamodule.discover(save_splits=not resume)  # a resume's splits.csv waits for its acceptance
    module = build_module(cfg, datamodule)
    datamodule.preprocessing = module.preprocessing
    if resume:
        try:
            check_resumable(resume, module, cfg.trainer.max_epochs)
        except BaseException:
            if held is not None:
                held.refuse()  # the interrupted run's log stays as it was
            raise
        accept_resume(datamodule, run_dir, held, composed, fresh=continued is None)
    datamodule.verify_images()  # every split, before any training: all bad files reported at once
    tuned = None if resume else run_tuner(cfg, module, datamodule, run_dir)  # tune=lr_find|batch_size
    if tuned is not None and not tuned["apply"]:  # without tune.apply the finder's result is the run's
        return None, {"run_dir": str(run_dir), **{k: v for k, v in tuned.items() if not isinstance(v, list)}}
    loggers = [
        hydra.utils.instantiate(c) for c in (cfg.get("logger") or {}).values() if c and "_target_" in c
    ]
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=build_callbacks(cfg), logger=loggers or False
    )
    use_atomic_checkpoints(trainer, run_dir)  # a full disk leaves the previous checkpoint, never half a file
    if trainer.is_global_zero and continued is None:  # a resumed run keeps the config it was started with
        write_text(run_dir / CONFIG, OmegaConf.to_yaml(cfg))
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
    metrics.update(datamodule.duplicate_check.summary())  # exact duplicates across the splits (#23)
    metrics["excluded_label_issues"] = len(datamodule.excluded_label_issues)  # data.exclude_label_issues
    metrics["wall_seconds"] = round(time.time() - started, 1)
    if trainer.is_global_zero:
        write_json(run_dir / METRICS, metrics)
        final = {f"hp/{k}": v for k, v in metrics.items() if isinstance(v, float) and "/" in k}
        for logger in loggers:
            if isinstance(logger, TensorBoardLogger):  # its HPARAMS tab pairs the settings with the results
                logger.log_hyperparams(hparams, final)
            else:  # CSVLogger and others take the settings alone
                logger.log_metrics(final, step=trainer.global_step)
                logger.save()  # fit has already finalised it: write the row now
        log.info("run dir: %s", run_dir)
        summary = {
            k: round(v, 4) for k, v in metrics.items() if k.startswith("test/") and isinstance(v, float)
        }
        print(f"\nrun dir: {run_dir}\ntest: {summary}\nwall time: {metrics['wall_seconds']} s", flush=True)
    value = metrics.get(cfg.get("optimized_metric") or "")
    return (float(value) if value is not None else None), metrics


def evaluate_best_checkpoint(cfg: DictConfig, trainer: L.Trainer, run_dir: Path) -> dict[str, Any]:
    """Evaluate the best checkpoint (else ``last.ckpt``) on the test split with ``eval.py``'s code: the
    same metrics, keys and files (``<run>/eval-test/``) as ``python eval.py ckpt_path=<it>`` gives. With
    ``eval.calibrate`` (the default) its temperature and unknown threshold are fitted on the val split
    first and saved in it (and in ``last.ckpt``): :mod:`foodvision.evaluation.trust`."""
    checkpoint_callback = trainer.checkpoint_callback
    best = getattr(checkpoint_callback, "best_model_path", "") if checkpoint_callback else ""
    last = run_dir / CHECKPOINTS / LAST_CKPT
    checkpoint = best or (str(last) if last.is_file() else "")
    if not checkpoint:
        log.warning("no checkpoint was written (checkpoint callbacks off?): the test split is not evaluated")
        return {}
    # conf/eval.yaml with its inference group (device, engine, batch_size, ...: conf/inference/)
    eval_cfg = OmegaConf.merge(
        *(
            OmegaConf.load(Path(CONFIG_DIR) / f)
            for f in ("inference/load.yaml", "inference/default.yaml", "eval.yaml")
        )
    )
    del eval_cfg["defaults"]
    eval_cfg.merge_with(
        {
            "paths": OmegaConf.to_container(cfg.paths, resolve=True),
            "ckpt_path": checkpoint,
            "output_dir": str(eval_dir(run_dir)),
            "seed": cfg.seed,
            "data": {"split": "test"},
            "precision": inference_precision_of_trainer(cfg.trainer.precision),
            "device": trainer.strategy.root_device.type,
            "num_workers": cfg.data.get("num_workers"),
            "progress": trainer.progress_bar_callback is not None,
        },
        OmegaConf.to_container(cfg.get("eval") or {}, resolve=True),
    )
    log.info("testing %s on the test split (eval.py's code) -> %s", checkpoint, eval_cfg.output_dir)
    result = evaluate(eval_cfg)
    if eval_cfg.get("calibrate") and last.is_file() and last.resolve() != Path(checkpoint).resolve():
        # last.ckpt is served too: its own calibration
        calibrate_checkpoint(eval_cfg, last)
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
        "optimizer": OmegaConf.select(cfg, "optimizer.name") or OmegaConf.select(cfg, "optimizer._target_"),
        "batch_size": cfg.data.batch_size,
        "num_classes": datamodule.num_classes,
        "classes": ",".join(datamodule.classes),
        "weights": module.weights_source,
        "precision": str(cfg.trainer.precision),
    }
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat.items()}


class RunDirCheck(Callback):
    """A Hydra callback (conf/hydra/default.yaml): before Hydra writes into a new run dir (``.hydra/``,
    ``train.log``), check that it can, so a read-only or full disk is one ``error:`` line, not Hydra's
    traceback."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        HydraConfig.instance().set_config(config)  # what run_job does next: ${hydra:...} resolves
        run_dir = OmegaConf.select(config, "hydra.run.dir", default=None)
        problem = write_problem(run_dir, keep=False) if run_dir else None  # Hydra creates it right after
        if problem is not None and os.environ.get("HYDRA_FULL_ERROR") != "1":
            print(f"error: {problem}", file=sys.stderr, flush=True)
            sys.exit(1)  # SystemExit passes Hydra's callback guard

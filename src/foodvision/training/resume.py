"""Which run a resume continues, and nothing written into that run before the resume is accepted.

``ckpt_path=last`` resumes the newest *interrupted* run of *this config*: a run under ``paths.log_dir`` with a
``checkpoints/last.ckpt``, without a ``metrics.json`` (written when a run finishes), whose recorded config has
the same data root, model and recipe (:data:`IDENTITY_KEYS`) as the config being run. Anything else is
refused, naming the runs that were looked at and why each was not taken. A path (``ckpt_path=<run>/
checkpoints/x.ckpt``) resumes that run whatever its config, once the architecture and classes match.

Before train.py accepts a resume (checkpoint readable, same architecture and classes, not a finished run
with no epoch left), nothing is written into the run: Hydra writes no ``.hydra/`` record for a resume
(``fv_hydra_subdir``; :func:`write_resume_record` writes it after acceptance), the run's ``train.log``
handlers are held (:class:`HeldRunLog`), and ``splits.csv`` is written only after acceptance.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from foodvision.atomic import ensure_dir, write_text
from foodvision.config.check import ConfigError
from foodvision.data.roots import normalized_root
from foodvision.runs.layout import CHECKPOINTS, CONFIG, HYDRA_CONFIG, HYDRA_DIR, METRICS, OVERRIDES

log = logging.getLogger(__name__)

# What makes two runs "the same config" for ckpt_path=last: the data, the network and the recipe. Not
# trainer.max_epochs (resuming with more epochs trains on), nor where or how the run runs (paths, devices,
# workers, precision, loggers).
IDENTITY_KEYS = (
    "data.source",
    "data.root",
    "data.classes",
    "data.max_per_class",
    "data.fractions",
    "data.val_fraction",
    "data.image_size",
    "data.batch_size",
    "data.balance",
    "seed",
    "model",
    "optimizer",
    "scheduler",
    "augment",
    "label_smoothing",
    "callbacks.finetune",
    "callbacks.feature_cache",
)
# Leaves that say how a group is built, not which recipe it is (`name` says which optimizer/scheduler; the
# scheduler's epochs follow trainer.max_epochs): runs recorded before conf/ named classes by `_target_` match.
BUILD_LEAVES = (
    "._target_",
    "._partial_",
    "scheduler.interval",
    "scheduler.epochs",
    "scheduler.monitor",
    "scheduler.mode",
)
# How many runs a refusal names (newest first).
NAMED_CANDIDATES = 5


def _lookup(tree: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(tree, Mapping) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _leaves(value: Any, prefix: str) -> dict[str, Any]:
    """``{"model.head.dropout": 0.5, ...}``: nested mappings flattened, so a difference names its key."""
    if isinstance(value, Mapping):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_leaves(item, f"{prefix}.{key}"))
        return flat
    return {prefix: value}


def run_identity(config: Mapping[str, Any], data_root: Any) -> dict[str, Any]:
    """The :data:`IDENTITY_KEYS` of a plain config mapping, flattened to leaves; ``data_root``: the data root
    the run reads (train.py's default Food-101 root when ``data.root`` is null)."""
    identity: dict[str, Any] = {}
    for key in IDENTITY_KEYS:
        value = normalized_root(data_root) if key == "data.root" else _lookup(config, key)
        identity.update(_leaves(value, key))
    return {key: value for key, value in identity.items() if not key.endswith(BUILD_LEAVES)}


def recorded_config(run_dir: Path) -> dict[str, Any] | None:
    """The config a run was started with, read as plain data (never resolved or instantiated): Hydra's
    composed ``.hydra/config.yaml``, else train.py's ``config.yaml``; None when neither is readable."""
    for path in (run_dir / HYDRA_DIR / CONFIG, run_dir / CONFIG):
        try:
            loaded = yaml.safe_load(path.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue
        if isinstance(loaded, dict):
            return loaded
    return None


def run_finished(run_dir: Path) -> bool:
    """A run that finished (train.py writes ``metrics.json`` last): never resumed by ``ckpt_path=last``."""
    return (run_dir / METRICS).exists()


def differences(theirs: Mapping[str, Any], ours: Mapping[str, Any], limit: int = 3) -> list[str]:
    """``key: <theirs> (this run <ours>)`` for each identity leaf that differs, at most ``limit``."""
    keys = [k for k in dict.fromkeys([*ours, *theirs]) if theirs.get(k) != ours.get(k)]
    shown = [f"{k}: {theirs.get(k)!r} (this run {ours.get(k)!r})" for k in keys[:limit]]
    return shown + ([f"{len(keys) - limit} more"] if len(keys) > limit else [])


def why_not_resumed(run_dir: Path, ours: Mapping[str, Any], data_root_of: Any) -> str | None:
    """None when ``ckpt_path=last`` may resume ``run_dir``, else why not (a few words)."""
    if run_finished(run_dir):
        return "finished (metrics.json)"
    config = recorded_config(run_dir)
    if config is None:
        return "no readable config.yaml to compare with"
    theirs = run_identity(config, data_root_of(config))
    found = differences(theirs, ours)
    return "another config: " + ", ".join(found) if found else None


def find_last(log_dir: str | Path, ours: Mapping[str, Any], data_root_of: Any) -> Path:
    """The ``last.ckpt`` of the newest interrupted run of this config under ``log_dir``, else a
    :class:`ConfigError` naming the runs looked at. ``ours``: :func:`run_identity` of this run's config;
    ``data_root_of(config)``: the data root a recorded config reads."""
    found = sorted(
        Path(log_dir).glob("**/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True
    )
    if not found:
        raise ConfigError(
            f"ckpt_path=last but there is no last.ckpt under {log_dir} (paths.log_dir): nothing to resume"
        )
    refused = []
    for checkpoint in found:
        why = why_not_resumed(checkpoint.parent.parent, ours, data_root_of)
        if why is None:
            return checkpoint
        refused.append(f"{checkpoint.parent.parent} ({why})")
    named = "; ".join(refused[:NAMED_CANDIDATES]) + (
        f"; and {len(refused) - NAMED_CANDIDATES} older" if len(refused) > NAMED_CANDIDATES else ""
    )
    raise ConfigError(
        f"ckpt_path=last: no interrupted run of this config (same data root, model and recipe) under {log_dir} "
        f"(paths.log_dir); runs with a last.ckpt, newest first: {named}. Resume one of them by path "
        "(ckpt_path=<run>/checkpoints/last.ckpt; a finished run only with a larger trainer.max_epochs), "
        "or start a new run without ckpt_path"
    )


@dataclass(frozen=True)
class ResumeTarget:
    """The checkpoint a run resumes from and the run dir it continues (None: the checkpoint is not in a
    run's ``checkpoints/`` folder, so the run writes into a new dir)."""

    checkpoint: Path
    run_dir: Path | None


def resume_target(checkpoint: str | Path) -> ResumeTarget:
    path = Path(checkpoint).resolve()
    return ResumeTarget(path, path.parent.parent if path.parent.name == CHECKPOINTS else None)


def check_not_finished(target: ResumeTarget, checkpoint: Mapping[str, Any], max_epochs: int) -> None:
    """Refuse resuming a finished run that has no epoch left to train: it would only overwrite its
    records (``metrics.json`` losing its train and val results, its test results replaced)."""
    if target.run_dir is None or not run_finished(target.run_dir):
        return
    trained = int(checkpoint.get("epoch", -1)) + 1
    if trained >= int(max_epochs):
        raise ConfigError(
            f"ckpt_path={target.checkpoint}: its run {target.run_dir} finished (metrics.json) and this "
            f"checkpoint has all trainer.max_epochs={max_epochs} epochs: nothing to resume (it would only "
            "overwrite the run's records); raise trainer.max_epochs to train it on"
        )


# ---- unique run dirs ---------------------------------------------------------------------------------
_CREATED: dict[str, str] = {}  # base name -> the dir this process created for it


def unique_run_dir(base: str) -> str:
    """``base``, else ``base-2``, ``base-3``...: the first that this process creates (an exclusive mkdir),
    so two runs started in the same second never share a dir. The same ``base`` gives the same dir for the
    rest of the process (Hydra resolves ``hydra.run.dir`` more than once). A dir that cannot be created
    (read-only or full disk) is returned as it is, for the run-dir check to report."""
    if base in _CREATED:
        return _CREATED[base]
    candidate = base
    for number in range(2, 10_000):
        try:
            Path(candidate).mkdir(parents=True, exist_ok=False)
            break
        except FileExistsError:
            candidate = f"{base}-{number}"
        except OSError:
            break
    _CREATED[base] = candidate
    return candidate


def remove_unused_run_dir(path: str | Path | None) -> bool:
    """Remove ``path`` if this process created it (:func:`unique_run_dir`) and it holds nothing but empty
    files (Hydra's ``train.log`` before a line was logged), closing the log handlers that write there: a
    refused ``ckpt_path=last`` leaves no stray run dir. True when it was removed."""
    if path is None:
        return False
    folder = Path(path).resolve()
    if folder not in {Path(created).resolve() for created in _CREATED.values()} or not folder.is_dir():
        return False
    entries = list(folder.iterdir())
    if any(not entry.is_file() or entry.stat().st_size for entry in entries):
        return False
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).resolve().parent == folder:
            root.removeHandler(handler)
            handler.close()
    try:
        for entry in entries:
            entry.unlink()
        folder.rmdir()
    except OSError:
        return False
    return True


# ---- nothing written before acceptance ---------------------------------------------------------------
class _Buffer(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class HeldRunLog:
    """The root logger's file handlers that write into ``run_dir`` (Hydra's ``train.log``), detached until
    the resume is accepted; their records wait in memory. :meth:`release` appends them to the log,
    :meth:`refuse` drops them, so a refused resume leaves the interrupted run's log as it was."""

    def __init__(self, run_dir: Path) -> None:
        root = logging.getLogger()
        inside = run_dir.resolve()
        self.handlers = [
            h
            for h in root.handlers
            if isinstance(h, logging.FileHandler) and Path(h.baseFilename).resolve().is_relative_to(inside)
        ]
        self.buffer = _Buffer()
        for handler in self.handlers:
            root.removeHandler(handler)
        if self.handlers:
            root.addHandler(self.buffer)

    def release(self) -> None:
        root = logging.getLogger()
        root.removeHandler(self.buffer)
        for handler in self.handlers:
            root.addHandler(handler)
            for record in self.buffer.records:
                if record.levelno >= handler.level:
                    handler.handle(record)
        self.buffer.records.clear()
        self.handlers = []

    def refuse(self) -> None:
        logging.getLogger().removeHandler(self.buffer)
        for handler in self.handlers:
            handler.close()
        self.buffer.records.clear()
        self.handlers = []


def write_resume_record(run_dir: Path, composed_yaml: str, fresh: bool) -> Path | None:
    """Hydra's record of an accepted resume (its ``config.yaml``, ``hydra.yaml`` and ``overrides.yaml``), in
    ``.hydra/resume-<time>/`` of the continued run (``.hydra/`` of a new dir), written only now: Hydra
    itself writes none for a resume (``fv_hydra_subdir``). None outside a Hydra run."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.instance().cfg
    record = run_dir / HYDRA_DIR
    if not fresh:
        record = Path(unique_run_dir(str(record / f"resume-{dt.datetime.now():%Y-%m-%d_%H-%M-%S}")))
    ensure_dir(record)
    write_text(record / CONFIG, composed_yaml)
    write_text(record / HYDRA_CONFIG, OmegaConf.to_yaml(hydra_cfg))
    write_text(record / OVERRIDES, OmegaConf.to_yaml(hydra_cfg.hydra.overrides.task))
    return record

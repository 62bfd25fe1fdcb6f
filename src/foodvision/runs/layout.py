"""A training run's folder: the names of what train.py, eval.py and a sweep write there, and one reader of it.

Every tool that finds or describes runs (``compare.py``'s leaderboard, a sweep's summary, the benchmark's
recipe section) reads a run through :func:`run_row`, so a run's status, settings and results mean the same
everywhere. Reading never raises for a broken run: its row's ``status`` and ``note`` say what is wrong.

A run dir (``lightning_logs/runs/<name>/`` or a multirun's numbered trial)::

    config.yaml            the config train.py ran (Hydra's copy: .hydra/config.yaml, overrides.yaml, hydra.yaml)
    metrics.json           written when training finished (train/val/test metrics, seconds)
    failed.json            a multirun trial that raised (foodvision.runs.sweep)
    checkpoints/           best-*.ckpt, last.ckpt
    eval-<split>/          eval.py's output: metrics.json, predictions.csv, report.html, ...
    splits.csv, train.log
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from foodvision.config.recipe import recipe_summary
from foodvision.errors import ToolError

CONFIG = "config.yaml"
METRICS = "metrics.json"
FAILED = "failed.json"
HYDRA_DIR = ".hydra"
OVERRIDES = "overrides.yaml"  # in HYDRA_DIR
HYDRA_CONFIG = "hydra.yaml"  # in HYDRA_DIR
CHECKPOINTS = "checkpoints"
LAST_CKPT = "last.ckpt"
EXPORT = "export"
REPORT = "report.html"
PREDICTIONS = "predictions.csv"
SPLITS = "splits.csv"
TRAIN_LOG = "train.log"
SUMMARY = "summary"  # a sweep dir's summary.csv / summary.md
EVAL_PREFIX = "eval-"

RUN_MARKERS = (CONFIG, METRICS, CHECKPOINTS, HYDRA_DIR, TRAIN_LOG, FAILED)
SKIP_DIRS = {CHECKPOINTS, HYDRA_DIR, EXPORT, "__pycache__"}
# metrics.json keys -> row columns
METRIC_COLUMNS = {
    "train/acc": "train_acc",
    "val/acc": "val_acc",
    "test/acc": "test_acc",
    "test/loss": "test_loss",
    "test/f1_macro": "test_f1_macro",
    "train_seconds": "train_seconds",
    "wall_seconds": "wall_seconds",
}


def eval_dir(run_dir: str | Path, split: str = "test") -> Path:
    """Where ``eval.py`` writes its output for ``split`` of the run (train.py's test: ``eval-test``)."""
    return Path(run_dir) / f"{EVAL_PREFIX}{split}"


# ---- finding runs ----------------------------------------------------------------------------------------
def is_run_dir(path: Path) -> bool:
    return any((path / marker).exists() for marker in RUN_MARKERS)


def find_runs(paths: Sequence[str | Path]) -> list[Path]:
    """Run dirs among ``paths``: a path that is a run, else every run below it (any depth: a multirun's
    numbered trials, runs/ of lightning_logs/...). Sorted, no duplicates."""
    found: list[Path] = []
    for item in paths:
        path = Path(item).expanduser()
        if not path.is_dir():
            raise ToolError(f"runs: {path} is not a folder")
        if is_run_dir(path):
            found.append(path)
            continue
        below = []
        for dirpath, dirnames, _ in os.walk(path):
            here = Path(dirpath)
            if here != path and is_run_dir(here):
                below.append(here)
                dirnames[:] = []  # a run's own subfolders are not runs
                continue
            dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith(EVAL_PREFIX))
        if not below:
            raise ToolError(
                f"runs: no training runs in {path} (a run dir has {CONFIG}, {METRICS} or {CHECKPOINTS}/)"
            )
        found += below
    unique = {p.resolve(): p for p in found}
    return [unique[k] for k in sorted(unique)]


def pick_checkpoint(run_dir: Path, metrics: dict[str, Any]) -> Path | None:
    """The checkpoint the run was tested with (metrics.json ``best_checkpoint``), else best-*, else last."""
    folder = Path(run_dir) / CHECKPOINTS
    best = metrics.get("best_checkpoint")
    if best:
        for candidate in (Path(best), folder / Path(best).name):  # the run dir may have moved
            if candidate.is_file():
                return candidate
    found = (
        sorted(folder.glob("best*.ckpt"))
        or sorted(folder.glob("last*.ckpt"))
        or sorted(folder.glob("*.ckpt"))
    )
    return found[-1] if found else None


# ---- reading a run's files ---------------------------------------------------------------------------------
def read_json(path: Path, problems: list[str] | None = None) -> dict[str, Any]:
    """A JSON object, or {} when the file is missing or unreadable (added to ``problems`` then)."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        if problems is not None:
            problems.append(f"unreadable {path.name} ({error})")
        return {}
    return value if isinstance(value, dict) else {}


def read_yaml(path: Path) -> Any:
    """A YAML file as OmegaConf data (read as data only: nothing in it is instantiated), None if unreadable."""
    try:
        return OmegaConf.load(path) if path.is_file() else None
    except Exception:  # noqa: BLE001 - a half-written or foreign file: the caller says it is missing
        return None


def read_config(run_dir: Path, problems: list[str] | None = None) -> DictConfig | None:
    """The config the run trained with: train.py's ``config.yaml``, else Hydra's copy (a run that failed
    before train() saved its own)."""
    notes = problems if problems is not None else []
    for path in (Path(run_dir) / CONFIG, Path(run_dir) / HYDRA_DIR / CONFIG):
        if path.is_file():
            config = read_yaml(path)
            if not isinstance(config, DictConfig):
                notes.append(f"unreadable {path.name} (not a mapping)")
                return None
            return config
    notes.append(f"no {CONFIG}")
    return None


def read_overrides(run_dir: Path) -> list[str]:
    """The command-line overrides of the run (Hydra's ``.hydra/overrides.yaml``)."""
    loaded = read_yaml(Path(run_dir) / HYDRA_DIR / OVERRIDES)
    return [str(o) for o in loaded] if OmegaConf.is_list(loaded) else []


def hydra_value(run_dir: Path, key: str) -> Any:
    """A key of the run's ``.hydra/hydra.yaml`` (``hydra.job.num``, ``hydra.runtime.choices.model``), or None."""
    loaded = read_yaml(Path(run_dir) / HYDRA_DIR / HYDRA_CONFIG)
    if not isinstance(loaded, DictConfig):
        return None
    return OmegaConf.select(loaded, key, default=None, throw_on_resolution_failure=False)


def test_images(run_dir: Path) -> int | None:
    """How many photos the run was tested on: ``test_images`` of its metrics.json (train.py), else
    ``num_images`` of eval-test/metrics.json (eval.py)."""
    for path, key in ((Path(run_dir) / METRICS, "test_images"), (eval_dir(run_dir) / METRICS, "num_images")):
        value = read_json(path).get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


# ---- one row -----------------------------------------------------------------------------------------------
def run_row(run_dir: str | Path) -> dict[str, Any]:
    """What a run dir says: its settings (:func:`foodvision.config.recipe.recipe_summary`), its metrics, its
    checkpoint, and its status: ``failed`` (a trial that raised: failed.json), ``ok`` (training finished:
    metrics.json), else ``incomplete`` (interrupted, still running or damaged). ``note`` lists what is
    missing or wrong; ``error`` the failure, if any."""
    run_dir = Path(run_dir)
    problems: list[str] = []
    failed = (run_dir / FAILED).is_file()
    failure = read_json(run_dir / FAILED, problems)
    error = f"{failure.get('error_type', 'error')}: {failure.get('message', '')}".strip() if failed else None
    if error:
        problems.append(error)
    config = read_config(run_dir, problems)
    metrics = read_json(run_dir / METRICS, problems)
    if not (run_dir / METRICS).is_file():
        problems.append(f"no {METRICS} (failed, interrupted or still running)")
    row: dict[str, Any] = {
        "run": run_dir.name,
        "path": str(run_dir),
        "status": "failed" if failed else ("ok" if metrics else "incomplete"),
        "error": error,
        **(recipe_summary(config) if config is not None else {}),
    }
    for key, column in METRIC_COLUMNS.items():
        value = metrics.get(key)
        row[column] = float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
    row["test_images"] = test_images(run_dir)
    checkpoint = pick_checkpoint(run_dir, metrics)
    if checkpoint is None:
        problems.append("no checkpoint")
    else:
        inside = checkpoint.resolve().is_relative_to(run_dir.resolve())
        row["checkpoint"] = str(checkpoint.resolve().relative_to(run_dir.resolve()) if inside else checkpoint)
        row["checkpoint_mb"] = checkpoint.stat().st_size / 1e6
    if row["test_acc"] is None and not any(METRICS in p for p in problems):
        problems.append(f"no test accuracy in {METRICS}")
    row["note"] = "; ".join(problems)
    return row

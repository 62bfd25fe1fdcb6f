"""Hydra sweeps (``python train.py -m ...``): failed trials are recorded and skipped, and the sweep dir gets
a summary table.

* :func:`run_trial` wraps ``train`` in ``main``. In a multirun, an exception is logged, written to
  ``<trial dir>/failed.json`` (error type, message, traceback, overrides) and the trial returns
  ``failed_trial_value`` (default ``None``; the Optuna sweeper then marks the trial FAIL), so the sweep
  goes on with the next trial. A single run raises as usual.
* :class:`SweepSummary` (a Hydra callback, configured in ``conf/hydra/default.yaml``) writes
  ``summary.csv`` and ``summary.md`` into the multirun dir: one row per trial with its overrides,
  status (ok / failed / incomplete, as :func:`foodvision.runs.layout.run_row` says) and the columns of
  ``python compare.py``'s leaderboard (its ``leaderboard_row``, without timing inference). It rewrites them after every trial, so an interrupted sweep
  still has its table, and logs the table when the sweep ends. It also creates the directory of an
  Optuna ``sqlite:///`` storage before the sweeper opens it.
* ``foodvision-sweep <multirun dir>`` (:mod:`foodvision.cli.sweep`) rebuilds the summary of a sweep dir.
"""

from __future__ import annotations

import csv
import datetime as dt
import logging
import math
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from foodvision.atomic import DiskWriteError, atomic_open, write_json, write_text
from foodvision.runs.compare import COLUMNS, leaderboard_row
from foodvision.runs.layout import (
    FAILED,
    HYDRA_DIR,
    METRICS,
    OVERRIDES,
    SUMMARY,
    hydra_value,
    read_config,
    read_json,
    read_overrides,
)
from foodvision.runs.tables import markdown_table

log = logging.getLogger(__name__)


# ---- failing trials ---------------------------------------------------------------------------
def in_multirun() -> bool:
    """Whether this process runs a trial of a Hydra multirun (``-m`` or ``hydra.mode=MULTIRUN``)."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def record_failure(trial_dir: str | Path, error: BaseException, overrides: Sequence[str] = ()) -> Path:
    """Write ``failed.json`` (error type, message, traceback, overrides, time) into ``trial_dir``."""
    path = Path(trial_dir) / FAILED
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "status": "failed",
        "error_type": type(error).__name__,
        "message": str(error),
        "traceback": "".join(traceback.format_exception(type(error), error, error.__traceback__)),
        "overrides": list(overrides),
        "time": dt.datetime.now().isoformat(timespec="seconds"),
    }
    write_json(path, record)
    return path


def run_trial(
    train_fn: Callable[[DictConfig], tuple[float | None, dict[str, Any]]], cfg: DictConfig
) -> float | None:
    """``train_fn(cfg)``'s optimised metric; in a multirun a failure is recorded instead of raised."""
    if not in_multirun():
        return train_fn(cfg)[0]
    try:
        return train_fn(cfg)[0]
    except Exception as error:
        hydra_cfg = HydraConfig.get()
        try:
            path: Path | str = record_failure(
                hydra_cfg.runtime.output_dir, error, list(hydra_cfg.overrides.task)
            )
        except DiskWriteError as unwritten:  # a full disk: the log line is the record
            path = f"no failed.json ({unwritten})"
        log.exception(
            "trial %s failed (%s: %s); recorded in %s, the sweep goes on",
            hydra_cfg.job.num,
            type(error).__name__,
            error,
            path,
        )
        return cfg.get("failed_trial_value")


# ---- the summary table -----------------------------------------------------------------------
def find_trial_dirs(sweep_dir: str | Path) -> list[Path]:
    """The trial dirs of a multirun dir: every dir below it with Hydra's ``.hydra/overrides.yaml``."""
    sweep_dir = Path(sweep_dir)
    dirs = {p.parent.parent for p in sweep_dir.glob(f"**/{HYDRA_DIR}/{OVERRIDES}")}
    return sorted((d for d in dirs if d != sweep_dir), key=lambda d: _sort_key(sweep_dir, d))


def _sort_key(sweep_dir: Path, trial_dir: Path) -> tuple[Any, ...]:
    number = hydra_value(trial_dir, "hydra.job.num")
    parts = trial_dir.relative_to(sweep_dir).parts
    return (
        number if isinstance(number, int) else math.inf,
        tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts),
    )


def leaderboard_columns() -> list[str]:
    """The compare leaderboard's columns, less rank/run/status and timing (a sweep's trials are not timed)."""
    return [key for key, _ in COLUMNS if key not in ("rank", "run", "status", "images_per_second")]


def trial_row(trial_dir: str | Path, sweep_dir: str | Path | None = None) -> dict[str, Any]:
    """One summary row: the trial's number, status, overrides, and the leaderboard columns of
    ``python compare.py`` (recipe, accuracies, loss, F1, parameters, checkpoint size, training time)."""
    trial_dir = Path(trial_dir)
    run = leaderboard_row(trial_dir, throughput=False)
    overrides = read_overrides(trial_dir)
    number = hydra_value(trial_dir, "hydra.job.num")
    row: dict[str, Any] = {
        "trial": number if number is not None else trial_dir.name,
        "status": run["status"],
        "overrides": " ".join(overrides),
        "_overrides": overrides,
        **{column: run.get(column) for column in leaderboard_columns()},
    }
    config = read_config(trial_dir)
    optimized = config and OmegaConf.select(config, "optimized_metric", throw_on_resolution_failure=False)
    if optimized and optimized.replace("/", "_") not in row:
        row[optimized] = read_json(trial_dir / METRICS).get(optimized)
    row["error"] = run["error"]
    row["dir"] = str(trial_dir.relative_to(sweep_dir)) if sweep_dir else str(trial_dir)
    return row


def sweep_rows(sweep_dir: str | Path, cache: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Rows of every trial; ``cache`` keeps the rows of finished trials (ok or failed) between calls."""
    rows = []
    for trial_dir in find_trial_dirs(sweep_dir):
        key = str(trial_dir)
        row = cache.get(key) if cache is not None else None
        if row is None:
            row = trial_row(trial_dir, sweep_dir)
            if cache is not None and row["status"] != "incomplete":
                cache[key] = row
        rows.append(row)
    return rows


def _columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    columns = ["trial", "status", "overrides", *leaderboard_columns(), "error", "dir"]
    extra = [k for r in rows for k in r if k not in columns and not k.startswith("_")]
    for key in dict.fromkeys(extra):  # an optimized_metric outside the leaderboard's columns
        columns.insert(columns.index("error"), key)
    return columns


def write_sweep_summary(
    sweep_dir: str | Path, name: str = SUMMARY, cache: dict[str, dict[str, Any]] | None = None
) -> tuple[Path, Path, str]:
    """Write ``<name>.csv`` and ``<name>.md`` into ``sweep_dir``; returns both paths and the table."""
    sweep_dir = Path(sweep_dir)
    rows = sweep_rows(sweep_dir, cache)
    columns = _columns(rows)
    csv_path, md_path = sweep_dir / f"{name}.csv", sweep_dir / f"{name}.md"
    with atomic_open(csv_path, "w", newline="") as handle:  # parallel trials rewrite it: never half a file
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "failed", "incomplete")}
    header = f"# Sweep {sweep_dir}\n\n{len(rows)} trials: " + ", ".join(
        f"{n} {s}" for s, n in counts.items() if n
    )
    best = _best(rows)
    if best is not None:
        header += f"; best by {best[0]}: trial {best[1]['trial']} ({best[1][best[0]]:.4f})"
    # The Markdown table shows what differs between trials; the overrides all trials share are listed once.
    split = [r["_overrides"] for r in rows]
    common = [o for o in split[0] if all(o in s for s in split[1:])] if len(split) > 1 else []
    shown = [
        {**r, "overrides": " ".join(o for o in s if o not in common)}
        for r, s in zip(rows, split, strict=True)
    ]
    if common:
        header += "\n\nevery trial: `" + " ".join(common) + "`"
    table = markdown_table(shown, [c for c in columns if c != "checkpoint"], missing="")
    write_text(md_path, f"{header}\n\n{table}\n")
    return csv_path, md_path, table


def _best(rows: Sequence[dict[str, Any]]) -> tuple[str, dict[str, Any]] | None:
    for metric in ("val_acc", "test_acc"):
        scored = [r for r in rows if r["status"] == "ok" and isinstance(r.get(metric), (int, float))]
        if scored:
            return metric, max(scored, key=lambda r: r[metric])
    return None


# ---- the Hydra callback ----------------------------------------------------------------------
def prepare_storage(storage: Any) -> None:
    """Create the directory of a ``sqlite:///path`` storage (SQLite does not create directories)."""
    if isinstance(storage, str) and storage.startswith("sqlite:///"):
        path = storage[len("sqlite:///") :]
        if path and path != ":memory:":
            Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)


class SweepSummary(Callback):
    """Writes ``summary.{csv,md}`` into the multirun dir after every trial and at the end of the sweep."""

    def __init__(self, name: str = SUMMARY) -> None:
        self.name = name
        self.sweep_dir: Path | None = None
        self.rows: dict[str, dict[str, Any]] = {}  # finished trials' rows, computed once

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.sweep_dir = Path(str(config.hydra.sweep.dir))
        prepare_storage(OmegaConf.select(config, "hydra.sweeper.storage", default=None))

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if self.sweep_dir is None or config.hydra.mode != RunMode.MULTIRUN:
            return
        trial_dir = Path(config.hydra.runtime.output_dir)
        error = getattr(job_return, "_return_value", None)
        if isinstance(error, BaseException) and not (trial_dir / FAILED).exists():
            record_failure(trial_dir, error, list(config.hydra.overrides.task))  # raised past run_trial
        write_sweep_summary(self.sweep_dir, self.name, self.rows)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = self.sweep_dir or Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            return
        csv_path, md_path, table = write_sweep_summary(sweep_dir, self.name, self.rows)
        log.info("sweep summary: %s, %s\n%s", csv_path, md_path, table)
        statuses = [row["status"] for row in sweep_rows(sweep_dir, self.rows)]
        failed = statuses.count("failed")
        if statuses and failed == len(statuses):
            # Exit non-zero (SystemExit passes Hydra's callback guard) so scripts and CI see it.
            print(
                f"error: all {failed} trials of the sweep failed (see failed.json in each trial dir and {md_path})",
                file=sys.stderr,
                flush=True,
            )
            sys.exit(1)
        if failed:
            log.warning("%d of %d trials failed (see %s)", failed, len(statuses), md_path)

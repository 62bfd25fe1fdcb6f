"""``python train.py`` / ``foodvision-train``: one training run, or a Hydra multirun (:mod:`foodvision.training.fit`).

A user error (bad data, config or checkpoint) ends a single run with one ``error:`` line and exit code 1;
``HYDRA_FULL_ERROR=1`` shows the traceback instead. In a multirun a failing trial is logged and written to
``<trial dir>/failed.json`` and the sweep goes on (:func:`foodvision.runs.sweep.run_trial`)."""

from __future__ import annotations

import logging
import os
import sys

import hydra
from omegaconf import DictConfig

from foodvision.atomic import disk_error, quiet_thread_disk_errors
from foodvision.cli import EXPECTED_ERRORS
from foodvision.config import CONFIG_DIR
from foodvision.runs.sweep import run_trial
from foodvision.training.fit import train

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Train with ``cfg``; returns the optimized metric for a Hydra sweeper."""
    background = quiet_thread_disk_errors(lambda: (cfg.paths.output_dir,))
    try:
        value = run_trial(train, cfg)
    except EXPECTED_ERRORS as error:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {error}\n(HYDRA_FULL_ERROR=1 shows the traceback)", file=sys.stderr, flush=True)
        sys.exit(1)
    except Exception as error:
        # A full disk, a read-only or deleted run dir: wherever the write was (ours, Lightning's loggers,
        # a C++ writer), one line naming the file.
        disk = disk_error(error, (cfg.paths.output_dir,))
        if disk is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {disk}\n(HYDRA_FULL_ERROR=1 shows the traceback)", file=sys.stderr, flush=True)
        sys.exit(1)
    for disk in background[:1]:  # a logger thread died and the run did not meet the error again
        log.warning("a background writer stopped: %s", disk)
    return value


if __name__ == "__main__":
    main()

"""``python compare.py`` / ``foodvision-compare``: a leaderboard of training runs (:mod:`foodvision.runs.compare`)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from foodvision.cli import run_tool
from foodvision.config import CONFIG_DIR
from foodvision.runs.compare import compare


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="compare")
def main(cfg: DictConfig) -> None:
    run_tool(compare, cfg)


if __name__ == "__main__":
    main()

"""``python eval.py`` / ``foodvision-eval``: evaluate a trained model (:mod:`foodvision.evaluation.evaluate`)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from foodvision.cli import run_tool
from foodvision.config import CONFIG_DIR
from foodvision.evaluation.evaluate import evaluate


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    run_tool(evaluate, cfg)


if __name__ == "__main__":
    main()

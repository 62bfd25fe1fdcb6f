"""``python serve.py`` / ``foodvision-serve``: the web demo of a trained model (:mod:`foodvision.app.demo`)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from foodvision.app.demo import serve
from foodvision.cli import run_tool
from foodvision.config import CONFIG_DIR


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="serve")
def main(cfg: DictConfig) -> None:
    run_tool(serve, cfg)


if __name__ == "__main__":
    main()

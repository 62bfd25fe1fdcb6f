"""``python predict.py`` / ``foodvision-predict``: top-k classes of photos (:mod:`foodvision.inference.predict`).

Exit code 0 when every input was predicted, 1 when some failed, 2 when nothing could be (a known error
included)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from foodvision.cli import run_tool
from foodvision.config import CONFIG_DIR
from foodvision.inference.predict import run


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="predict")
def main(cfg: DictConfig) -> None:
    run_tool(
        run, cfg
    )  # run() turns known errors into its own exit code 2; run_tool exits with what it returns


if __name__ == "__main__":
    main()

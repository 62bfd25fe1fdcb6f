"""``python audit.py`` / ``foodvision-audit``: what is wrong with a data set (:mod:`foodvision.audit.tool`)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from foodvision.audit.tool import run_audit
from foodvision.cli import run_tool
from foodvision.config import CONFIG_DIR


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="audit")
def main(cfg: DictConfig) -> None:
    run_tool(run_audit, cfg)


if __name__ == "__main__":
    main()

"""``python export.py`` / ``foodvision-export``: a checkpoint as one model file (``format=onnx|torchscript``,
:mod:`foodvision.inference.export`), with its INT8 model (``quantize=int8``, :mod:`foodvision.inference.quantize`),
or as a standalone app folder (``format=app``, :mod:`foodvision.app.package`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from foodvision.app.package import export_app
from foodvision.cli import required, run_tool
from foodvision.config import CONFIG_DIR
from foodvision.inference.export import check_format, default_output, export_model
from foodvision.inference.quantize import export_int8


def export(cfg: DictConfig) -> dict[str, Any]:
    """What ``export.py`` writes for ``cfg`` (conf/export.yaml)."""
    if cfg.get("quantize"):  # this export in float32, then its INT8 model
        return export_int8(cfg, export_model)
    if check_format(cfg) == "app":
        ckpt_path = Path(required(cfg, "ckpt_path", "ckpt_path=<run>/checkpoints/last.ckpt")).expanduser()
        output = Path(cfg.output).expanduser() if cfg.get("output") else default_output(ckpt_path, "app")
        return export_app(cfg, ckpt_path, output)
    return export_model(cfg)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="export")
def main(cfg: DictConfig) -> None:
    run_tool(export, cfg)


if __name__ == "__main__":
    main()

"""The command-line entry points (one module per tool: ``train``, ``eval``, ``predict``, ``export``, ``serve``,
``compare``, ``audit``, ``sweep``; the ``foodvision-<tool>`` console scripts and the repository's ``<tool>.py``)
and their shared plumbing: required keys, and known problems ending in one ``error: ...`` line."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, OmegaConf

from foodvision.atomic import disk_error
from foodvision.data.images import BadImageError
from foodvision.data.sources import DataLayoutError
from foodvision.errors import ToolError

# ToolError covers its subclasses: ModelLoadError, ConfigError, PretrainedWeightsError (no offline weights), ...
EXPECTED_ERRORS = (ToolError, DataLayoutError, BadImageError)


def required(cfg: DictConfig, key: str, example: str) -> Any:
    """``cfg[key]``, or a ToolError saying how to set it when it is missing (``???``) or empty."""
    if OmegaConf.is_missing(cfg, key) or cfg.get(key) in (None, "", []):
        raise ToolError(f"{key} is required, e.g. {example}")
    return cfg[key]


def run_tool(function: Callable[[DictConfig], Any], cfg: DictConfig, error_code: int = 1) -> None:
    """Run a tool; known problems end in one ``error: ...`` line and ``error_code``; an int it returns is the
    exit code."""
    try:
        code = function(cfg)
    except EXPECTED_ERRORS as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(error_code)
    except Exception as error:  # a full disk or read-only folder met by a writer that is not ours
        disk = disk_error(error)
        if disk is None:
            raise
        print(f"error: {disk}", file=sys.stderr, flush=True)
        sys.exit(error_code)
    if isinstance(code, int) and not isinstance(code, bool) and code:
        sys.exit(code)

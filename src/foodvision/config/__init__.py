"""Where the Hydra config lives: the repository's ``conf/`` in a checkout (and an editable install), or the
copy shipped inside the wheel as ``foodvision/conf`` (pyproject's package-data), so that an installed
``foodvision-train`` finds it from any directory."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parents[1]
_CHECKOUT_CONF = _PACKAGE.parents[1] / "conf"  # src/foodvision -> the repository root


def config_dir() -> str:
    """The config directory: the checkout's ``conf/`` when there is one, else the packaged copy."""
    if (_CHECKOUT_CONF / "train.yaml").is_file():
        return str(_CHECKOUT_CONF)
    return str(_PACKAGE / "conf")


CONFIG_DIR = config_dir()

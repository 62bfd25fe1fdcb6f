"""Where the Hydra config lives: the repository's ``conf/`` in a checkout (and an editable install), or the
copy shipped inside the wheel as ``foodvision/conf`` (setup.py maps the package ``foodvision.conf`` to
``conf/``), so that an installed ``foodvision-train`` finds it from any directory."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parents[1]  # .../foodvision
_PACKAGED_CONF = _PACKAGE / "conf"  # an installed wheel
_CHECKOUT = _PACKAGE.parents[1]  # a checkout's src/foodvision -> the repository root


def config_dir() -> str:
    """The config directory (absolute): the checkout's ``conf/`` when this module is a checkout's
    ``src/foodvision``, else the packaged copy, so an installed wheel never picks up a stray ``conf/``."""
    checkout_conf = _CHECKOUT / "conf"
    in_checkout = _PACKAGE.parent.name == "src" and (_CHECKOUT / "pyproject.toml").is_file()
    if in_checkout and (checkout_conf / "train.yaml").is_file():
        return str(checkout_conf)
    return str(_PACKAGED_CONF)


CONFIG_DIR = config_dir()

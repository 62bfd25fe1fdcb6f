"""Which data a run reads, and which data a tool working on a run reads: a Food-101 ``data.root`` left null
is looked for in the usual places, every root is made absolute (so the run's config.yaml names its data
wherever it is read: train, eval, audit, resume), and eval/export/serve/quantize take the run's own data
section, read as data (never instantiated), with the command line's keys on top."""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from foodvision.config import CONFIG_DIR
from foodvision.data.datamodule import FoodDataModule
from foodvision.data.sources import DataLayoutError, default_food101_root
from foodvision.data.splits import SPLITS
from foodvision.errors import ToolError

log = logging.getLogger(__name__)


def normalized_root(root: Any) -> Any:
    """A data root as an absolute path (``~`` expanded; relative to the working directory); an unresolved
    interpolation (``${oc.env:...}``) stays as written."""
    if isinstance(root, str) and "${" not in root:
        return os.path.abspath(os.path.expanduser(root))
    return root


def food101_candidates(root_dir: str) -> list[str | Path]:
    """Where a null Food-101 ``data.root`` is looked for: $FOOD101_ROOT, data/food-101,
    ../shared/data/food101-mini/food-101."""
    base = Path(root_dir)
    return [
        os.environ.get("FOOD101_ROOT", ""),
        base / "data" / "food-101",
        base / "../shared/data/food101-mini/food-101",
    ]


def data_root_of(data: Mapping[str, Any], root_dir: str) -> Any:
    """The data root a run with these ``data`` settings reads: ``data.root``, else (Food-101) the default
    one (:func:`food101_candidates`; None when there is none)."""
    root = data.get("root")
    if data.get("source") != "food101" or root is not None or data.get("download"):
        return root
    try:
        return str(default_food101_root(food101_candidates(root_dir)).resolve())
    except DataLayoutError:
        return None


def resolve_data_root(cfg: DictConfig) -> None:
    """A null Food-101 data.root becomes the default one (:func:`food101_candidates`), or an error saying
    how to get it; a data.root is made absolute, so the run's config.yaml names its data wherever it is read."""
    if OmegaConf.is_missing(cfg.data, "root"):
        return
    if cfg.data.source == "food101" and cfg.data.root is None and not cfg.data.get("download"):
        cfg.data.root = str(default_food101_root(food101_candidates(cfg.paths.root_dir)).resolve())
    if not OmegaConf.is_interpolation(cfg.data, "root"):  # ${...} roots resolve where they are read
        cfg.data.root = normalized_root(cfg.data.root)


# ---- the data of a tool working on a run ----------------------------------------------------------------
SPLIT_ALIASES = {"validation": "val", "valid": "val"}
# Keys of the `data` block of conf/eval.yaml that are eval options, not FoodDataModule arguments.
EVAL_ONLY_DATA_KEYS = ("split",)


def normalise_split(split: str) -> str:
    split = SPLIT_ALIASES.get(str(split), str(split))
    if split not in SPLITS:
        raise ToolError(f"data.split must be one of {', '.join(SPLITS)} (or validation), got {split!r}")
    return split


def load_run_config(path: Path) -> DictConfig:
    """A run's stored ``config.yaml``, as data: a ToolError naming the file when it is not a YAML mapping."""
    try:
        loaded = OmegaConf.load(path)
    except Exception as error:  # noqa: BLE001 - yaml and omegaconf raise many types for a damaged file
        raise ToolError(f"cannot read {path}: {type(error).__name__}: {error}".splitlines()[0]) from None
    if not isinstance(loaded, DictConfig) or not isinstance(loaded.get("data"), DictConfig):
        raise ToolError(f"{path} is not a foodvision run config (it has no data section)")
    return loaded


def reject_targets(data: Any, where: str, key: str = "data") -> None:
    """A ToolError naming the first ``_target_`` in ``data`` other than ``data._target_`` naming
    FoodDataModule. A stored config (a downloaded run's) is read as data: foodvision builds FoodDataModule
    itself and never lets a config choose a callable (``pathlib.Path.write_text``, ...)."""
    if isinstance(data, Mapping):
        for name, value in data.items():
            path = f"{key}.{name}"
            if name == "_target_":
                if key == "data" and isinstance(value, str) and value.split(".")[0] == "foodvision":
                    if value.rsplit(".", 1)[-1] == FoodDataModule.__name__:
                        continue
                raise ToolError(
                    f"{where}: {path}={value!r} is refused: foodvision reads a run's config as data and never "
                    f"creates objects a config names; delete {path} (or evaluate with data=imagefolder "
                    "data.root=...)"
                )
            reject_targets(value, where, path)
    elif isinstance(data, (list, tuple)):
        for index, value in enumerate(data):
            reject_targets(value, where, f"{key}[{index}]")


def resolve_eval_data(cfg: DictConfig, run_dir: Path | None) -> tuple[dict[str, Any], str]:
    """FoodDataModule arguments and where they came from.

    ``data=<group>`` on the command line: that group. Otherwise the run's ``config.yaml`` data section,
    else ``conf/data/food101.yaml``; the non-null keys of this config's ``data`` block override either.
    """
    user = OmegaConf.to_container(cfg.data, resolve=False)
    chosen_group = "_target_" in user
    run_config = run_dir / "config.yaml" if run_dir is not None else None
    if chosen_group:
        container = OmegaConf.create({"seed": cfg.seed, "paths": cfg.paths, "data": cfg.data})
        origin = "data config from the command line"
    elif run_config is not None and run_config.is_file():
        container = load_run_config(run_config)
        origin = f"the run's data ({run_config})"
        for key, value in user.items():
            if value is not None and key not in EVAL_ONLY_DATA_KEYS:
                container.data[key] = value
        # A run's config names where it wrote; an eval writes its image-check verdicts where this tool does.
        container.data.cache_dir = OmegaConf.select(cfg, "paths.cache_dir", default=None)
    else:
        container = OmegaConf.create(
            {
                "seed": cfg.seed,
                "paths": cfg.paths,
                "data": OmegaConf.load(Path(CONFIG_DIR) / "data" / "food101.yaml"),
            }
        )
        origin = "Food-101 default (no config.yaml next to the checkpoint)"
        for key, value in user.items():
            if value is not None and key not in EVAL_ONLY_DATA_KEYS:
                container.data[key] = value
    OmegaConf.set_struct(container, False)
    container.data.augment = None
    container.data.output_dir = None
    with open_dict(container):
        resolve_data_root(container)
    where = str(run_config) if origin.startswith("the run's") else "the data config"
    try:
        data = OmegaConf.to_container(container.data, resolve=True)
    except OmegaConfBaseException as error:  # an interpolation a stored config cannot resolve here
        raise ToolError(f"{where}: cannot read its data section: {error}".splitlines()[0]) from None
    reject_targets(data, where)
    for key in EVAL_ONLY_DATA_KEYS:
        data.pop(key, None)
    # A run's config.yaml may come from an older or newer foodvision: keep what FoodDataModule takes.
    accepted = set(inspect.signature(FoodDataModule.__init__).parameters) | {"_target_"}
    dropped = sorted(set(data) - accepted)
    if dropped:
        log.info("data options this version does not know, ignored: %s", ", ".join(dropped))
    return {k: v for k, v in data.items() if k in accepted}, origin

"""Shared fixtures: small generated image trees and configs composed the way train.py composes them."""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = str(ROOT / "conf")
SHARED_MINI = (ROOT / ".." / "shared" / "data" / "food101-mini" / "food-101").resolve()

COLOURS = [(200, 40, 40), (40, 160, 40), (40, 40, 200), (200, 200, 40), (160, 40, 160), (40, 180, 180)]


def make_image(
    path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (48, 40), seed: int = 0
) -> Path:
    """A noisy image dominated by ``colour`` with a class-coloured square, so classes are learnable."""
    rng = np.random.default_rng(seed)
    array = np.clip(rng.normal(0, 30, (size[1], size[0], 3)) + np.array(colour), 0, 255).astype(np.uint8)
    array[size[1] // 4 : size[1] // 2, size[0] // 4 : size[0] // 2] = 255 - np.array(colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def make_class_tree(
    root: Path, classes: Sequence[str], per_class: int, start_seed: int = 0, ext: str = ".jpg"
) -> dict[str, list[Path]]:
    files: dict[str, list[Path]] = {}
    for index, name in enumerate(classes):
        colour = COLOURS[index % len(COLOURS)]
        files[name] = [
            make_image(root / name / f"{name}_{i:03d}{ext}", colour, seed=start_seed + 1000 * index + i)
            for i in range(per_class)
        ]
    return files


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """train/validation/test, three classes: 12/4/4 images each."""
    root = tmp_path / "food10"
    classes = ["apple_pie", "baklava", "bibimbap"]
    for split, count, seed in (("train", 12, 0), ("validation", 4, 100), ("test", 4, 200)):
        make_class_tree(root / split, classes, count, start_seed=seed)
    return root


@pytest.fixture
def flat_folder(tmp_path: Path) -> Path:
    """One flat class-per-folder tree (no split folders), four classes of 20 images."""
    root = tmp_path / "flat"
    make_class_tree(root, ["a", "b", "c", "d"], 20)
    return root


@pytest.fixture
def compose_train(tmp_path: Path) -> Callable[..., DictConfig]:
    """Compose conf/train.yaml with test-friendly overrides (tiny images, no workers, tmp dirs)."""

    def _compose(*overrides: str, root: Path | None = None) -> DictConfig:
        GlobalHydra.instance().clear()
        base = [
            f"paths.root_dir={tmp_path}",
            f"paths.output_dir={tmp_path / 'run'}",
            "data.image_size=32",
            "data.batch_size=8",
            "data.eval_batch_size=16",
            "data.num_workers=0",
            "trainer.max_epochs=1",
            "~callbacks.progress_bar",
            "+trainer.enable_progress_bar=false",
            "+trainer.enable_model_summary=false",
        ]
        if root is not None:
            base += ["data=imagefolder", f"data.root={root}"]
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            return compose("train", overrides=base + list(overrides))

    yield _compose
    GlobalHydra.instance().clear()


@pytest.fixture(autouse=True)
def _quiet_and_seeded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PYTHONHASHSEED", "0")
    random.seed(0)
    os.environ.setdefault("TQDM_DISABLE", "1")


@dataclass(frozen=True)
class TinyRun:
    """A finished training run: its generated data tree, run dir and best checkpoint."""

    data_root: Path
    run_dir: Path
    checkpoint: Path
    classes: tuple[str, ...]


# The tiny run's model and data settings (other tests train runs of the same size with them).
TINY_RUN_SETTINGS = (
    "data=imagefolder",
    "experiment=scratch_baseline",
    "model.scratch.widths=[8,16]",
    "data.image_size=32",
    "data.batch_size=8",
    "data.eval_batch_size=32",
    "data.num_workers=0",
    "trainer.precision=32-true",
    "~callbacks.progress_bar",
    "+trainer.enable_progress_bar=false",
    "+trainer.enable_model_summary=false",
)
TINY_CLASSES = ("apple_pie", "baklava", "bibimbap", "churros", "donuts", "falafel")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    """One tiny scratch CNN trained once per session (6 classes, 32 px, 2 epochs, float32) through
    `foodvision.training.fit.train`, for the evaluate/predict/compare/export tests. Treat it as read-only."""
    from foodvision.training.fit import train

    base = tmp_path_factory.mktemp("tiny_run")
    data_root = base / "food6"
    for split, count, seed in (("train", 8, 0), ("validation", 3, 100), ("test", 4, 200)):
        make_class_tree(data_root / split, TINY_CLASSES, count, start_seed=seed)
    run_dir = base / "run"
    overrides = [
        f"paths.root_dir={base}",
        f"paths.output_dir={run_dir}",
        *TINY_RUN_SETTINGS,
        f"data.root={data_root}",
        "trainer.max_epochs=2",
        "trainer.log_every_n_steps=1",
        "optimizer.lr=3e-3",
    ]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose("train", overrides=overrides)
    finally:
        GlobalHydra.instance().clear()
    _, metrics = train(cfg)
    return TinyRun(data_root, run_dir, Path(metrics["best_checkpoint"]), TINY_CLASSES)


def compose_tool(name: str, *overrides: str) -> DictConfig:
    """Compose conf/<name>.yaml (eval, predict, compare, export) the way its root script does."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            quiet = ["progress=false"] if name in ("eval", "predict") else []
            return compose(name, overrides=[*quiet, *overrides])
    finally:
        GlobalHydra.instance().clear()

"""Cached backbone outputs are explicit model inputs, and validation on them measures the same function as
evaluation on images (test-time flip included); a run's result does not depend on a cold or warm cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from foodvision.evaluation.evaluate import evaluate
from foodvision.training.fit import train

from .conftest import compose_tool

RECIPE = (
    "model=mobilenetv2_ft",
    "model.pretrained=false",
    "model.test_time_flip=true",
    "data.image_size=64",
    "callbacks.finetune.stage1_epochs=1",
    "trainer.max_epochs=2",
    "trainer.precision=32-true",
    "test=false",
)


@pytest.fixture
def cached_run(compose_train, image_folder: Path, tmp_path: Path):
    def run(name: str, *overrides: str) -> dict:
        cfg = compose_train(
            *RECIPE, f"paths.output_dir={tmp_path / name}", f"paths.cache_dir={tmp_path / 'cache'}", *overrides,
            root=image_folder,
        )  # fmt: skip
        return train(cfg)[1]

    return run


def test_logged_val_equals_eval_on_images_with_test_time_flip(cached_run, tmp_path: Path) -> None:
    """Stage 2 validates on cached blocks.0-4 maps of the photos and of their mirror images; eval.py runs
    the whole network on the photos (flip inside the model): the same accuracy and loss."""
    metrics = cached_run("a")
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    assert any("val-prefix5-flip" in Path(p).name for p in Path(tmp_path / "cache" / "features").iterdir())
    for engine in ("torch", "onnxruntime"):
        result = evaluate(
            compose_tool(
                "eval", f"ckpt_path={last}", "data.split=val", "precision=32", f"engine={engine}",
                f"output_dir={tmp_path / ('eval-' + engine)}",
            )
        )  # fmt: skip
        assert result["val/acc"] == pytest.approx(metrics["val/acc"], abs=1e-4)
        assert result["val/loss"] == pytest.approx(metrics["val/loss"], abs=1e-4)


def test_cold_and_warm_cache_give_the_same_run(cached_run) -> None:
    cold = cached_run("cold")
    warm = cached_run("warm")  # every feature file now comes from the cache
    for key in ("val/acc", "val/loss", "train/acc", "train/loss"):
        assert warm[key] == pytest.approx(cold[key], abs=1e-6), key

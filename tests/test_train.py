"""End-to-end training through the composed Hydra config, on generated and real photos."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from foodvision.config.check import ConfigError
from foodvision.errors import ModelLoadError
from foodvision.training.fit import train

from .conftest import SHARED_MINI


def test_fast_dev_run_scratch_cnn(compose_train, image_folder: Path) -> None:
    cfg = compose_train("experiment=scratch_baseline", "debug=fdr", "data.image_size=32", root=image_folder)
    _, metrics = train(cfg)
    assert 0.0 <= metrics["test/acc"] <= 1.0


def test_fast_dev_run_timm_backbone(compose_train, image_folder: Path) -> None:
    cfg = compose_train("model=mobilenetv2_ft", "debug=fdr", root=image_folder)
    _, metrics = train(cfg)
    assert "test/f1_macro" in metrics


def test_csv_logger_records_every_epoch_and_the_final_metrics(compose_train, image_folder: Path) -> None:
    cfg = compose_train(
        "experiment=scratch_baseline", "logger=csv", "trainer.max_epochs=2", root=image_folder
    )
    _, metrics = train(cfg)
    rows = (Path(cfg.paths.output_dir) / "csv" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert "val/acc" in header and "hp/test/acc" in header
    assert len(rows) > 2 and "test/acc" in metrics


def test_run_dir_has_checkpoint_events_config_and_metrics(
    compose_train, image_folder: Path, tmp_path: Path
) -> None:
    cfg = compose_train(
        "experiment=scratch_baseline",
        "trainer.max_epochs=2",
        "optimizer.lr=3e-3",
        "model.scratch.widths=[8,16]",
        root=image_folder,
    )
    value, metrics = train(cfg)
    run = tmp_path / "run"
    assert value == pytest.approx(metrics["val/acc"])
    saved = json.loads((run / "metrics.json").read_text())
    for key in ("test/acc", "test/loss", "test/f1_macro", "test_images", "best_checkpoint"):
        assert key in saved
    # the test after fitting is eval.py's: its files, in eval-test/
    tested = run / "eval-test"
    assert saved["eval_dir"] == str(tested)
    assert json.loads((tested / "metrics.json").read_text())["test/acc"] == saved["test/acc"]
    per_class = (tested / "per_class.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in per_class[1:]] == ["apple_pie", "baklava", "bibimbap"]
    assert saved["test_images"] == 12  # 4 test images x 3 classes
    for name in ("confusion_matrix.png", "predictions.csv", "report.html"):
        assert (tested / name).is_file(), name
    assert (run / "config.yaml").is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file()
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["foodvision"]["class_names"] == ["apple_pie", "baklava", "bibimbap"]
    assert checkpoint["foodvision"]["preprocessing"]["image_size"] == 32

    events = EventAccumulator(str(run), size_guidance={"images": 0, "scalars": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/acc", "val/loss", "val/acc", "val/f1_macro", "test/acc"} <= scalars
    assert any(tag.startswith("lr-") for tag in scalars)
    assert len(events.Scalars("val/acc")) == 2  # one point per epoch
    assert "val/confusion_matrix" in events.Tags()["images"]


@pytest.mark.parametrize("test_time_flip", [False, True])
def test_testing_through_onnxruntime_matches_torch(
    compose_train, image_folder: Path, tmp_path: Path, test_time_flip: bool
) -> None:
    """``eval.engine=auto`` tests through ONNX Runtime on a CPU: the same metrics as PyTorch."""
    results = {}
    for engine in ("torch", "onnxruntime"):
        cfg = compose_train(
            "experiment=scratch_baseline",
            "optimizer.lr=3e-3",
            "model.scratch.widths=[8,16]",
            f"+model.test_time_flip={test_time_flip}",
            f"eval.engine={engine}",
            "trainer.precision=32-true",  # auto is bf16 on CPUs with AMX: compare float32 with float32
            f"paths.output_dir={tmp_path / engine}",
            root=image_folder,
        )
        results[engine] = train(cfg)[1]
        assert results[engine]["test_engine"] == engine
    assert results["torch"]["test/acc"] == results["onnxruntime"]["test/acc"]
    assert results["torch"]["test/loss"] == pytest.approx(results["onnxruntime"]["test/loss"], rel=1e-4)


def test_resume_continues_from_last_checkpoint(compose_train, image_folder: Path, tmp_path: Path) -> None:
    common = ("experiment=scratch_baseline", "model.scratch.widths=[8]", "test=false")
    interrupted = tmp_path / "lightning_logs" / "runs" / "interrupted"
    train(
        compose_train(*common, "trainer.max_epochs=1", f"paths.output_dir={interrupted}", root=image_folder)
    )
    first = torch.load(interrupted / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert first["epoch"] == 0
    (interrupted / "metrics.json").unlink()  # killed after its last.ckpt: a finished run is never resumed

    # A new invocation (new run dir) with ckpt_path=last writes on in the interrupted run's dir.
    cfg = compose_train(*common, "trainer.max_epochs=3", "ckpt_path=last", root=image_folder)
    cfg.paths.output_dir = str(tmp_path / "elsewhere")
    train(cfg)
    resumed = torch.load(interrupted / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert resumed["epoch"] == 2
    assert resumed["global_step"] == 3 * first["global_step"]  # two more epochs, not three
    assert not (tmp_path / "elsewhere" / "checkpoints").exists()


def test_resume_from_another_model_is_refused_clearly(
    compose_train, image_folder: Path, tmp_path: Path
) -> None:
    common = ("model.scratch.widths=[8]", "test=false", "trainer.max_epochs=1")
    train(compose_train("experiment=scratch_baseline", *common, root=image_folder))
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    cfg = compose_train("experiment=scratch_large", "test=false", f"ckpt_path={last}", root=image_folder)
    with pytest.raises(ModelLoadError, match="model.scratch: checkpoint"):
        train(cfg)


def test_missing_checkpoint_is_a_clear_error(compose_train, image_folder: Path) -> None:
    cfg = compose_train("experiment=scratch_baseline", "ckpt_path=/nope/last.ckpt", root=image_folder)
    with pytest.raises(ConfigError, match="/nope/last.ckpt"):
        train(cfg)


@pytest.mark.skipif(not SHARED_MINI.is_dir(), reason="needs ../shared/data/food101-mini")
def test_real_photos_smoke(compose_train) -> None:
    """A few batches of real Food-101 photos through the default recipe at a small size."""
    cfg = compose_train(
        f"data.root={SHARED_MINI}",
        "debug=limit",
        "data.image_size=64",
        "trainer.max_epochs=2",
        "callbacks.finetune.stage1_epochs=1",
        "data.max_per_class.test=4",
    )
    _, metrics = train(cfg)
    assert metrics["test/acc"] >= 0.0
    assert metrics["test_images"] == 10 * 4  # debug=limit: 4 test photos per class

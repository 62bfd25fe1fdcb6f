"""What users of fastai, Ultralytics and Keras expect (#25): the learning-rate finder, EMA weights, MixUp and
CutMix, an INT8 export, a time budget through both fine-tuning stages, and the batch-size finder's CPU rule."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from foodvision.cli.export import export
from foodvision.config.check import ConfigError
from foodvision.data.datamodule import FoodDataModule
from foodvision.data.mixing import BatchMixer
from foodvision.evaluation.evaluate import evaluate
from foodvision.inference.checkpoints import META_KEY, load_checkpoint_model
from foodvision.inference.predict import predict
from foodvision.inference.predictor import Predictor
from foodvision.training.fit import train
from foodvision.training.tuning import LIGHTNING_LOSS_BETA, raw_losses, suggest_lr

from .conftest import TinyRun, compose_tool

# The default recipe (MobileNetV2, two stages, feature cache) shrunk to the generated tree, in float32.
TWO_STAGE = (
    "callbacks.finetune.unfreeze=blocks.5",
    "callbacks.finetune.stage1_epochs=1",
    "trainer.max_epochs=2",
    "trainer.precision=32-true",
    "test=false",
)


# ---- learning-rate finder ------------------------------------------------------------------------------
def lightning_smoothing(losses: list[float], beta: float = LIGHTNING_LOSS_BETA) -> list[float]:
    """The curve Lightning's finder records (its _LRCallback): a bias-corrected moving average."""
    average, recorded = 0.0, []
    for step, loss in enumerate(losses, start=1):
        average = beta * average + (1 - beta) * loss
        recorded.append(average / (1 - beta ** (step + 1)))
    return recorded


def test_suggestion_undoes_the_lag_and_stays_before_divergence() -> None:
    lrs = list(np.logspace(-6, 0, 100))
    log_lr = np.log10(lrs)
    rng = np.random.default_rng(0)
    # a plateau, a descent steepest at 1e-3, a minimum near 1e-2, then divergence; plus noise
    losses = 2.0 - 1.5 / (1 + np.exp(-(log_lr + 3) * 3)) + np.where(log_lr > -2, (log_lr + 2) ** 2 * 4, 0)
    noisy = losses + rng.normal(0, 0.03, len(losses))
    noisy[85] = 0.2  # a one-step dip while diverging (seen on food101-mini) must not become the "minimum"
    noisy = list(noisy)
    recorded = lightning_smoothing(noisy)
    np.testing.assert_allclose(raw_losses(recorded), noisy, rtol=1e-6, atol=1e-6)
    result = suggest_lr(lrs, recorded)
    assert 10**-3.6 <= result["suggested_lr"] <= 10**-2.4  # the steepest descent, not the lagged one
    assert result["suggested_lr"] < result["lowest_loss_lr"] < result["divergence_lr"] < 0.1


def test_lr_finder_writes_curve_and_suggestion_inside_the_swept_range(
    image_folder: Path, compose_train
) -> None:
    cfg = compose_train(
        "tune=lr_find", "tune.num_training=30", "tune.min_lr=1e-5", *TWO_STAGE, root=image_folder
    )
    value, result = train(cfg)
    run_dir = Path(result["run_dir"])
    saved = json.loads((run_dir / "lr_find.json").read_text())
    assert (run_dir / "lr_find.png").stat().st_size > 1000
    assert 1e-5 <= saved["suggested_lr"] <= 1.0
    assert saved["suggested_lr"] == result["suggested_lr"]
    assert saved["what"] == "stage 1: the head on cached features"
    assert len(saved["lr"]) == len(saved["smoothed_loss"]) >= 10
    assert saved["lr"] == sorted(saved["lr"])
    assert value is None and not (run_dir / "checkpoints").exists()  # without tune.apply nothing trains


def test_lr_finder_apply_trains_with_the_suggestion(image_folder: Path, compose_train) -> None:
    cfg = compose_train(
        "tune=lr_find",
        "tune.num_training=20",
        "tune.apply=true",
        "callbacks.finetune.unfreeze=none",
        root=image_folder,
    )
    _, metrics = train(cfg)
    run_dir = Path(metrics["run_dir"])
    suggested = json.loads((run_dir / "lr_find.json").read_text())["suggested_lr"]
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["optimizer"]["lr"] == pytest.approx(suggested)
    assert "test/acc" in metrics


def test_batch_size_finder_refuses_a_cpu_with_a_reason(image_folder: Path, compose_train) -> None:
    with pytest.raises(ConfigError, match="on a CPU memory is not the limit"):
        train(compose_train("tune=batch_size", *TWO_STAGE, root=image_folder))


# ---- EMA -----------------------------------------------------------------------------------------------
def test_ema_weights_differ_are_saved_resume_exactly_and_are_exported(
    image_folder: Path, compose_train, tmp_path: Path
) -> None:
    ema = ("callbacks.ema.enabled=true", "callbacks.ema.decay=0.6", "optimizer.lr=1e-2")
    common = (*TWO_STAGE, *ema, "trainer.max_epochs=3", "callbacks.finetune.stage1_epochs=1")
    straight = tmp_path / "straight"
    train(compose_train(*common, f"paths.output_dir={straight}", root=image_folder))
    last = torch.load(straight / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    averaged, trained = last["state_dict"], last["current_model_state"]
    head = [k for k in averaged if k.startswith("net.head.") and k.endswith("weight")]
    assert head and all(not torch.equal(averaged[k], trained[k]) for k in head)
    unfrozen = [
        k for k in averaged if k.startswith("net.backbone.blocks.6.") and k.endswith("conv_pw.weight")
    ]
    assert unfrozen and all(not torch.equal(averaged[k], trained[k]) for k in unfrozen)
    # what never trains is copied, not averaged: frozen blocks and frozen BatchNorm statistics, bit for bit
    frozen = [k for k in averaged if k.startswith(("net.backbone.blocks.0.", "net.backbone.conv_stem."))]
    statistics = [k for k in averaged if "running_" in k]
    assert frozen and statistics
    assert all(torch.equal(averaged[k], trained[k]) for k in frozen + statistics)
    best = next((straight / "checkpoints").glob("best-*.ckpt"))
    assert "current_model_state" in torch.load(best, map_location="cpu", weights_only=True)

    interrupted = tmp_path / "interrupted"
    train(
        compose_train(*common, "+trainer.max_steps=10", f"paths.output_dir={interrupted}", root=image_folder)
    )
    resume_from = interrupted / "checkpoints" / "last.ckpt"
    assert torch.load(resume_from, map_location="cpu", weights_only=True)["epoch"] == 1  # 5 batches an epoch
    train(
        compose_train(
            *common, f"ckpt_path={resume_from}", f"paths.output_dir={interrupted}", root=image_folder
        )
    )
    resumed = torch.load(resume_from, map_location="cpu", weights_only=True)
    for key in averaged:
        torch.testing.assert_close(resumed["state_dict"][key], averaged[key], rtol=0, atol=1e-6)
        torch.testing.assert_close(resumed["current_model_state"][key], trained[key], rtol=0, atol=1e-6)

    exported = tmp_path / "model.onnx"
    export(
        compose_tool(
            "export",
            f"ckpt_path={straight / 'checkpoints' / 'last.ckpt'}",
            "format=onnx",
            f"output={exported}",
        )
    )
    raw_ckpt = tmp_path / "raw.ckpt"
    torch.save({**last, "state_dict": trained}, raw_ckpt)
    ema_model, _, _ = load_checkpoint_model(straight / "checkpoints" / "last.ckpt")
    raw_model, _, _ = load_checkpoint_model(raw_ckpt)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected, raw = ema_model.float().eval()(images), raw_model.float().eval()(images)
    logits = Predictor(exported, device="cpu", precision="32").logits(images)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    assert (logits - raw).abs().max() > 1e-3


# ---- MixUp / CutMix ------------------------------------------------------------------------------------
def test_mixed_batches_keep_label_sums_at_one() -> None:
    torch.manual_seed(0)
    targets = torch.randint(0, 5, (8,))
    mixer = BatchMixer(5, mixup=0.4, cutmix=1.0, features=True)
    for _ in range(4):
        images, soft = mixer((torch.rand(8, 3, 16, 16), targets))
        assert images.shape == (8, 3, 16, 16) and soft.shape == (8, 5)
        torch.testing.assert_close(soft.sum(1), torch.ones(8))
    for inputs in (torch.randn(8, 32), torch.randn(8, 4, 6, 6)):  # pooled features, prefix maps
        mixed = mixer({"entry": "x", "inputs": inputs, "targets": targets})
        assert mixed["inputs"].shape == inputs.shape and not torch.equal(mixed["inputs"], inputs)
        torch.testing.assert_close(mixed["targets"].sum(1), torch.ones(8))
    untouched = {"entry": "pooled", "inputs": torch.randn(8, 32), "targets": targets}
    assert BatchMixer(5, mixup=0.4)(untouched) is untouched  # cached features mix only with mix_features


def test_mixing_images_turns_the_feature_cache_off_unless_features_are_mixed(image_folder: Path) -> None:
    def augmented(**augment: object) -> bool:
        return FoodDataModule(
            source="imagefolder", root=str(image_folder), augment={"name": "none", **augment}
        ).augmented

    assert not augmented() and augmented(mixup=0.2) and augmented(cutmix=1.0)
    assert not augmented(mixup=0.2, mix_features=True)


def test_training_with_mixup_cutmix_label_smoothing_and_class_weights(
    image_folder: Path, compose_train
) -> None:
    cfg = compose_train(
        "experiment=scratch_baseline",
        "model.scratch.widths=[8,16]",
        "augment.mixup=0.4",
        "augment.cutmix=1.0",
        "label_smoothing=0.1",
        "model.class_weights=auto",
        "trainer.max_epochs=2",
        "trainer.precision=32-true",
        root=image_folder,
    )
    _, metrics = train(cfg)
    assert 0.0 <= metrics["train/acc"] <= 1.0 and math.isfinite(metrics["train/loss"])
    assert 0.0 <= metrics["test/acc"] <= 1.0


# ---- INT8 ----------------------------------------------------------------------------------------------
def test_int8_export_agrees_with_float32_and_eval_predict_run_it(tiny_run: TinyRun, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    int8 = tmp_path / "model-int8.onnx"
    result = export(
        compose_tool(
            "export",
            f"ckpt_path={tiny_run.checkpoint}",
            "format=onnx",
            "quantize=int8",
            f"output={int8}",
            "calibration_images=40",
        )
    )
    quantization = result["quantization"]
    assert quantization["calibration_images"] == 40 and quantization["images"] == 18  # the val split
    assert quantization["top1_agreement"] >= 0.7
    assert abs(quantization["acc_int8"] - quantization["acc_float32"]) <= 0.25
    float32 = tmp_path / "model-int8-float32.onnx"
    assert float32.is_file() and int8.stat().st_size < float32.stat().st_size
    proto = onnx.load(str(int8))
    assert any(node.op_type == "QuantizeLinear" for node in proto.graph.node)
    meta = json.loads({p.key: p.value for p in proto.metadata_props}[META_KEY])
    assert meta["quantization"]["top1_agreement"] == quantization["top1_agreement"]
    assert Predictor(int8, device="cpu", precision="32").class_names == list(tiny_run.classes)

    data = ("data=imagefolder", f"data.root={tiny_run.data_root}")
    metrics = evaluate(compose_tool("eval", f"ckpt_path={int8}", f"output_dir={tmp_path / 'eval'}", *data))
    assert metrics["num_images"] == 24 and 0.0 <= metrics["test/acc"] <= 1.0
    code, rows, failed = predict(
        compose_tool("predict", f"ckpt_path={int8}", f"inputs=[{tiny_run.data_root / 'test'}]", "top_k=2")
    )
    assert code == 0 and not failed and len(rows) == 24


def test_int8_needs_onnx_format(tiny_run: TinyRun) -> None:
    with pytest.raises(Exception, match="quantize=int8 writes an ONNX model"):
        export(
            compose_tool("export", f"ckpt_path={tiny_run.checkpoint}", "format=torchscript", "quantize=int8")
        )


# ---- time budget ---------------------------------------------------------------------------------------
def test_max_time_reaches_stage2_and_stops_cleanly(image_folder: Path, compose_train) -> None:
    cfg = compose_train(
        "callbacks.finetune.unfreeze=blocks.5",
        "callbacks.finetune.stage1_epochs=999",
        "callbacks.finetune.stage1_share=0.3",
        "trainer.max_epochs=1000",
        "trainer.max_time=00:00:00:08",
        "trainer.precision=32-true",
        root=image_folder,
    )
    _, metrics = train(cfg)
    last = Path(metrics["run_dir"]) / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    switch = ckpt["callbacks"]["TwoStageFinetuning"]["switch_epoch"]
    assert switch is not None and 1 <= switch <= ckpt["epoch"] < 999  # stage 2 ran, time ended the run
    assert "test/acc" in metrics and (Path(metrics["run_dir"]) / "metrics.json").is_file()


def test_bad_values_name_their_key(compose_train) -> None:
    from foodvision.config.check import check_train_config

    cfg = compose_train("augment.mixup=-1", "callbacks.finetune.stage1_share=1.5", "callbacks.ema.decay=1")
    with pytest.raises(ConfigError) as error:
        check_train_config(cfg)
    for key in ("augment.mixup=-1", "callbacks.finetune.stage1_share=1.5", "callbacks.ema.decay=1"):
        assert key in str(error.value)

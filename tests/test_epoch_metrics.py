"""Per-epoch metrics are eval's implementation (foodvision.evaluation.metrics) and compute only what is logged
(issue #20): the per-class table and the confusion matrix go to TensorBoard only, so without a TensorBoard
logger no table is built. Under DDP the counts of every process are summed."""

from __future__ import annotations

import socket
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

import foodvision.training.module as module_code
from foodvision.data.cached import CachedInputs
from foodvision.evaluation.metrics import (
    RunningMetrics,
    classification_metrics,
    confusion_matrix,
    per_class_table,
)
from foodvision.models.classifier import POOLED
from foodvision.training.module import LitClassifier

from .ddp_metrics import count_half


def test_per_class_table_from_the_confusion_matrix_equals_torchmetrics() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 5, generator=generator)
    targets = torch.randint(0, 4, (200,), generator=generator)  # class 4 never true: undefined recall
    logits[:, 3] -= 10  # class 3 never predicted: undefined precision
    table = per_class_table(confusion_matrix(targets, logits.argmax(1), 5), list("abcde"))
    expected = {
        "precision": MulticlassPrecision(5, average=None)(logits, targets),
        "recall": MulticlassRecall(5, average=None)(logits, targets),
        "f1": MulticlassF1Score(5, average=None)(logits, targets),
    }
    for i, name in enumerate("abcde"):
        for key, values in expected.items():
            assert abs(table[name][key] - float(values[i])) < 1e-6, (name, key)
        assert table[name]["support"] == int((targets == i).sum())


def test_streamed_metrics_equal_torchmetrics_on_all_logits_at_once() -> None:
    """Every class present: accuracy, top-5 and macro averages as torchmetrics gives them for all logits."""
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(300, 7, generator=generator)
    targets = torch.arange(300) % 7
    totals = RunningMetrics(7)
    for rows in torch.split(torch.arange(300), 64):
        totals.update(logits[rows], targets[rows])
    values = totals.scores().values()
    expected = {
        "acc": MulticlassAccuracy(7, average="micro"),
        "acc_top5": MulticlassAccuracy(7, top_k=5, average="micro"),
        "precision_macro": MulticlassPrecision(7, average="macro"),
        "recall_macro": MulticlassRecall(7, average="macro"),
        "f1_macro": MulticlassF1Score(7, average="macro"),
    }
    for key, metric in expected.items():
        assert values[key] == pytest.approx(float(metric(logits, targets)), abs=1e-6), key
    assert values["loss"] == pytest.approx(
        float(torch.nn.functional.cross_entropy(logits, targets)), abs=1e-6
    )
    few = RunningMetrics(4)
    few.update(logits[:, :4], targets % 4)
    assert "acc_top5" not in few.scores().values()  # fewer than 5 classes: no top-5


def fit_tiny(
    tmp_path: Path, classes: int, tensorboard: bool
) -> tuple[LitClassifier, torch.Tensor, torch.Tensor]:
    """One epoch of the head on cached pooled features; returns the module and its val features, labels."""
    generator = torch.Generator().manual_seed(0)
    features, labels = torch.randn(48, 1280, generator=generator), torch.arange(48) % classes
    data = CachedInputs(POOLED, [TensorDataset(features, labels)])
    module = LitClassifier(
        classes,
        [f"c{i}" for i in range(classes)],
        model={"kind": "timm", "name": "mobilenetv2_100", "pretrained": False},
    )
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=TensorBoardLogger(str(tmp_path)) if tensorboard else False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    loader = DataLoader(data, batch_size=16, collate_fn=data.collate)
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)
    return module, features, labels


@pytest.mark.parametrize("tensorboard", [False, True])
def test_the_per_class_table_is_computed_only_for_tensorboard(
    tmp_path: Path, tensorboard: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    tables: list[int] = []
    real = module_code.per_class_table
    monkeypatch.setattr(module_code, "per_class_table", lambda *a, **k: (tables.append(1), real(*a, **k))[1])
    module, _, _ = fit_tiny(tmp_path, 3, tensorboard)
    assert bool(tables) == tensorboard
    assert "val/acc" in module.last_results["val"]
    if tensorboard:
        assert list(tmp_path.rglob("events.out.tfevents.*"))


def test_validation_metrics_are_evals_metrics_of_the_final_weights(tmp_path: Path) -> None:
    """val/* of the (only) epoch equal classification_metrics of the model's answers on the val data."""
    module, features, targets = fit_tiny(tmp_path, 6, tensorboard=False)
    module.eval()
    with torch.no_grad():
        logits = module(features, POOLED)
    expected = classification_metrics(confusion_matrix(targets, logits.argmax(1), 6))
    logged = module.last_results["val"]
    for key in ("precision_macro", "recall_macro", "f1_macro"):
        assert logged[f"val/{key}"] == pytest.approx(expected[key], abs=1e-6), key
    assert logged["val/acc"] == pytest.approx(expected["accuracy"], abs=1e-6)
    top5 = (logits.topk(5, dim=1).indices == targets[:, None]).any(dim=1).float().mean()
    assert logged["val/acc_top5"] == pytest.approx(float(top5), abs=1e-6)
    assert set(logged) == {
        f"val/{k}" for k in ("acc", "acc_top5", "precision_macro", "recall_macro", "f1_macro")
    }


def test_ddp_sums_the_counts_of_every_process(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(2)
    logits, targets = torch.randn(40, 6, generator=generator), torch.arange(40) % 6
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(count_half, args=(port, logits, targets, str(tmp_path)), nprocs=2, join=True)
    whole = confusion_matrix(targets, logits.argmax(1), 6)
    for rank in (0, 1):
        np.testing.assert_array_equal(np.load(tmp_path / f"rank{rank}.npy"), whole)
        part = confusion_matrix(targets[rank::2], logits[rank::2].argmax(1), 6)
        np.testing.assert_array_equal(np.load(tmp_path / f"alone{rank}.npy"), part)

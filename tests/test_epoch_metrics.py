"""Per-epoch metrics compute only what is logged (issue #20): the per-class table and the confusion matrix
go to TensorBoard only, so without a TensorBoard logger they are never computed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchmetrics.classification import MulticlassF1Score, MulticlassPrecision, MulticlassRecall

from foodvision.training.module import per_class_from_confusion


def test_per_class_table_from_the_confusion_matrix_equals_torchmetrics() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 5, generator=generator)
    targets = torch.randint(0, 4, (200,), generator=generator)  # class 4 never true: undefined recall
    logits[:, 3] -= 10  # class 3 never predicted: undefined precision
    confusion = torch.zeros(5, 5, dtype=torch.long)
    confusion.index_put_((targets, logits.argmax(1)), torch.ones(200, dtype=torch.long), accumulate=True)
    table = per_class_from_confusion(confusion, list("abcde"))
    expected = {
        "precision": MulticlassPrecision(5, average=None)(logits, targets),
        "recall": MulticlassRecall(5, average=None)(logits, targets),
        "f1": MulticlassF1Score(5, average=None)(logits, targets),
    }
    for i, name in enumerate("abcde"):
        for key, values in expected.items():
            assert abs(table[name][key] - float(values[i])) < 1e-6, (name, key)
        assert table[name]["support"] == int((targets == i).sum())


@pytest.mark.parametrize("tensorboard", [False, True])
def test_the_confusion_matrix_is_computed_only_for_tensorboard(tmp_path: Path, tensorboard: bool) -> None:
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch.utils.data import DataLoader, TensorDataset

    from foodvision.data.cached import CachedInputs
    from foodvision.models.classifier import POOLED
    from foodvision.training.module import LitClassifier

    features, labels = torch.randn(48, 1280), torch.arange(48) % 3
    data = CachedInputs(POOLED, [TensorDataset(features, labels)])
    module = LitClassifier(
        3, ["a", "b", "c"], model={"kind": "timm", "name": "mobilenetv2_100", "pretrained": False}
    )
    updates: list[int] = []
    confusion = module.detailed["val_"]
    real = confusion.update
    confusion.update = lambda *args, **kwargs: (updates.append(1), real(*args, **kwargs))[1]  # type: ignore[method-assign]
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
    assert bool(updates) == tensorboard
    assert "val/acc" in module.last_results["val"]
    if tensorboard:
        assert list(tmp_path.rglob("events.out.tfevents.*"))

"""Class imbalance: data.balance resamples the train split only; model.class_weights weights its loss."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import hydra
import pytest
import torch
from omegaconf import OmegaConf

from foodvision.data.balance import balance_samples, inverse_frequency_weights, resolve_class_weights
from foodvision.data.datamodule import FoodDataModule
from foodvision.data.transforms import Preprocessing
from foodvision.training.fit import build_module, train
from foodvision.training.module import LitClassifier

from .conftest import make_class_tree

TRAIN_COUNTS = {"apple_pie": 12, "baklava": 6, "bibimbap": 3}


@pytest.fixture
def imbalanced_folder(tmp_path: Path) -> Path:
    """train 12/6/3 images, validation and test 2 per class."""
    root = tmp_path / "imbalanced"
    for index, (name, count) in enumerate(TRAIN_COUNTS.items()):
        make_class_tree(root / "train", [name], count, start_seed=1000 * index)
        make_class_tree(root / "validation", [name], 2, start_seed=1000 * index + 500)
        make_class_tree(root / "test", [name], 2, start_seed=1000 * index + 700)
    return root


def _datamodule(root: Path, tmp_path: Path, balance: str, seed: int = 42) -> FoodDataModule:
    dm = FoodDataModule(
        source="imagefolder",
        root=str(root),
        num_workers=0,
        output_dir=str(tmp_path / "run"),
        balance=balance,
        seed=seed,
    )
    dm.preprocessing = Preprocessing(image_size=32)
    return dm


@pytest.mark.parametrize(("mode", "per_class"), [("none", None), ("down", 3), ("up", 12), ("mean", 7)])
def test_balance_modes_resample_train_only(
    imbalanced_folder: Path, tmp_path: Path, mode: str, per_class
) -> None:
    reference = _datamodule(imbalanced_folder, tmp_path / "ref", "none").discover()
    dm = _datamodule(imbalanced_folder, tmp_path, mode)
    data = dm.discover()
    expected = list(TRAIN_COUNTS.values()) if per_class is None else [per_class] * 3
    assert dm.class_counts("train") == expected
    assert data.splits["val"] == reference.splits["val"] and data.splits["test"] == reference.splits["test"]
    assert dm.class_counts("val") == dm.class_counts("test") == [2, 2, 2]

    original = Counter(reference.splits["train"])
    chosen = Counter(data.splits["train"])
    for label, count in enumerate(TRAIN_COUNTS.values()):
        mine = {s: n for s, n in chosen.items() if s[1] == label}
        assert set(mine) <= {s for s in original if s[1] == label}  # only real training samples
        target = expected[label]
        if target <= count:  # subset, no duplicates
            assert set(mine.values()) == {1}
        else:  # every sample k or k+1 times
            assert set(s for s in original if s[1] == label) == set(mine)
            assert set(mine.values()) <= {target // count, target // count + 1}

    dm.setup()  # the datasets and the feature cache's image list see the balanced list
    assert len(dm.datasets["train"]) == len(dm.image_dataset("train")) == sum(expected)
    assert len(dm.datasets["val"]) == len(dm.datasets["test"]) == 6
    with open(tmp_path / "run" / "splits.csv") as handle:  # the audit file records the real split
        rows = list(csv.DictReader(handle))
    assert Counter(r["class"] for r in rows if r["split"] == "train") == TRAIN_COUNTS


def test_balance_is_seeded(imbalanced_folder: Path, tmp_path: Path) -> None:
    first = _datamodule(imbalanced_folder, tmp_path / "a", "mean", seed=1).discover().splits["train"]
    again = _datamodule(imbalanced_folder, tmp_path / "b", "mean", seed=1).discover().splits["train"]
    other = _datamodule(imbalanced_folder, tmp_path / "c", "mean", seed=2).discover().splits["train"]
    assert first == again
    assert first != other
    # independent of the input order
    assert balance_samples(list(reversed(first)), "down", 0) == balance_samples(first, "down", 0)


def test_bad_balance_mode_lists_the_modes() -> None:
    with pytest.raises(ValueError, match="none, down, up, mean"):
        FoodDataModule(source="imagefolder", root=".", balance="oversample")


def test_class_weight_values() -> None:
    assert inverse_frequency_weights([12, 6, 3]) == pytest.approx([21 / 36, 21 / 18, 21 / 9])
    assert inverse_frequency_weights([5, 5]) == [1.0, 1.0]
    assert inverse_frequency_weights([4, 0, 2]) == pytest.approx([0.75, 0.0, 1.5])
    assert resolve_class_weights("auto", [12, 6, 3], 3) == pytest.approx([7 / 12, 7 / 6, 7 / 3])
    assert resolve_class_weights([1, 2, 3], None, 3) == [1.0, 2.0, 3.0]
    assert resolve_class_weights(None, [1, 2], 2) is None
    with pytest.raises(ValueError, match="3 non-negative"):
        resolve_class_weights([1, 2], None, 3)
    with pytest.raises(ValueError, match="null, auto"):
        resolve_class_weights("balanced", [1, 2, 3], 3)


def test_weighted_loss_in_training_only_and_not_in_the_checkpoint() -> None:
    model = {"kind": "scratch", "name": "scratch_cnn", "pretrained": False, "image_size": 16,
             "scratch": {"widths": [4]}, "head": {"hidden": None, "dropout": 0.0}}  # fmt: skip
    module = LitClassifier(
        3, ["a", "b", "c"], model, class_weights="auto", class_counts=[12, 6, 3], channels_last=False
    )
    assert module.loss_weights.tolist() == pytest.approx([7 / 12, 7 / 6, 7 / 3])
    assert "loss_weights" not in module.state_dict()
    inputs, targets = torch.randn(6, 3, 16, 16), torch.tensor([0, 0, 1, 2, 2, 2])
    logits = module(inputs)
    weighted = torch.nn.functional.cross_entropy(logits, targets, weight=module.loss_weights)
    plain = torch.nn.functional.cross_entropy(logits, targets)
    with pytest.warns(UserWarning, match="self.log"):  # no trainer attached: logging is skipped
        assert module.training_step((inputs, targets), 0).item() == pytest.approx(weighted.item(), rel=1e-5)
    logged: dict[str, torch.Tensor] = {}
    module.log = lambda name, value, **kwargs: logged.__setitem__(name, value)  # what a trainer would receive
    module.validation_step((inputs, targets), 0)
    assert logged["val/loss"].item() == pytest.approx(plain.item(), rel=1e-5)


def test_train_passes_counts_for_auto_weights(compose_train, imbalanced_folder: Path) -> None:
    cfg = compose_train("experiment=scratch_baseline", "model.class_weights=auto", root=imbalanced_folder)
    dm = hydra.utils.instantiate(cfg.data, augment=OmegaConf.to_container(cfg.augment))
    module = build_module(cfg, dm)
    assert module.loss_weights.tolist() == pytest.approx([7 / 12, 7 / 6, 7 / 3])
    assert "class_weights" not in module.hparams.model  # the checkpoint's architecture stays buildable

    cfg = compose_train(
        "experiment=scratch_baseline", "model.class_weights=auto", "data.balance=up", root=imbalanced_folder
    )
    dm = hydra.utils.instantiate(cfg.data, augment=OmegaConf.to_container(cfg.augment))
    assert build_module(cfg, dm).loss_weights.tolist() == [1.0, 1.0, 1.0]  # balanced counts: uniform weights


def test_train_end_to_end_with_balance_and_weights(compose_train, imbalanced_folder: Path) -> None:
    cfg = compose_train(
        "experiment=scratch_baseline", "model.scratch.widths=[8]", "debug=fdr", "data.balance=mean",
        "model.class_weights=[1.0,2.0,4.0]", root=imbalanced_folder,
    )  # fmt: skip
    _, metrics = train(cfg)
    assert metrics["test_images"] == 6  # test split untouched: 2 per class

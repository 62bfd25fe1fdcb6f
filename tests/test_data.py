"""Splits, class discovery and bad inputs: what a user relies on when pointing foodvision at a folder."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from foodvision.data.datamodule import FoodDataModule
from foodvision.data.images import BadImageError, load_rgb
from foodvision.data.sources import DataLayoutError, discover_food101, discover_image_folder
from foodvision.data.transforms import Preprocessing, build_train_transform
from foodvision.data.verify import BadImagesError
from foodvision.training.fit import train

from .conftest import SHARED_MINI, make_class_tree


def _datamodule(root: Path, tmp_path: Path, **kwargs) -> FoodDataModule:
    dm = FoodDataModule(
        source="imagefolder", root=str(root), num_workers=0, output_dir=str(tmp_path / "run"), **kwargs
    )
    dm.preprocessing = Preprocessing(image_size=32)
    return dm


# ---- splits ------------------------------------------------------------------------------------
def test_flat_tree_split_is_stratified_seeded_disjoint_and_written(flat_folder: Path, tmp_path: Path) -> None:
    data = discover_image_folder(flat_folder, (0.7, 0.15, 0.15), seed=1)
    files = {s: [p for p, _ in samples] for s, samples in data.splits.items()}
    assert data.classes == ["a", "b", "c", "d"]
    assert sum(len(v) for v in files.values()) == 80
    assert not set(files["train"]) & set(files["val"]) and not set(files["train"]) & set(files["test"])
    assert not set(files["val"]) & set(files["test"])
    for split, expected in (("train", 14), ("val", 3), ("test", 3)):  # 20 per class: 70/15/15
        assert Counter(label for _, label in data.splits[split]) == {i: expected for i in range(4)}
    again = discover_image_folder(flat_folder, (0.7, 0.15, 0.15), seed=1)
    assert again.splits == data.splits
    other = discover_image_folder(flat_folder, (0.7, 0.15, 0.15), seed=2)
    assert other.splits["val"] != data.splits["val"]

    dm = _datamodule(flat_folder, tmp_path, seed=1)
    dm.discover()
    rows = list(csv.DictReader((tmp_path / "run" / "splits.csv").open()))
    assert len(rows) == 80
    assert {r["split"] for r in rows} == {"train", "val", "test"}


def test_split_folders_used_as_given_and_val_aliases(image_folder: Path, tmp_path: Path) -> None:
    data = discover_image_folder(image_folder, (0.7, 0.15, 0.15), seed=0)
    assert data.counts() == {"train": 36, "val": 12, "test": 12}
    assert data.generated_splits == []
    (image_folder / "validation").rename(image_folder / "valid")
    assert discover_image_folder(image_folder, (0.7, 0.15, 0.15), seed=0).counts()["val"] == 12


def test_train_only_tree_gets_val_and_test_carved(tmp_path: Path) -> None:
    make_class_tree(tmp_path / "t" / "train", ["x", "y"], 20)
    data = discover_image_folder(tmp_path / "t", (0.7, 0.15, 0.15), seed=0)
    assert data.counts() == {"train": 28, "val": 6, "test": 6}
    assert sorted(data.generated_splits) == ["test", "val"]


@pytest.mark.skipif(not SHARED_MINI.is_dir(), reason="needs ../shared/data/food101-mini")
def test_food101_layout_official_split_with_carved_validation() -> None:
    data = discover_food101(SHARED_MINI, val_fraction=0.1, seed=42)
    assert len(data.classes) == 10
    assert data.counts() == {"train": 3380, "val": 370, "test": 1250}
    train, val = {p for p, _ in data.splits["train"]}, {p for p, _ in data.splits["val"]}
    assert not train & val
    subset = discover_food101(
        SHARED_MINI, 0.1, 42, classes=["baklava", "apple_pie"], caps={"train": 5, "test": 3}
    )
    assert subset.classes == ["apple_pie", "baklava"]
    assert subset.counts()["train"] == 10 and subset.counts()["test"] == 6
    with pytest.raises(DataLayoutError, match="pizza"):
        discover_food101(SHARED_MINI, 0.1, 42, classes=["pizza"])


# ---- bad layouts -------------------------------------------------------------------------------
def test_missing_root_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataLayoutError, match="does not exist"):
        discover_image_folder(tmp_path / "nope", (0.7, 0.15, 0.15), 0)
    with pytest.raises(DataLayoutError, match="not a Food-101 archive"):
        discover_food101(tmp_path, 0.1, 0)


def test_class_mismatch_between_splits_names_the_classes(image_folder: Path) -> None:
    make_class_tree(image_folder / "train", ["churros"], 3)
    with pytest.raises(DataLayoutError, match=r"validation lacks churros|val lacks churros"):
        discover_image_folder(image_folder, (0.7, 0.15, 0.15), 0)


def test_empty_class_folder_is_named(image_folder: Path) -> None:
    (image_folder / "test" / "ghost").mkdir()
    with pytest.raises(DataLayoutError, match="ghost"):
        discover_image_folder(image_folder, (0.7, 0.15, 0.15), 0)


def test_non_image_files_are_ignored_not_fatal(image_folder: Path) -> None:
    (image_folder / "train" / "baklava" / "notes.txt").write_text("hello")
    data = discover_image_folder(image_folder, (0.7, 0.15, 0.15), 0)
    assert data.counts()["train"] == 36
    assert any(p.endswith("notes.txt") for p in data.ignored_files)


# ---- image modes and bad files --------------------------------------------------------------------
@pytest.mark.parametrize(
    "mode,ext",
    [
        ("L", ".jpg"),
        ("RGBA", ".png"),
        ("P", ".png"),
        ("CMYK", ".jpg"),
        ("I;16", ".png"),
        ("LA", ".png"),
        ("1", ".png"),
    ],
)
def test_every_mode_becomes_rgb(tmp_path: Path, mode: str, ext: str) -> None:
    path = tmp_path / f"img{ext}"
    if mode == "I;16":
        Image.fromarray((np.arange(40 * 30).reshape(30, 40) * 50).astype(np.uint16)).save(path)
    else:
        Image.new("RGB", (40, 30), (10, 120, 200)).convert(mode).save(path)
    image = load_rgb(path)
    assert image.mode == "RGB" and image.size == (40, 30)
    tensor = Preprocessing(image_size=16).eval_transform()(image)
    assert tuple(tensor.shape) == (3, 16, 16)
    if mode == "I;16":  # rescaled to the full 0-255 range, not clipped to white
        assert 0 < np.asarray(image).mean() < 255


def test_corrupt_and_truncated_files_name_the_file(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not an image at all")
    good = make_class_tree(tmp_path / "src", ["a"], 1)["a"][0]
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    for path in (garbage, truncated):
        with pytest.raises(BadImageError, match=path.name):
            load_rgb(path)


def test_draft_decoding_never_smaller_than_requested(tmp_path: Path) -> None:
    path = tmp_path / "big.jpg"
    Image.new("RGB", (1000, 700), (1, 2, 3)).save(path)
    for size in (64, 100, 256, 350, 699):
        image = load_rgb(path, draft_size=(size, size))
        assert min(image.size) >= size


def _with_bad_file(image_folder: Path) -> Path:
    bad = image_folder / "train" / "baklava" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return bad


def test_bad_file_stops_training_with_its_name(compose_train, image_folder: Path) -> None:
    bad = _with_bad_file(image_folder)
    cfg = compose_train("experiment=scratch_baseline", "debug=fdr", "data.batch_size=64", root=image_folder)
    with pytest.raises(BadImagesError, match=bad.name):
        train(cfg)


def test_skip_bad_images_skips_counts_and_lists(compose_train, image_folder: Path, tmp_path: Path) -> None:
    bad = _with_bad_file(image_folder)
    cfg = compose_train(
        "experiment=scratch_baseline",
        "data.skip_bad_images=true",
        "data.batch_size=64",
        "model.scratch.widths=[8]",
        root=image_folder,
    )
    _, metrics = train(cfg)
    assert metrics["skipped_bad_images"] == 1
    listed = (tmp_path / "run" / "bad_images.tsv").read_text()
    assert str(bad) in listed


# ---- augmentation ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["none", "seed", "light", "randaugment"])
def test_augment_presets_give_model_sized_tensors(name: str) -> None:
    pre = Preprocessing(image_size=48, mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=0.875)
    transform = build_train_transform(pre, {"name": name})
    image = Image.new("RGB", (120, 90), (200, 100, 50))
    assert tuple(transform(image).shape) == (3, 48, 48)
    with pytest.raises(ValueError, match="unknown augment"):
        build_train_transform(pre, {"name": "mixup9000"})

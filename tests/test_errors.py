"""One clear line instead of silence or a traceback: divergence, photos that change after the up-front
check, bad pretrained weight files, bad seeds, HEIC-only class folders, hidden class folders, and
``data.val_fraction`` on class-per-folder trees (issue 19, items 10, 11 and 13)."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import hydra
import lightning as L
import pytest
import torch

from foodvision.config.check import ConfigError
from foodvision.data.datamodule import FoodDataModule
from foodvision.data.images import BadImageError
from foodvision.data.sources import DataLayoutError, discover_image_folder
from foodvision.errors import ToolError
from foodvision.training.fit import train

from .conftest import make_class_tree
from .test_faults import QUIET, SMALL, run_cli

SMALL_TREE = [o for o in SMALL if o != "data=imagefolder"]  # compose_train(root=...) picks the data group


def _one_error_line(result, code: int = 1) -> str:
    """The ``error:`` line of a CLI run that must end in exactly one, without a traceback."""
    assert result.returncode == code, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


# ---- 10: divergence -----------------------------------------------------------------------------------
def test_divergence_stops_with_one_line_and_keeps_the_last_finished_epoch(tmp_path: Path) -> None:
    """The issue's reproduction: the cached-feature recipe at lr=1e9 used to exit 0 with val/loss NaN."""
    tree = tmp_path / "tree"
    make_class_tree(tree, ["a", "b", "c"], 8)
    result = run_cli(
        "train.py", "data=imagefolder", f"data.root={tree}", "data.image_size=64", "experiment=mobilenetv2_features",
        "trainer.max_epochs=4", "optimizer.lr=1e9", "data.num_workers=0", "test=false",
        f"paths.root_dir={tmp_path}", *QUIET, cwd=tmp_path,
    )  # fmt: skip
    line = _one_error_line(result)
    match = re.search(r"training diverged (?:at|by the end of) epoch (\d+).*is (nan|inf)", line)
    assert match, line
    assert "optimizer.lr (now 1e+09)" in line
    (run_dir,) = (tmp_path / "lightning_logs" / "runs").iterdir()
    assert not (run_dir / "metrics.json").exists()  # no record of a diverged run's NaN metrics
    last = run_dir / "checkpoints" / "last.ckpt"
    epoch = int(match.group(1))
    if epoch == 0:
        assert not last.exists()
    else:  # the last finished epoch, intact, with finite weights
        saved = torch.load(last, map_location="cpu", weights_only=True)
        assert saved["epoch"] == epoch - 1
        assert all(torch.isfinite(t).all() for t in saved["state_dict"].values() if t.is_floating_point())


def test_divergence_of_the_training_loss_names_the_step(compose_train, image_folder) -> None:
    cfg = compose_train(
        *SMALL_TREE, "optimizer.lr=1e9", "trainer.max_epochs=3", "test=false", root=image_folder
    )
    with pytest.raises(ToolError, match=r"training diverged .*epoch \d+.*lower optimizer\.lr"):
        train(cfg)


# ---- 11: photos that change after the up-front check --------------------------------------------------
def _change_after_check(monkeypatch: pytest.MonkeyPatch, change) -> list[str]:
    """Run ``change(path)`` on one train photo right after the datamodule's image check passed."""
    changed: list[str] = []
    check = FoodDataModule.verify_images

    def verify_then_change(self: FoodDataModule, *args, **kwargs):
        result = check(self, *args, **kwargs)
        if not changed:
            path = self.discover().splits["train"][0][0]
            change(Path(path))
            changed.append(path)
        return result

    monkeypatch.setattr(FoodDataModule, "verify_images", verify_then_change)
    return changed


def _corrupt_in_place(path: Path) -> None:
    """Garbage of the same size and modification time: the image check's cached verdict still says good."""
    stat = path.stat()
    path.write_bytes(b"\x00garbage" * (stat.st_size // 8) + b"\x00" * (stat.st_size % 8))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns


FEATURES = [
    "experiment=mobilenetv2_features",
    "data.image_size=64",
    "trainer.max_epochs=1",
    "test=false",
]


def test_photo_deleted_after_the_check_is_skipped_and_listed(
    compose_train, image_folder, tmp_path, monkeypatch
) -> None:
    """The feature cache keyed its entry on every photo's size: a deleted photo raised FileNotFoundError."""
    changed = _change_after_check(monkeypatch, Path.unlink)
    cfg = compose_train(*FEATURES, "data.skip_bad_images=true", root=image_folder)
    _, metrics = train(cfg)
    assert metrics["bad_images"] == changed and metrics["skipped_bad_images"] == 1
    listed = (tmp_path / "run" / "bad_images.tsv").read_text()
    assert changed[0] in listed and "file not found" in listed


def test_photo_deleted_after_the_check_stops_naming_it(compose_train, image_folder, monkeypatch) -> None:
    changed = _change_after_check(monkeypatch, Path.unlink)
    cfg = compose_train(*FEATURES, root=image_folder)
    with pytest.raises(BadImageError) as caught:
        train(cfg)
    assert str(caught.value).startswith(f"cannot read image {changed[0]}: file not found")


def test_photo_corrupted_in_place_stops_in_a_worker_with_one_line(image_folder: Path, tmp_path: Path) -> None:
    """Raised in a DataLoader worker, BadImageError used to arrive as a RuntimeError holding a traceback."""
    victim = image_folder / "train" / "baklava" / "baklava_003.jpg"
    corrupt = [
        "+callbacks.corrupt._target_=tests.test_errors.CorruptAtFitStart",
        f"+callbacks.corrupt.path={victim}",
    ]
    result = run_cli(
        "train.py", *SMALL, f"data.root={image_folder}", "data.num_workers=1", "test=false",
        f"paths.root_dir={tmp_path}", *corrupt, *QUIET, cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    line = _one_error_line(result)
    assert line.startswith(f"error: cannot read image {victim}: UnidentifiedImageError"), line


def test_photo_corrupted_in_place_is_skipped_with_workers(
    compose_train, image_folder, tmp_path, monkeypatch
) -> None:
    changed = _change_after_check(monkeypatch, _corrupt_in_place)
    cfg = compose_train(
        *SMALL_TREE,
        "data.num_workers=1",
        "data.skip_bad_images=true",
        "trainer.max_epochs=2",
        root=image_folder,
    )
    _, metrics = train(cfg)
    assert metrics["bad_images"] == changed
    lines = (tmp_path / "run" / "bad_images.tsv").read_text().splitlines()
    assert {line.split("\t")[0] for line in lines} == set(changed)


class CorruptAtFitStart(L.Callback):
    """Overwrites ``path`` with garbage of the same size and mtime once the image check has passed."""

    def __init__(self, path: str):
        self.path = Path(path)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _corrupt_in_place(self.path)


# ---- 13: one-line errors ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["missing", "not_weights"])
def test_bad_weights_file_is_one_line(kind: str, image_folder: Path, tmp_path: Path) -> None:
    weights = tmp_path / "weights.pth"
    if kind == "not_weights":
        weights.write_text("this is not a checkpoint")
    result = run_cli(
        "train.py", "data=imagefolder", f"data.root={image_folder}", "experiment=mobilenetv2_features",
        f"model.weights_file={weights}", "data.num_workers=0", f"paths.root_dir={tmp_path}", *QUIET, cwd=tmp_path,
    )  # fmt: skip
    line = _one_error_line(result)
    assert f"model.weights_file={weights}" in line and "How to fix" in line
    assert ("no such file" in line) if kind == "missing" else ("no such file" not in line)


def test_negative_seed_names_the_key(image_folder: Path, tmp_path: Path) -> None:
    result = run_cli(
        "train.py", *SMALL, f"data.root={image_folder}", "seed=-1", f"paths.root_dir={tmp_path}", *QUIET,
        cwd=tmp_path,
    )  # fmt: skip
    assert "seed=-1 (must be an integer from 0 to 2**32-1)" in _one_error_line(result)


@pytest.mark.parametrize("seed", ["-1", "4294967296"])
def test_seed_out_of_range_is_refused(seed: str, compose_train, image_folder) -> None:
    with pytest.raises(ConfigError, match=rf"seed={seed} "):
        train(compose_train(*SMALL_TREE, f"seed={seed}", root=image_folder))


def test_heic_only_class_folder_names_the_format(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    make_class_tree(root, ["a", "b"], 4)
    iphone = root / "c"
    iphone.mkdir()
    for index in range(3):
        (iphone / f"IMG_{index:04d}.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic")
    with pytest.raises(DataLayoutError) as caught:
        discover_image_folder(root, (0.7, 0.15, 0.15), 0)
    message = str(caught.value)
    assert "no images" in message and "c" in message
    assert "HEIC" in message and "convert them to JPEG" in message


def test_heic_photos_beside_others_are_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "tree"
    make_class_tree(root, ["a", "b"], 4)
    (root / "a" / "IMG_0001.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")
    with caplog.at_level(logging.WARNING, logger="foodvision"):
        discover_image_folder(root, (0.7, 0.15, 0.15), 0)
    assert any("HEIC" in r.getMessage() and "IMG_0001.heic" in r.getMessage() for r in caplog.records)


def test_hidden_class_folder_is_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "tree"
    make_class_tree(root, ["a", "b", ".secret"], 4)
    with caplog.at_level(logging.INFO, logger="foodvision"):
        data = discover_image_folder(root, (0.7, 0.15, 0.15), 0)
    assert data.classes == ["a", "b"]
    lines = [r.getMessage() for r in caplog.records if ".secret" in r.getMessage()]
    assert len(lines) == 1 and "ignored" in lines[0]


def _datamodule(compose_train, root: Path, *overrides: str) -> FoodDataModule:
    cfg = compose_train(*SMALL[:2], *overrides, root=root)
    return hydra.utils.instantiate(cfg.data, augment=None)


def test_val_fraction_is_honoured_for_a_tree_without_val_folder(compose_train, flat_folder: Path) -> None:
    default = _datamodule(compose_train, flat_folder).discover().counts()
    assert default == {"train": 56, "val": 12, "test": 12}  # 20 per class: 14/3/3, unchanged
    counts = _datamodule(compose_train, flat_folder, "data.val_fraction=0.5").discover().counts()
    assert counts["val"] == 40 and sum(counts.values()) == 80


def test_val_fraction_carves_val_out_of_a_train_only_tree(compose_train, tmp_path: Path) -> None:
    root = tmp_path / "t"
    make_class_tree(root / "train", ["a", "b"], 10)
    make_class_tree(root / "test", ["a", "b"], 2)
    counts = _datamodule(compose_train, root, "data.val_fraction=0.3").discover().counts()
    assert counts == {"train": 14, "val": 6, "test": 4}


def test_val_fraction_warns_when_the_tree_has_its_own_val(
    compose_train, image_folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="foodvision"):
        counts = _datamodule(compose_train, image_folder, "data.val_fraction=0.3").discover().counts()
    assert counts["val"] == 12  # the validation/ folder
    assert any("data.val_fraction=0.3 is ignored" in r.getMessage() for r in caplog.records)


def test_a_run_config_from_before_val_fraction_applied_splits_as_it_did(flat_folder: Path) -> None:
    """Old run configs hold the inherited ``val_fraction: 0.1``, which never applied to these trees:
    evaluating such a run must re-create the split its training used (test photos stay test photos)."""
    old = FoodDataModule(source="imagefolder", root=str(flat_folder), val_fraction=0.1, seed=42)
    assert old.discover().counts() == {"train": 56, "val": 12, "test": 12}

"""Two-stage fine-tuning and the feature cache: what really moves, what really stays, and resuming."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import hydra
import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import TensorDataset

from foodvision.config.check import ConfigError, check_train_config
from foodvision.config.recipe import recipe_summary
from foodvision.data.cached import CachedInputs
from foodvision.data.datamodule import FoodDataModule
from foodvision.models.classifier import POOLED, prefix_entry
from foodvision.training.callbacks.feature_cache import (
    FeatureCache,
    extract_features,
    frozen_forward,
)
from foodvision.training.callbacks.finetune import TwoStageFinetuning, select_groups
from foodvision.training.module import LitClassifier

MODEL = {
    "kind": "timm",
    "name": "mobilenetv2_100",
    "pretrained": True,
    "head": {"hidden": 16, "dropout": 0.0},
}
UNFROZEN = ("blocks.5.", "blocks.6.", "conv_head.", "bn2.")  # timm groups conv_head/bn2 with blocks.6


class Snapshots(Callback):
    """Backbone and head state at the start of every epoch and at the end of fitting."""

    def __init__(self) -> None:
        self.at_epoch_start: dict[int, dict[str, torch.Tensor]] = {}
        self.final: dict[str, torch.Tensor] = {}
        self.requires_grad: dict[int, set[str]] = {}
        self.norms_training: dict[int, int] = {}
        self.group_lrs: dict[int, list[float]] = {}

    def _state(self, module: LitClassifier) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in module.net.state_dict().items()}

    def on_train_epoch_start(self, trainer: L.Trainer, module: LitClassifier) -> None:
        epoch = trainer.current_epoch
        self.at_epoch_start[epoch] = self._state(module)
        self.requires_grad[epoch] = {n for n, p in module.net.backbone.named_parameters() if p.requires_grad}
        self.norms_training[epoch] = sum(
            m.training for m in module.net.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)
        )
        self.group_lrs[epoch] = [g["lr"] for g in trainer.optimizers[0].param_groups]

    def on_train_end(self, trainer: L.Trainer, module: LitClassifier) -> None:
        self.final = self._state(module)


def make_datamodule(root: Path, out: Path, augment: str = "none", image_size: int = 32) -> FoodDataModule:
    dm = FoodDataModule(
        source="imagefolder",
        root=str(root),
        batch_size=8,
        eval_batch_size=16,
        num_workers=0,
        image_size=image_size,
        augment={"name": augment},
        output_dir=str(out),
    )
    dm.discover()
    return dm


def make_module(dm: FoodDataModule, lr: float = 1e-2, scheduler: str | dict = "cosine") -> LitClassifier:
    module = LitClassifier(
        dm.num_classes,
        dm.classes,
        model={**MODEL, "image_size": dm.image_size},
        optimizer={"name": "adamw", "lr": lr, "weight_decay": 1e-2, "backbone_lr_factor": 0.1},
        scheduler=scheduler if isinstance(scheduler, dict) else {"name": scheduler},
        max_epochs=4,
    )
    dm.preprocessing = module.preprocessing
    return module


def fit(module, dm, out: Path, callbacks: list, epochs: int, ckpt_path: str | None = None) -> L.Trainer:
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        precision="32-true",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(out),
        callbacks=[
            *callbacks,
            ModelCheckpoint(dirpath=str(out / "checkpoints"), save_last=True, save_top_k=0),
        ],
    )
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return trainer


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], prefix: str = "") -> set[str]:
    return {k[len(prefix) :] for k in before if k.startswith(prefix) and not torch.equal(before[k], after[k])}


def test_stage1_leaves_every_backbone_tensor_bit_identical(image_folder: Path, tmp_path: Path) -> None:
    dm = make_datamodule(image_folder, tmp_path)
    module = make_module(dm)
    snaps = Snapshots()
    fit(module, dm, tmp_path, [TwoStageFinetuning(stage1_epochs=5, unfreeze="blocks.5"), snaps], epochs=2)
    before = snaps.at_epoch_start[0]
    assert changed(before, snaps.final, "backbone.") == set()  # weights and BN running stats
    assert changed(before, snaps.final, "head.")  # the head did learn
    assert snaps.requires_grad[0] == set() and snaps.norms_training[0] == 0


@pytest.mark.parametrize("train_bn", [False, True])
def test_stage2_changes_exactly_the_selected_blocks(
    image_folder: Path, tmp_path: Path, train_bn: bool
) -> None:
    dm = make_datamodule(image_folder, tmp_path)
    module = make_module(dm)
    snaps = Snapshots()
    callbacks = [
        TwoStageFinetuning(1, "blocks.5", train_bn=train_bn),
        FeatureCache(True, str(tmp_path / "cache")),
        snaps,
    ]
    fit(module, dm, tmp_path, callbacks, epochs=2)
    before = snaps.at_epoch_start[1]  # end of stage 1 == start of stage 2
    moved = changed(before, snaps.final, "backbone.")
    assert moved, "stage 2 trained nothing in the backbone"
    assert all(name.startswith(UNFROZEN) for name in moved), sorted(moved)[:5]
    running = {n for n in moved if "running_" in n or "num_batches" in n}
    bn_affine = {n for n in moved if ".bn" in n and n.endswith((".weight", ".bias"))}
    convs = {n for n in moved if "conv" in n}
    assert convs >= {
        n[len("backbone.") :] for n in before if n.startswith("backbone.blocks.5.") and "conv" in n
    }
    if train_bn:
        assert running and bn_affine
        assert snaps.norms_training[1] > 0
    else:
        assert not running and not bn_affine
        assert snaps.norms_training[1] == 0
    # stage 1 ran on cached features, and the backbone really did not move during it
    assert changed(snaps.at_epoch_start[0], before, "backbone.") == set()


def test_resume_mid_stage2_keeps_trainable_set_modes_and_param_groups(
    image_folder: Path, tmp_path: Path
) -> None:
    dm = make_datamodule(image_folder, tmp_path)
    straight = Snapshots()
    fit(make_module(dm), dm, tmp_path / "a", [TwoStageFinetuning(1, "blocks.5"), straight], epochs=3)

    interrupted = tmp_path / "b"
    fit(make_module(dm), dm, interrupted, [TwoStageFinetuning(1, "blocks.5"), Snapshots()], epochs=2)
    resumed = Snapshots()
    last = str(interrupted / "checkpoints" / "last.ckpt")
    fit(
        make_module(dm),
        dm,
        interrupted,
        [TwoStageFinetuning(1, "blocks.5"), resumed],
        epochs=3,
        ckpt_path=last,
    )

    assert list(resumed.requires_grad) == [
        2
    ]  # continued at epoch 2, in stage 2 (not re-frozen: Lightning #21901)
    assert resumed.requires_grad[2] == straight.requires_grad[2] != set()
    assert all(n.startswith(UNFROZEN) for n in resumed.requires_grad[2])
    assert resumed.norms_training[2] == 0
    assert resumed.group_lrs[2] == pytest.approx(straight.group_lrs[2])
    assert len(resumed.group_lrs[2]) == 2


class BatchLRs(Callback):
    """The learning rate of every group at every training batch, by (epoch, batch)."""

    def __init__(self) -> None:
        self.lrs: dict[tuple[int, int], list[float]] = {}

    def on_train_batch_end(self, trainer: L.Trainer, module, outputs, batch, batch_idx: int) -> None:
        self.lrs[(trainer.current_epoch, batch_idx)] = [g["lr"] for g in trainer.optimizers[0].param_groups]


@pytest.mark.slow  # ~55 s; make test-all (CI) runs it
def test_stage2_schedule_warms_up_decays_and_resumes_exactly(image_folder: Path, tmp_path: Path) -> None:
    """``scheduler=stage2`` owns the rates: base rates in stage 1, warm-up and cosine decay from the switch
    the fine-tuning callback reports; a run resumed in stage 2 continues it step for step."""
    dm = make_datamodule(image_folder, tmp_path)
    schedule = {"name": "stage2", "warmup_epochs": 1.0, "decay": "cosine"}

    def module() -> LitClassifier:
        return make_module(dm, scheduler=schedule)

    def finetune() -> TwoStageFinetuning:
        return TwoStageFinetuning(1, "blocks.5")

    straight = BatchLRs()
    fit(module(), dm, tmp_path / "a", [finetune(), straight], epochs=4)
    base = [1e-2, 1e-3]  # head lr, backbone lr * backbone_lr_factor (make_module)
    stage1 = [lrs for (epoch, _), lrs in straight.lrs.items() if epoch == 0]
    stage2 = [lrs for (epoch, _), lrs in sorted(straight.lrs.items()) if epoch >= 1]
    assert all(lrs == pytest.approx(base) for lrs in stage1)
    head = [lrs[0] for lrs in stage2]
    assert head[0] < 0.6 * base[0]  # warm-up: the first stage-2 steps are small
    assert max(head) <= base[0] * (1 + 1e-9) and head[-1] < 0.2 * base[0]  # cosine decay to ~0
    assert all(lrs[1] == pytest.approx(lrs[0] * 0.1) for lrs in stage2)  # groups keep their ratio

    unstarted = BatchLRs()  # without the callback nobody starts stage 2: base rates throughout
    fit(module(), dm, tmp_path / "c", [unstarted], epochs=2)
    assert all(lrs == pytest.approx(base) for lrs in unstarted.lrs.values())

    interrupted = tmp_path / "b"
    fit(module(), dm, interrupted, [finetune()], epochs=2)
    resumed = BatchLRs()
    last = str(interrupted / "checkpoints" / "last.ckpt")
    fit(module(), dm, interrupted, [finetune(), resumed], epochs=4, ckpt_path=last)
    assert resumed.lrs and all(resumed.lrs[key] == pytest.approx(straight.lrs[key]) for key in resumed.lrs)
    assert {epoch for epoch, _ in resumed.lrs} == {2, 3}


def test_resume_in_stage1_stays_in_stage1(image_folder: Path, tmp_path: Path) -> None:
    dm = make_datamodule(image_folder, tmp_path)
    fit(make_module(dm), dm, tmp_path, [TwoStageFinetuning(3, "blocks.5")], epochs=1)
    resumed = Snapshots()
    last = str(tmp_path / "checkpoints" / "last.ckpt")
    fit(make_module(dm), dm, tmp_path, [TwoStageFinetuning(3, "blocks.5"), resumed], epochs=2, ckpt_path=last)
    assert resumed.requires_grad[1] == set()


def test_unfreeze_specs_select_whole_blocks(image_folder: Path, tmp_path: Path) -> None:
    dm = make_datamodule(image_folder, tmp_path)
    groups = make_module(dm).net.block_groups()
    names = [g.name for g in groups]
    assert names == ["stem"] + [f"blocks.{i}" for i in range(7)]
    assert [g.name for g in select_groups(groups, "blocks.5")] == ["blocks.5", "blocks.6"]
    assert [g.name for g in select_groups(groups, 2)] == ["blocks.5", "blocks.6"]
    assert select_groups(groups, "all") == groups and select_groups(groups, "none") == []
    with pytest.raises(ValueError, match="blocks are"):
        select_groups(groups, "block_13_expand")
    assert select_groups(groups, "2") == select_groups(groups, 2) and select_groups(groups, 0) == []


@pytest.mark.parametrize("spelling", ["none", "null", "0", "None", "'0'"])
def test_every_spelling_of_unfreeze_none_means_the_same(compose_train, spelling: str) -> None:
    """none, null and 0 (the config's, Hydra's and a count's spelling) are one setting: accepted by the
    config check, no stage 2 in the callback, "none" in the run's summary (compare, sweeps, hparams)."""
    cfg = compose_train(
        "model=mobilenetv2_ft",
        f"callbacks.finetune.unfreeze={spelling}",
        "callbacks.finetune.stage1_epochs=null",  # needed only when a stage 2 follows
        "trainer.max_epochs=1",
    )
    check_train_config(cfg)
    callback = hydra.utils.instantiate(cfg.callbacks.finetune)
    assert callback.unfreeze == "none" and not callback.unfreezes and callback.stage_at(5) == 1
    assert recipe_summary(cfg)["unfreeze"] == "none"


def test_a_negative_unfreeze_is_refused_naming_the_key(compose_train) -> None:
    cfg = compose_train("model=mobilenetv2_ft", "callbacks.finetune.unfreeze=-1", "trainer.max_epochs=8")
    with pytest.raises(ConfigError, match=r"callbacks\.finetune\.unfreeze=-1"):
        check_train_config(cfg)


# ---- feature cache ---------------------------------------------------------------------------------
def _cache_run(root: Path, out: Path, cache: Path, image_size: int = 32, augment: str = "none", tweak=None):
    dm = make_datamodule(root, out, augment=augment, image_size=image_size)
    module = make_module(dm)
    if tweak:
        tweak(module)
    feature_cache = FeatureCache("auto", str(cache), flip=True)
    fit(module, dm, out, [TwoStageFinetuning(5, "none"), feature_cache], epochs=1)
    return feature_cache


def test_cache_hit_on_second_run_and_rebuilt_when_key_changes(image_folder: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = _cache_run(image_folder, tmp_path / "1", cache)
    assert len(first.builds) == 3 and not first.hits  # train (photos and mirrored) and val
    second = _cache_run(image_folder, tmp_path / "2", cache)
    assert len(second.hits) == 3 and not second.builds
    bigger = _cache_run(image_folder, tmp_path / "3", cache, image_size=40)
    assert len(bigger.builds) == 3

    def nudge(module: LitClassifier) -> None:
        with torch.no_grad():
            module.net.backbone.conv_stem.weight.add_(1e-3)

    assert len(_cache_run(image_folder, tmp_path / "4", cache, tweak=nudge).builds) == 3
    touched = next((image_folder / "train" / "baklava").iterdir())
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    assert len(_cache_run(image_folder, tmp_path / "5", cache).builds) == 2  # only train (2 views) changed


def test_cache_not_used_with_augmentation(image_folder: Path, tmp_path: Path) -> None:
    run = _cache_run(image_folder, tmp_path / "1", tmp_path / "cache", augment="seed")
    assert not run.builds and not run.hits and not (tmp_path / "cache").exists()


@pytest.mark.parametrize(("engine", "bf16"), [("torch", False), ("torch", True), ("onnxruntime", False)])
def test_logits_from_cached_outputs_equal_full_model(
    image_folder: Path, tmp_path: Path, engine: str, bf16: bool
) -> None:
    dm = make_datamodule(image_folder, tmp_path)
    module = make_module(dm).eval()
    dm.setup("fit")
    loader = dm.loader(dm.image_dataset("val"), shuffle=False, batch_size=64)

    def context():
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

    run = frozen_forward(module, engine, context, depth=5)
    pooled, labels, maps = extract_features(module, loader, run, "test")
    images, targets = next(iter(loader))
    with torch.inference_mode(), context():
        full = module(images).float()
        from_pooled = module(pooled, POOLED).float()
        from_maps = module(maps, prefix_entry(5)).float()
    assert torch.equal(labels, targets)
    tolerance = 1e-2 if bf16 else (1e-4 if engine == "onnxruntime" else 1e-5)
    assert torch.allclose(full, from_pooled, atol=tolerance), (full - from_pooled).abs().max()
    assert torch.allclose(full, from_maps, atol=tolerance), (full - from_maps).abs().max()


def test_stage2_trains_on_cached_prefix_maps_and_resume_hits_them(image_folder: Path, tmp_path: Path) -> None:
    dm = make_datamodule(image_folder, tmp_path)
    cache = FeatureCache("auto", str(tmp_path / "cache"), flip=True)
    fit(make_module(dm), dm, tmp_path / "a", [TwoStageFinetuning(1, "blocks.5"), cache], epochs=2)
    built = sorted("-".join(Path(p).name.split("-")[:3]) for p in cache.builds)
    assert built == [  # one pass per split and view gives both outputs
        "train-pooled-flip",
        "train-pooled-plain",
        "train-prefix5-flip",
        "train-prefix5-plain",
        "val-pooled-plain",
        "val-prefix5-plain",
    ]  # fmt: skip (make_module has no test-time flip: val needs no mirrored view)

    resumed_cache = FeatureCache("auto", str(tmp_path / "cache"), flip=True)
    last = str(tmp_path / "a" / "checkpoints" / "last.ckpt")
    fit(
        make_module(dm),
        dm,
        tmp_path / "a",
        [TwoStageFinetuning(1, "blocks.5"), resumed_cache],
        epochs=3,
        ckpt_path=last,
    )
    assert not resumed_cache.builds  # the suffix moved, the prefix did not: same prefix key
    assert sorted("-".join(Path(p).name.split("-")[:3]) for p in resumed_cache.hits) == [
        "train-prefix5-flip", "train-prefix5-plain", "val-prefix5-plain",
    ]  # fmt: skip


def test_augmentation_keeps_stage2_on_images(image_folder: Path, tmp_path: Path) -> None:
    dm = make_datamodule(image_folder, tmp_path, augment="seed")
    cache = FeatureCache(True, str(tmp_path / "cache"))
    fit(make_module(dm), dm, tmp_path, [TwoStageFinetuning(1, "blocks.5"), cache], epochs=1)
    assert cache.depth is None and all("pooled" in p for p in cache.builds)


def test_mirrored_view_is_the_mirrored_photo_and_both_views_are_drawn(
    image_folder: Path, tmp_path: Path
) -> None:
    dm = make_datamodule(image_folder, tmp_path)
    module = make_module(dm).eval()
    dm.setup("fit")
    loader = dm.loader(dm.image_dataset("train"), shuffle=False, batch_size=64)
    run = frozen_forward(module, "torch", contextlib.nullcontext, None)
    plain, labels, _ = extract_features(module, loader, run, "plain")
    mirrored, _, _ = extract_features(module, loader, run, "mirrored", flip=True)
    images, _ = next(iter(loader))
    with torch.inference_mode():
        assert torch.allclose(module.net.backbone(images.flip(-1)), mirrored[: len(images)], atol=1e-5)
    assert not torch.allclose(plain, mirrored)

    views = CachedInputs(POOLED, [TensorDataset(plain, labels), TensorDataset(mirrored, labels)])
    torch.manual_seed(0)
    drawn = {bool(torch.equal(views[0]["inputs"], mirrored[0])) for _ in range(40)}
    assert drawn == {False, True}


def test_augmented_views_are_fixed_per_photo_distinct_and_cached(image_folder: Path, tmp_path: Path) -> None:
    """``feature_cache.views``: each view is one seeded augmentation per photo (the same when rebuilt, so a
    cache of it is valid), views differ from each other and from the plain photo, and a rerun hits them."""
    dm = make_datamodule(image_folder, tmp_path)
    make_module(dm)
    dm.setup("fit")
    crop = {"name": "crop", "min_scale": 0.3}
    first = dm.image_dataset("train", True, crop, item_seed=7)
    assert torch.equal(first[0][0], dm.image_dataset("train", True, crop, item_seed=7)[0][0])
    assert not torch.equal(first[0][0], dm.image_dataset("train", True, crop, item_seed=8)[0][0])
    assert not torch.equal(first[0][0], dm.image_dataset("train")[0][0])

    def run(out: Path) -> FeatureCache:
        cache = FeatureCache("auto", str(tmp_path / "cache"), views=2, engine="onnxruntime")
        data = make_datamodule(image_folder, out)
        fit(make_module(data), data, out, [TwoStageFinetuning(1, "blocks.5"), cache], epochs=2)
        return cache

    built = run(tmp_path / "a").builds
    train_views = sorted(Path(p).name.split("-")[2] for p in built if Path(p).name.startswith("train-pooled"))
    assert train_views == ["augment0", "augment1", "plain"]
    again = run(tmp_path / "b")
    assert not again.builds and len(again.hits) == 4  # pooled features of 3 train views and of val

"""The config names the code it builds (``_target_``): optimizers, schedulers, the network and the
LightningModule; trainer presets inherit; the tools share one inference group. Settings written before
(name-only optimizer/scheduler, checkpoints and recorded runs) still work, and a checkpoint naming a function
in its model metadata is refused without calling anything."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from foodvision.config.check import ConfigError
from foodvision.errors import ModelLoadError
from foodvision.inference.checkpoints import load_checkpoint_model
from foodvision.models.classifier import ImageClassifier
from foodvision.training.fit import train
from foodvision.training.module import LitClassifier
from foodvision.training.optimization import optimizer_settings, scheduler_settings

from .conftest import CONFIG_DIR, compose_tool

CLASSES = ["a", "b", "c"]
EXPERIMENTS = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))
SMALL = (
    "experiment=scratch_baseline",
    "model.scratch.widths=[8]",
    "data.image_size=32",
    "trainer.max_epochs=4",
)
# keys the `_target_` redesign added to the groups; a config without them is what runs recorded before
NEW_KEYS = {
    "optimizer": ("_target_", "_partial_"),
    "scheduler": ("_target_", "_partial_", "interval", "epochs", "monitor", "mode"),
}


def composed(*overrides: str) -> DictConfig:
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            return compose("train", overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()


def module_of(cfg: DictConfig, class_counts: list[int] | None = None) -> LitClassifier:
    """The module train.py builds from ``cfg.module`` (the data's part given here)."""
    factory = hydra.utils.instantiate(cfg.module)
    return factory(num_classes=len(CLASSES), class_names=CLASSES, class_counts=class_counts)


def legacy(group: DictConfig) -> dict[str, Any]:
    """A group as runs recorded it before `_target_`: ``name`` and the settings only."""
    settings = OmegaConf.to_container(group, resolve=True)
    assert isinstance(settings, dict)
    return {k: v for k, v in settings.items() if k not in NEW_KEYS["optimizer"] + NEW_KEYS["scheduler"]}


def hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


# ---- 1. optimizer and scheduler -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("optimizer", "scheduler"),
    [("adam", "none"), ("adamw", "cosine"), ("sgd", "plateau"), ("adamw", "stage2")],
)
def test_groups_build_their_target_as_the_old_name_dispatch_did(optimizer: str, scheduler: str) -> None:
    """Each conf/optimizer and conf/scheduler preset builds its `_target_` with its keys, and the same
    preset written the old way (name only, as old checkpoints and recorded runs hold it) builds the same."""
    cfg = composed(
        *SMALL, f"optimizer={optimizer}", f"scheduler={scheduler}", "optimizer.backbone_lr_factor=0.5"
    )
    new = module_of(cfg).configure_optimizers()
    old = LitClassifier(
        3, CLASSES, model=OmegaConf.to_container(cfg.model, resolve=True) | {"image_size": 32},
        optimizer=legacy(cfg.optimizer), scheduler=legacy(cfg.scheduler), max_epochs=4,
    ).configure_optimizers()  # fmt: skip
    if scheduler == "none":
        new_opt, old_opt = new, old
    else:
        new_opt, old_opt = new["optimizer"], old["optimizer"]
        new_sched, old_sched = new["lr_scheduler"], old["lr_scheduler"]
        assert type(new_sched["scheduler"]) is type(old_sched["scheduler"])
        assert new_sched["scheduler"].state_dict() == old_sched["scheduler"].state_dict()
        assert {k: v for k, v in new_sched.items() if k != "scheduler"} == {
            k: v for k, v in old_sched.items() if k != "scheduler"
        }
    assert type(new_opt) is hydra.utils.get_class(cfg.optimizer._target_)
    assert type(new_opt) is type(old_opt)
    assert hyperparameters(new_opt) == hyperparameters(old_opt)
    head, backbone = new_opt.param_groups
    assert (head["lr"], backbone["lr"]) == pytest.approx((cfg.optimizer.lr, cfg.optimizer.lr * 0.5))
    assert head["weight_decay"] == cfg.optimizer.weight_decay
    if optimizer == "sgd":
        assert head["momentum"] == 0.9
    if scheduler == "cosine":
        assert new["lr_scheduler"]["scheduler"].T_max == 4 and new["lr_scheduler"]["interval"] == "epoch"
    if scheduler == "plateau":
        assert new["lr_scheduler"]["monitor"] == "val/loss"
    if scheduler == "stage2":
        assert new["lr_scheduler"]["interval"] == "step"


def test_optimizer_class_keywords_pass_through_and_stay_plain() -> None:
    """Any keyword of the class can be set (`+optimizer.betas=[...]`), and reaches it as a plain list (the
    optimizer's state goes into checkpoints, which load with weights_only=True)."""
    cfg = composed(*SMALL, "optimizer=adam", "+optimizer.betas=[0.8,0.9]", "+optimizer.amsgrad=true")
    optimizer = module_of(cfg).configure_optimizers()
    assert type(optimizer.param_groups[0]["betas"]) in (list, tuple)
    assert list(optimizer.param_groups[0]["betas"]) == [0.8, 0.9] and optimizer.param_groups[0]["amsgrad"]


def test_the_old_name_spelling_still_switches_the_class_with_a_notice(caplog) -> None:
    """`optimizer.name=sgd` on a shipped preset switched the class before `_target_`: it still does, for one
    release, with a one-line notice; a shipped name on a class of one's own is an error saying how to choose."""
    with caplog.at_level("WARNING"):
        optimizer = module_of(
            composed(*SMALL, "optimizer=adamw", "optimizer.name=sgd")
        ).configure_optimizers()
    optimizer = optimizer[0][0] if isinstance(optimizer, tuple) else optimizer
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    assert type(optimizer).__name__ == "SGD" and optimizer.param_groups[0]["momentum"] == 0.9
    assert any("write optimizer=sgd" in r.getMessage() for r in caplog.records)
    with pytest.raises(ConfigError, match=r"optimizer=sgd"):
        module_of(composed(*SMALL, "optimizer._target_=torch.optim.RAdam", "optimizer.name=sgd"))
    with pytest.raises(ConfigError, match=r"scheduler.name must be"):
        LitClassifier(
            3, CLASSES, model={"kind": "scratch", "scratch": {"widths": [8]}}, scheduler={"name": "x"}
        )
    # a class of one's own, with a label of one's own, is fine
    cfg = composed(*SMALL, "optimizer._target_=torch.optim.RAdam", "optimizer.name=radam")
    assert type(module_of(cfg).configure_optimizers()).__name__ == "RAdam"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_names_consistent_classes(experiment: str) -> None:
    cfg = composed(f"experiment={experiment}")
    optimizer = optimizer_settings(OmegaConf.to_container(cfg.optimizer, resolve=True))
    assert optimizer["_target_"].startswith("torch.optim.") and optimizer["name"] in ("adam", "adamw", "sgd")
    scheduler = scheduler_settings(OmegaConf.to_container(cfg.scheduler, resolve=True), epochs=1)
    assert (scheduler is None) == (cfg.scheduler.name == "none")
    assert cfg.model._target_ == "foodvision.models.classifier.build_classifier"


# ---- 2. the network ---------------------------------------------------------------------------------------
def test_the_model_config_instantiates_the_network() -> None:
    cfg = composed(*SMALL)
    net, preprocessing, _ = hydra.utils.instantiate(cfg.model, num_classes=3, image_size=32)
    assert isinstance(net, ImageClassifier) and preprocessing.image_size == 32
    assert net.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 3)


def tiny_checkpoint(path: Path, model: dict[str, Any] | None = None) -> Path:
    """A checkpoint as training writes it (metadata from the module's own hook), optionally with its
    model metadata replaced."""
    module = module_of(composed(*SMALL))
    checkpoint: dict[str, Any] = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    if model is not None:
        checkpoint["foodvision"]["model"] = {**checkpoint["foodvision"]["model"], **model}
    torch.save(checkpoint, path)
    return path


def test_checkpoints_record_the_network_without_its_target(tmp_path: Path) -> None:
    module = module_of(composed(*SMALL))
    assert "_target_" not in module.hparams.model and "class_weights" not in module.hparams.model
    path = tiny_checkpoint(tmp_path / "ok.ckpt")
    net, info, _ = load_checkpoint_model(path)
    assert "_target_" not in info.model and info.model["image_size"] == 32
    assert net(torch.zeros(1, 3, 32, 32)).shape == (1, 3)


@pytest.mark.parametrize("payload", ["path_write_text", "os_system", "foreign_factory"])
def test_a_checkpoint_naming_another_target_is_refused_and_nothing_is_called(
    tmp_path: Path, payload: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checkpoint metadata is data: a model `_target_` other than build_classifier is refused with a clear
    error before anything is imported, instantiated or called."""
    marker = tmp_path / "pwned.txt"
    model = {
        "path_write_text": {
            "_target_": "pathlib.Path.write_text",
            "self": {"_target_": "pathlib.Path", "_args_": [str(marker)]},
            "data": "pwned",
        },
        "os_system": {"_target_": "os.system", "_args_": [f"touch {marker}"]},
        "foreign_factory": {"_target_": "timm.create_model"},
    }[payload]
    path = tiny_checkpoint(tmp_path / "crafted.ckpt", model)
    calls: list[Any] = []
    monkeypatch.setattr(hydra.utils, "instantiate", lambda *a, **k: calls.append(a))
    monkeypatch.setattr("os.system", lambda *a, **k: calls.append(a))
    with pytest.raises(ModelLoadError, match=r"_target_") as refused:
        load_checkpoint_model(path)
    assert str(path) in str(refused.value) and model["_target_"] in str(refused.value)
    assert "foodvision.models.classifier.build_classifier" in str(refused.value)
    assert not marker.exists() and calls == []


# ---- 3. the LightningModule -------------------------------------------------------------------------------
def test_the_module_config_carries_the_top_level_keys() -> None:
    cfg = composed(
        *SMALL, "label_smoothing=0.2", "channels_last=false", "augment.mixup=0.4", "model.class_weights=auto"
    )
    module = module_of(cfg, class_counts=[2, 3, 4])
    hp = module.hparams
    assert (hp.label_smoothing, hp.channels_last, hp.max_epochs, hp.class_weights) == (0.2, False, 4, "auto")
    assert hp.mixing == {"mixup": 0.4, "cutmix": 0.0, "features": False}
    assert hp.model["image_size"] == 32 and hp.optimizer["name"] == "adam"
    # mixing off is recorded as none, as before
    assert module_of(composed(*SMALL)).hparams.mixing is None


# ---- old runs: a name-only run (as recorded before `_target_`) resumes under the new config ----------------
def test_a_run_recorded_before_targets_resumes_and_its_checkpoint_loads(
    compose_train, image_folder: Path, tmp_path: Path
) -> None:
    runs = tmp_path / "lightning_logs" / "runs"
    common = ("experiment=scratch_baseline", "model.scratch.widths=[8]", "test=false", "scheduler=cosine")
    old_style = [f"~{key}" for key in ("optimizer._target_", "optimizer._partial_", "model._target_")]
    old_style += [f"~scheduler.{key}" for key in ("_target_", "_partial_", "interval", "epochs")]
    _, metrics = train(
        compose_train(*common, *old_style, f"paths.output_dir={runs / 'old'}", root=image_folder)
    )
    checkpoint = torch.load(runs / "old" / "checkpoints" / "last.ckpt", weights_only=True)
    assert "_target_" not in checkpoint["hyper_parameters"]["optimizer"]  # the premise: an old-style run
    recorded = OmegaConf.load(runs / "old" / "config.yaml")
    assert not any("_target_" in recorded[group] for group in ("optimizer", "scheduler", "model"))
    load_checkpoint_model(runs / "old" / "checkpoints" / "last.ckpt")
    (runs / "old" / "metrics.json").unlink()  # interrupted
    _, resumed = train(compose_train(*common, "trainer.max_epochs=2", "ckpt_path=last", root=image_folder))
    assert resumed["run_dir"] == str(runs / "old")
    last = torch.load(runs / "old" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 1


# ---- 4. trainer presets inherit; 5. the tools' inference group ---------------------------------------------
def test_the_cpu_trainer_is_the_default_one() -> None:
    assert composed("trainer=cpu").trainer == composed("trainer=default").trainer
    ddp_cpu = composed("trainer=ddp_cpu").trainer
    assert (ddp_cpu.accelerator, ddp_cpu.devices, ddp_cpu.strategy.process_group_backend) == (
        "cpu",
        2,
        "gloo",
    )


INFERENCE_KEYS = ("device", "precision", "engine", "trust_torchscript")
BATCH_KEYS = ("batch_size", "max_memory_mb", "num_workers", "progress")


def test_the_tools_share_the_inference_keys_at_the_top_level() -> None:
    evaluation = compose_tool("eval", "ckpt_path=x", "device=cpu", "batch_size=8")
    assert (evaluation.device, evaluation.batch_size, evaluation.num_workers) == ("cpu", 8, None)
    predict = compose_tool("predict", "ckpt_path=x")
    assert predict.num_workers == 0 and all(k in predict for k in INFERENCE_KEYS + BATCH_KEYS)
    serve = compose_tool("serve", "ckpt_path=x", "device=cpu")
    assert serve.device == "cpu" and all(k in serve for k in INFERENCE_KEYS)
    assert not any(k in serve for k in BATCH_KEYS)  # one photo at a time
    assert not any(k in compose_tool("export", "ckpt_path=x") for k in INFERENCE_KEYS + BATCH_KEYS)

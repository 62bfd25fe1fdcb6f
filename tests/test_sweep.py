"""Hydra sweeps: a failed trial is recorded and the sweep goes on; the multirun dir gets a summary table."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from foodvision.runs.sweep import run_trial, write_sweep_summary

from .conftest import CONFIG_DIR, ROOT, make_class_tree

QUIET = [
    "~callbacks.progress_bar",
    "+trainer.enable_progress_bar=false",
    "+trainer.enable_model_summary=false",
]


@pytest.fixture
def small_tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    for split, count, seed in (("train", 6, 0), ("validation", 2, 100), ("test", 2, 200)):
        make_class_tree(root / split, ["a", "b", "c"], count, start_seed=seed)
    return root


def _run_train(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONHASHSEED": "0"}
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_multirun_records_failed_trial_and_writes_summary(small_tree: Path, tmp_path: Path) -> None:
    """2x2 grid; six 2x2 poolings of a 32 px image leave nothing to pool, so exactly one trial fails."""
    sweep = tmp_path / "sweep"
    result = _run_train(
        "-m", "experiment=scratch_baseline", "debug=fdr", "data=imagefolder", f"data.root={small_tree}",
        f"paths.root_dir={tmp_path}", "data.num_workers=0", "data.batch_size=4",
        "model.scratch.widths=[8],[8,8,8,8,8,8]", "data.image_size=32,64", f"hydra.sweep.dir={sweep}", *QUIET,
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _read_csv(sweep / "summary.csv")
    assert [r["trial"] for r in rows] == ["0", "1", "2", "3"]
    assert [r["status"] for r in rows] == ["ok", "ok", "failed", "ok"]
    failed = rows[2]
    assert (
        "model.scratch.widths=[8,8,8,8,8,8]" in failed["overrides"]
        and "data.image_size=32" in failed["overrides"]
    )
    assert failed["error"].startswith("RuntimeError") and failed["test_acc"] == ""
    assert failed["model"] == "scratch_cnn[8, 8, 8, 8, 8, 8]" and failed["lr"] == "0.001"
    record = json.loads((sweep / "2" / "failed.json").read_text())
    assert record["error_type"] == "RuntimeError" and "Traceback" in record["traceback"]
    assert "data.image_size=32" in record["overrides"]
    for row in (rows[0], rows[1], rows[3]):  # the compare leaderboard's columns
        assert row["model"].startswith("scratch_cnn[8") and row["lr"] == "0.001"
        assert row["unfreeze"] == "all (no freezing)" and int(row["params_total"]) > 0
        assert 0.0 <= float(row["test_acc"]) <= 1.0 and float(row["test_loss"]) > 0
        assert row["val_acc"] and row["test_f1_macro"] and row["train_seconds"]
    assert rows[1]["image_size"] == "64" and rows[3]["model"] == "scratch_cnn[8, 8, 8, 8, 8, 8]"
    markdown = (sweep / "summary.md").read_text()
    assert "4 trials: 3 ok, 1 failed" in markdown
    assert "| 2 | failed | model.scratch.widths=[8,8,8,8,8,8] data.image_size=32 |" in markdown


def test_failure_raises_in_a_single_run_and_is_recorded_in_a_multirun(tmp_path: Path) -> None:
    def broken(cfg):
        raise ValueError("bad trial")

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        single = compose("train", overrides=[f"paths.root_dir={tmp_path}"], return_hydra_config=True)
        multi = compose(
            "train", overrides=[f"paths.root_dir={tmp_path}", "hydra.mode=MULTIRUN"], return_hydra_config=True
        )
    GlobalHydra.instance().clear()
    for cfg in (single, multi):
        with open_dict(cfg):
            cfg.hydra.job.num = 3
            cfg.hydra.runtime.output_dir = str(tmp_path / "trial")
    try:
        assert run_trial(lambda cfg: (0.5, {}), single) == 0.5
        with pytest.raises(ValueError, match="bad trial"):  # no Hydra at all: raises
            run_trial(broken, single)
        HydraConfig.instance().set_config(single)
        with pytest.raises(ValueError, match="bad trial"):
            run_trial(broken, single)
        assert not (tmp_path / "trial" / "failed.json").exists()
        HydraConfig.instance().set_config(multi)
        assert run_trial(broken, multi) is None
        record = json.loads((tmp_path / "trial" / "failed.json").read_text())
        assert record["error_type"] == "ValueError" and record["message"] == "bad trial"
        with open_dict(multi):
            multi.failed_trial_value = 0.0  # the optuna config's way to score a failed trial
        assert run_trial(broken, multi) == 0.0
    finally:
        HydraConfig.instance().cfg = None


def test_summary_of_ok_failed_and_incomplete_trials(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    config = {"model": {"name": "m"}, "optimizer": {"lr": 0.01}, "trainer": {"max_epochs": 2},
              "augment": {"name": "seed"}, "finetune": {"enabled": True, "unfreeze": "blocks.5"}}  # fmt: skip
    for num in (0, 1, 2, 10):
        trial = sweep / str(num)
        (trial / ".hydra").mkdir(parents=True)
        OmegaConf.save(
            OmegaConf.create([f"optimizer.lr={num}", "model=m"]), trial / ".hydra" / "overrides.yaml"
        )
        OmegaConf.save(OmegaConf.create({"hydra": {"job": {"num": num}}}), trial / ".hydra" / "hydra.yaml")
        OmegaConf.save(OmegaConf.create(config), trial / ".hydra" / "config.yaml")
    (sweep / "0" / "metrics.json").write_text(
        json.dumps({"val/acc": 0.5, "test/acc": 0.25, "train_seconds": 3.0})
    )
    (sweep / "10" / "metrics.json").write_text(json.dumps({"val/acc": 0.75, "test/acc": 0.5}))
    (sweep / "1" / "failed.json").write_text(json.dumps({"error_type": "OSError", "message": "disk | full"}))
    csv_path, md_path, _ = write_sweep_summary(sweep)
    rows = _read_csv(csv_path)
    assert [(r["trial"], r["status"]) for r in rows] == [
        ("0", "ok"),
        ("1", "failed"),
        ("2", "incomplete"),
        ("10", "ok"),
    ]
    assert rows[0]["unfreeze"] == "blocks.5" and rows[0]["epochs"] == "2" and rows[0]["augment"] == "seed"
    assert rows[0]["val_acc"] == "0.5" and rows[0]["test_acc"] == "0.25" and rows[0]["model"] == "m"
    assert rows[1]["error"] == "OSError: disk | full"
    markdown = md_path.read_text()
    assert "2 ok, 1 failed, 1 incomplete" in markdown and "best by val_acc: trial 10 (0.7500)" in markdown
    assert "every trial: `model=m`" in markdown and "disk \\| full" in markdown


@pytest.mark.skipif(
    importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is None,
    reason='needs pip install -e ".[sweep]"',
)
@pytest.mark.slow  # a 2-trial optuna multirun: ~25 s; make test-all (CI) runs it
def test_optuna_sweep_stores_study_and_reuses_cached_features(small_tree: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    result = _run_train(
        "hparams_search=optuna", "hydra.sweeper.n_trials=2", "data=imagefolder", f"data.root={small_tree}",
        f"paths.root_dir={tmp_path}", "data.num_workers=0", "data.batch_size=8", "data.image_size=32",
        "trainer.max_epochs=1", f"hydra.sweep.dir={sweep}", *QUIET,
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "lightning_logs" / "optuna.db").is_file()  # its directory did not exist before
    first, second = (sweep / "0" / "train.log").read_text(), (sweep / "1" / "train.log").read_text()
    # The first trial computes the frozen backbone's features, the second loads them (train and val).
    assert "feature cache hit" not in first and "] - cached " in first
    assert second.count("feature cache hit") >= 2 and "] - cached " not in second
    rows = _read_csv(sweep / "summary.csv")
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert all("optimizer.lr=" in r["overrides"] and "model.head.hidden=" in r["overrides"] for r in rows)
    assert (sweep / "optimization_results.yaml").is_file()

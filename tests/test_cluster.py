"""Scale-out configs: DDP on CPU processes (gloo), and SLURM job parameters (no cluster needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from foodvision.evaluation.evaluate import evaluate

from .conftest import CONFIG_DIR, ROOT, compose_tool


def _compose_with_hydra(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def test_slurm_launcher_config_gives_expected_sbatch_parameters(tmp_path: Path, monkeypatch) -> None:
    submitit = pytest.importorskip("submitit")
    fake_bin = tmp_path / "bin"  # submitit renders sbatch scripts only where it can see srun
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\n")
    (fake_bin / "sbatch").write_text('#!/bin/sh\necho "Submitted batch job 42"\n')  # accepts, runs nothing
    for tool in ("srun", "sbatch"):
        (fake_bin / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}:{os.environ['PATH']}")
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = _compose_with_hydra(
        "hydra/launcher=slurm", "trainer=ddp", "hydra.launcher.partition=a100", "hydra.launcher.nodes=2"
    )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.tasks_per_node == launcher.gpus_per_node == 4
    assert cfg.trainer.strategy._target_.endswith("DDPStrategy") and cfg.trainer.devices == -1

    # What the plugin does with these (hydra_submitit_launcher.submitit_launcher.BaseSubmititLauncher.launch).
    executor = submitit.AutoExecutor(folder=str(tmp_path), cluster="slurm")
    skip = {"_target_", "submitit_folder", "max_num_timeout"}
    base = {
        "timeout_min",
        "cpus_per_task",
        "gpus_per_node",
        "tasks_per_node",
        "mem_gb",
        "nodes",
        "name",
        "stderr_to_stdout",
    }
    params = {k if k in base else f"slurm_{k}": v for k, v in launcher.items() if k not in skip}
    params["name"] = "foodvision"
    executor.update_parameters(**params)
    job = executor.submit(print, "foodvision")  # the script submitit hands to sbatch stays in the job folder
    script = Path(job.paths.submission_file).read_text()
    for line in (
        "#SBATCH --partition=a100",
        "#SBATCH --nodes=2",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --mem=64GB",
        "#SBATCH --time=240",
    ):
        assert line in script, script


def test_ddp_cpu_trainer_config_instantiates(compose_train) -> None:
    import hydra

    cfg = compose_train("trainer=ddp_cpu", "trainer.precision=32-true")
    trainer = hydra.utils.instantiate(cfg.trainer)
    assert type(trainer.strategy).__name__ == "DDPStrategy"
    assert trainer.strategy.process_group_backend == "gloo"
    assert trainer.num_devices == 2


@pytest.mark.slow
def test_two_process_ddp_finetuning(image_folder: Path, tmp_path: Path) -> None:
    """Stage 1 and stage 2 under DDP: ranks agree, frozen parts stay, one checkpoint and log dir."""
    run, probe = tmp_path / "run", tmp_path / "probe"
    command = [
        sys.executable, str(ROOT / "train.py"), "trainer=ddp_cpu", "model=mobilenetv2_ft",
        "callbacks.finetune.stage1_epochs=1", "trainer.max_epochs=2", "trainer.precision=32-true",
        "data=imagefolder", f"data.root={image_folder}", "data.image_size=32", "data.batch_size=4",
        "data.num_workers=0", f"paths.root_dir={tmp_path}", f"hydra.run.dir={run}", "~callbacks.progress_bar",
        "+callbacks.rank_check._target_=tests.ddp_probe.RankConsistencyProbe", f"+callbacks.rank_check.out_dir={probe}",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    ranks = [(probe / f"rank{r}.txt").read_text().split("\n")[:-1] for r in (0, 1)]
    assert ranks[0] == ranks[1] and len(ranks[0]) >= 4  # identical weights after every step
    rows = [line.split() for line in ranks[0]]
    for stage in ("1", "2"):
        frozen = {row[2] for row in rows if row[3] == stage}
        assert len(frozen) == 1, f"frozen part moved in stage {stage}"
    assert len({row[1] for row in rows if row[3] == "2"}) > 1  # stage 2 did train something

    # written once: one events file, one checkpoints dir, no stray run dirs
    writers = {p.name.split(".")[-2] for p in run.glob("events.out.tfevents.*")}  # ...<host>.<pid>.<n>
    assert len(writers) == 1, writers
    assert sorted(p.name for p in (run / "checkpoints").iterdir())[-1] == "last.ckpt"
    assert not (tmp_path / "lightning_logs").exists()

    # rank 0 tested the best checkpoint with eval.py's code: the same metrics as eval.py on it, in a new process
    metrics = json.loads((run / "metrics.json").read_text())
    evaluated = evaluate(
        compose_tool(
            "eval", f"ckpt_path={metrics['best_checkpoint']}", "precision=32", "device=cpu", "num_workers=0",
            f"output_dir={tmp_path / 'eval'}", "report=false",
        )
    )  # fmt: skip
    for key in ("test/acc", "test/loss", "test/f1_macro"):
        assert evaluated[key] == pytest.approx(metrics[key], abs=1e-4), key

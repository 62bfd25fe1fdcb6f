"""The command-line entry points (src/foodvision/cli/): the repository's scripts and the console scripts run
them, ``foodvision-sweep``'s arguments, and missing offline weights ending in one ``error:`` line."""

from __future__ import annotations

import importlib
import os
import runpy
import subprocess
import sys
from pathlib import Path

from foodvision.cli.sweep import main as sweep_main

from .conftest import ROOT, make_class_tree
from .test_faults import QUIET

TOOLS = ("train", "eval", "predict", "export", "serve", "compare", "audit")


def test_each_repository_script_runs_its_cli_module() -> None:
    """``python <tool>.py`` and ``foodvision-<tool>`` (test_install.py) are the same command."""
    for tool in TOOLS:
        script = runpy.run_path(str(ROOT / f"{tool}.py"), run_name="imported")  # not __main__: nothing runs
        assert script["main"] is importlib.import_module(f"foodvision.cli.{tool}").main


def test_sweep_summary_command_checks_its_arguments(tmp_path: Path, capsys) -> None:
    assert sweep_main([]) == 2
    assert sweep_main(["--help"]) == 0 and "MULTIRUN_DIR" in capsys.readouterr().out
    assert sweep_main([str(tmp_path / "missing")]) == 2
    assert f"error: {tmp_path / 'missing'} is not a directory" in capsys.readouterr().err


def test_missing_offline_weights_end_in_one_error_line_naming_the_key(tmp_path: Path) -> None:
    """efficientnet_b0 has no offline weight package: offline, with an empty Hugging Face cache, training
    stops with the sources tried and how to fix it (model.weights_file=...), not a traceback."""
    tree = tmp_path / "tree"
    for split in ("train", "validation", "test"):
        make_class_tree(tree / split, ["a", "b"], 2)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "HF_HOME": str(tmp_path / "hf")}
    env["HF_HUB_CACHE"] = str(tmp_path / "hf" / "hub")
    env.pop("HYDRA_FULL_ERROR", None)
    args = [
        "model=efficientnet_b0",
        "data=imagefolder",
        f"data.root={tree}",
        "debug=fdr",
        "data.image_size=32",
    ]
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args, f"paths.root_dir={tmp_path}", *QUIET],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "'efficientnet_b0'" in errors[0], result.stderr[-3000:]
    message = result.stderr[result.stderr.index(errors[0]) :]
    assert (
        "HF_HUB_OFFLINE=1" in message
        and "model.weights_file=" in message
        and "model.pretrained=false" in message
    )

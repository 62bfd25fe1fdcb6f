"""bench/run.py: a --quick run writes results.json and results.md; run-dir selection of the recipe section.

No timing assertions: speed targets do not belong in unit tests (the machine may be busy).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import ROOT, SHARED_MINI, make_class_tree

RUN_PY = ROOT / "bench" / "run.py"


def load_bench_module(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    """The shared Food-101 mini archive, or a generated class-per-folder tree when it is missing."""
    if SHARED_MINI.is_dir():
        return SHARED_MINI
    root = tmp_path / "food"
    make_class_tree(root, ["apple_pie", "baklava", "bibimbap"], 12)
    return root


@pytest.mark.slow  # every section at toy sizes: ~50 s; `make test-all` (CI) runs it
def test_quick_run_writes_results(tmp_path: Path, data_root: Path) -> None:
    out = tmp_path / "bench"
    command = [
        sys.executable,
        str(RUN_PY),
        "--quick",
        "--sections",
        "matmul_peak,inference,frozen_epoch",
        "--out",
        str(out),
        "--threads",
        "1",  # the test may share the machine with other work
        "--ckpt",
        "none",
        "--data-root",
        str(data_root),
        "--no-cuda",
    ]
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]

    results = json.loads((out / "results.json").read_text())
    assert results["plan"] == ["matmul_peak", "inference", "frozen_epoch"]
    assert results["machine"]["cpu_model"] and results["machine"]["cores"] >= 1
    assert results["machine"]["torch_environment"]["torch"]
    assert not results["machine"]["parent_imported_torch"]  # else every child would inherit its RSS
    sections = results["sections"]
    assert all(sections[name]["status"] == "ok" for name in results["plan"])

    peak = sections["matmul_peak"]["summary"]
    assert positive(peak["fp32_gflops"]) and positive(peak["bf16_gflops"])

    inference = sections["inference"]["summary"]
    for key in ("baseline_images_per_s", "ours_images_per_s", "ratio", "flops_per_image"):
        assert positive(inference[key]), key
    assert positive(inference["baseline_fraction_of_peak"]) and positive(inference["ours_fraction_of_peak"])
    assert positive(inference["baseline_peak_rss_mb"]) and positive(inference["ours_peak_rss_mb"])
    setup = sections["inference"]["raw"]["ours"]["setup"]
    assert setup["rss_at_start_mb"] < setup["setup_peak_rss_mb"]
    assert "skipped" in inference["accuracy"]  # --ckpt none

    frozen = sections["frozen_epoch"]["summary"]
    for key in (
        "baseline_epoch_seconds",
        "ours_epoch_seconds",
        "ours_extract_seconds",
        "ratio_1_epoch",
        "ratio_10_epochs",
        "baseline_peak_rss_mb",
        "ours_peak_rss_mb",
    ):
        assert positive(frozen[key]), key
    raw = sections["frozen_epoch"]["raw"]
    assert len(raw["baseline"]["runs"]) == len(raw["ours"]["runs"]) == 1  # --quick: one repeat

    table = (out / "results.md").read_text()
    assert "| section | baseline | foodvision | ratio | notes |" in table
    for name in ("matmul_peak", "inference", "frozen_epoch (1 epoch)", "frozen_epoch (10 epochs"):
        assert f"| {name}" in table


def test_unknown_section_is_refused() -> None:
    run = load_bench_module("run")
    with pytest.raises(SystemExit):
        run.selected_sections("matmul_peak,warp_drive")
    assert run.selected_sections("recipe,matmul_peak") == ["matmul_peak", "recipe"]


def fake_run(log_dir: Path, name: str, config: dict, overrides: list[str], finished: float) -> Path:
    run_dir = log_dir / "runs" / name
    (run_dir / ".hydra").mkdir(parents=True)
    hydra = {"hydra": {"runtime": {"choices": {"model": "mobilenetv2_ft"}}}}
    (run_dir / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra))
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    metrics = run_dir / "metrics.json"
    metrics.write_text(json.dumps({"wall_seconds": 100.0, "train_seconds": 90.0, "test/acc": 0.8}))
    os.utime(metrics, (finished, finished))
    return run_dir


def test_recipe_reads_the_newest_default_run(tmp_path: Path) -> None:
    sections = load_bench_module("sections")
    default = sections.default_recipe_config()  # conf/train.yaml as it is now
    assert (
        default["model"]["name"] == "mobilenetv2_100"
        and default["callbacks"]["finetune"]["unfreeze"] == "blocks.5"
    )
    log_dir = tmp_path / "lightning_logs"
    longer = copy.deepcopy(default)
    longer["trainer"]["max_epochs"] += 5
    fake_run(log_dir, "longer", longer, ["trainer.max_epochs=99"], 1_000)
    smoke = copy.deepcopy(default)
    smoke["data"]["image_size"] = 64
    smoke["trainer"]["fast_dev_run"] = True
    fake_run(log_dir, "smoke", smoke, ["debug=fdr", "data.image_size=64"], 3_000)
    run, note = sections.newest_default_run(log_dir, default)
    assert run["run_dir"].endswith("longer") and not run["default_recipe"]  # not the newer smoke test
    assert run["differs_from_default_in"] == ["trainer.max_epochs"] and "trainer.max_epochs" in note
    same = copy.deepcopy(default)
    same["data"]["root"] = str(tmp_path)  # where the data is does not change the recipe
    fake_run(log_dir, "default", same, [f"data.root={tmp_path}"], 2_000)
    run, note = sections.newest_default_run(log_dir, default)
    assert run["run_dir"].endswith("default") and run["default_recipe"]
    assert run["wall_seconds"] == 100.0 and run["test_acc"] == 0.8
    assert run["stage1_epochs"] == default["callbacks"]["finetune"]["stage1_epochs"]


def test_memory_rows_and_merge_keep_earlier_sections(tmp_path: Path) -> None:
    run = load_bench_module("run")
    measured = [
        {"command": "train.py", "side": "foodvision", "photos": 5000, "peak_rss_mb": 1900.0, "seconds": 200},
        {"command": "train.py", "side": "plain", "photos": 1280, "peak_rss_mb": 1500.0, "seconds": 60},
        {"command": "eval.py", "side": "foodvision", "photos": 1250, "peak_rss_mb": 1400.0, "seconds": 50},
        {"command": "eval.py", "side": "plain", "photos": 1250, "peak_rss_mb": 1300.0, "seconds": 70},
        {"command": "eval.py", "side": "foodvision", "photos": 5000, "peak_rss_mb": 1410.0, "seconds": 190},
    ]
    raw = {
        "status": "ok",
        "main": {"runs": [{"measurements": measured, "checkpoint": "x.ckpt"}], "finish": {}},
    }
    cfg = {"memory_train_args": ["trainer.max_epochs=10"], "memory_tool_args": ["precision=32"]}
    rows = run.SECTIONS["memory"].summarise("memory", raw, {}, cfg, "")["rows"]
    assert [r["foodvision"] for r in rows] == ["1,900 MB", "1,400 MB", "1,410 MB"]
    assert [r["baseline"] for r in rows] == ["1,500 MB", "1,300 MB", "-"]  # no plain run on 5,000 photos
    assert "trainer.max_epochs=10" in rows[0]["section"] and "precision=32" in rows[1]["section"]

    earlier = {
        "started": "earlier",
        "plan": ["inference", "memory", "recipe"],
        "sections": {"inference": {"rows": []}, "memory": {"rows": ["old"]}, "recipe": {"rows": []}},
    }
    (tmp_path / "results.json").write_text(json.dumps(earlier))
    document = {"plan": ["memory"], "sections": {}}
    run.merge_earlier(document, tmp_path / "results.json")
    assert document["plan"] == ["inference", "memory", "recipe"]  # the sections' own order
    assert set(document["sections"]) == {"inference", "recipe"}  # memory: this run's
    assert document["merged_from"]["sections"] == ["inference", "recipe"]
    assert document["merged_from"]["measured"] == {"inference": "earlier", "recipe": "earlier"}

    # merged again: each kept section still names the run that measured it, not the last merge
    document.update(started="later", sections={**document["sections"], "memory": {"rows": ["new"]}})
    (tmp_path / "results.json").write_text(json.dumps(document))
    again = {"started": "latest", "plan": ["inference"], "sections": {"inference": {"rows": []}}}
    run.merge_earlier(again, tmp_path / "results.json")
    assert again["merged_from"]["measured"] == {"memory": "later", "recipe": "earlier"}
    assert run.merge_note(again["merged_from"]) == (
        "Kept from earlier runs (--merge): memory from the run of later; recipe from the run of earlier."
    )
    run.merge_earlier(other := {"plan": ["memory"], "sections": {}}, tmp_path / "missing.json")
    assert other == {"plan": ["memory"], "sections": {}}


def test_committed_results_merge_and_render(tmp_path: Path) -> None:
    """bench/results.json as committed is kept section by section with --merge, and its table renders."""
    run = load_bench_module("run")
    committed = json.loads((ROOT / "bench" / "results.json").read_text())
    document = {
        **committed,
        "plan": ["matmul_peak"],
        "sections": {"matmul_peak": committed["sections"]["matmul_peak"]},
    }
    run.merge_earlier(document, ROOT / "bench" / "results.json")
    assert document["plan"] == committed["plan"]
    table = run.results.markdown(document)
    for section in committed["plan"]:
        for item in committed["sections"][section]["rows"]:
            assert f"| {item['section']} |" in table

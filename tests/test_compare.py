"""compare.py: runs ranked by test accuracy, failed runs listed, parameters counted per the recipe."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from foodvision.models.classifier import build_classifier
from foodvision.runs.compare import compare, count_parameters, find_runs

from .conftest import TinyRun, compose_tool


def copy_run(tiny_run: TinyRun, target: Path, **metric_changes: float) -> Path:
    shutil.copytree(tiny_run.run_dir, target, ignore=shutil.ignore_patterns("eval-*", "export"))
    metrics_file = target / "metrics.json"
    metrics = json.loads(metrics_file.read_text())
    metrics.update(metric_changes)
    metrics_file.write_text(json.dumps(metrics))
    return target


@pytest.fixture
def runs(tiny_run: TinyRun, tmp_path: Path) -> Path:
    """Finished runs with test acc 0.5, 0.9, 0.7; one stopped after writing its config (incomplete: without
    failed.json nothing says it failed), one was interrupted, one multirun trial raised (failed.json)."""
    root = tmp_path / "multirun" / "2026-01-01_00-00-00"
    copy_run(tiny_run, root / "0", **{"test/acc": 0.5})
    copy_run(tiny_run, root / "1", **{"test/acc": 0.9, "train_seconds": 30.0})
    copy_run(tiny_run, root / "2", **{"test/acc": 0.7})
    (root / "3").mkdir()
    shutil.copy(tiny_run.run_dir / "config.yaml", root / "3" / "config.yaml")
    interrupted = copy_run(tiny_run, root / "4")
    (interrupted / "metrics.json").unlink()
    raised = root / "5" / ".hydra"  # a multirun trial that raised before train() saved its config
    raised.mkdir(parents=True)
    shutil.copy(tiny_run.run_dir / "config.yaml", raised / "config.yaml")
    (raised.parent / "failed.json").write_text(json.dumps({"error_type": "OSError", "message": "disk full"}))
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


def test_leaderboard_ranks_by_test_accuracy_and_lists_failed_runs(runs: Path) -> None:
    rows = compare(compose_tool("compare", f"runs={runs.parent}", "throughput_iters=1", "throughput_batch=4"))
    assert [r["run"] for r in rows] == ["1", "2", "0", "3", "4", "5"]
    assert [r["rank"] for r in rows] == [1, 2, 3, None, None, None]
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "incomplete", "incomplete", "failed"]
    assert "no metrics.json" in rows[3]["note"] and "no checkpoint" in rows[3]["note"]
    assert rows[4]["checkpoint_mb"] > 0 and rows[4]["test_acc"] is None
    assert rows[5]["note"].startswith("OSError: disk full") and rows[5]["model"] == "scratch_cnn[8, 16]"
    best = rows[0]
    assert best["model"] == "scratch_cnn[8, 16]" and best["epochs"] == 2 and best["lr"] == pytest.approx(3e-3)
    assert best["unfreeze"] == "all (no freezing)"
    assert best["params_total"] == best["params_trainable"] > 0  # no fine-tuning: everything trains
    assert best["images_per_second"] > 0 and best["checkpoint_mb"] > 0

    # written into the folder that was compared
    with (runs.parent / "leaderboard.csv").open() as handle:
        saved = list(csv.DictReader(handle))
    assert [r["run"] for r in saved] == ["1", "2", "0", "3", "4", "5"]
    assert [r["status"] for r in saved] == ["ok", "ok", "ok", "incomplete", "incomplete", "failed"]
    assert float(saved[0]["test_acc"]) == pytest.approx(0.9)
    markdown = (runs.parent / "leaderboard.md").read_text()
    assert "| 1 | 1 | ok | scratch_cnn[8, 16] |" in markdown
    assert "**Recommended: `1`**" in markdown
    assert "20.0 percentage points behind" in markdown  # runner-up 2 at 0.7
    assert "3 run(s) failed or are incomplete" in markdown


def test_runs_given_as_a_list_go_to_their_common_parent(runs: Path, tmp_path: Path) -> None:
    cfg = compose_tool("compare", f"runs=[{runs / '0'},{runs / '2'}]", "throughput=false")
    rows = compare(cfg)
    assert [r["run"] for r in rows] == ["2", "0"]
    assert "images_per_second" not in rows[0]
    assert (runs / "leaderboard.md").is_file()
    assert find_runs([runs]) == [runs / str(i) for i in range(6)]


def test_trainable_parameters_follow_the_finetune_recipe() -> None:
    model, _, _ = build_classifier(4, name="mobilenetv2_100", pretrained=False, head={"hidden": 8})
    total = sum(p.numel() for p in model.parameters())
    head = sum(p.numel() for p in model.head.parameters())
    assert count_parameters(model, False, None, False) == (total, total)
    assert count_parameters(model, True, "none", False) == (total, head)
    assert count_parameters(model, True, "all", True) == (total, total)
    _, top_two = count_parameters(model, True, 2, False)
    _, top_two_bn = count_parameters(model, True, 2, True)
    assert head < top_two < top_two_bn < total


def write_predictions(run_dir: Path, correct: list[bool]) -> None:
    """An eval-test/predictions.csv of photos p000.jpg, ...: right where ``correct`` says."""
    folder = run_dir / "eval-test"
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "predictions.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "true", "predicted", "confidence"])
        for i, right in enumerate(correct):
            writer.writerow([f"p{i:03d}.jpg", "apple_pie", "apple_pie" if right else "baklava", "0.9"])


def recommend(tiny_run: TinyRun, tmp_path: Path, best: list[bool], second: list[bool]) -> str:
    root = tmp_path / "runs"
    for name, correct in (("best", best), ("second", second)):
        run = copy_run(tiny_run, root / name, **{"test/acc": sum(correct) / len(correct)})
        write_predictions(run, correct)
    compare(compose_tool("compare", f"runs={root}", "throughput=false"))
    return (root / "leaderboard.md").read_text()


def test_recommendation_calls_identical_predictions_not_significant(
    tiny_run: TinyRun, tmp_path: Path
) -> None:
    correct = [i % 10 != 0 for i in range(400)]  # both 90 %, photo for photo
    markdown = recommend(tiny_run, tmp_path, correct, correct[:200] + correct[200:])
    assert "0.0 percentage points behind, not significant at 95 %" in markdown
    assert (
        "McNemar's paired test on the same 400 test photos: 0 only `best` got right, 0 only `second`"
        in markdown
    )


def test_recommendation_calls_a_clearly_better_run_significant(tiny_run: TinyRun, tmp_path: Path) -> None:
    best = [i % 20 != 0 for i in range(400)]  # 95 %
    second = [right and i % 5 != 1 for i, right in enumerate(best)]  # 75 %: 80 photos fewer, none more
    markdown = recommend(tiny_run, tmp_path, best, second)
    assert "20.0 percentage points behind: significant at 95 %" in markdown
    assert "80 only `best` got right, 0 only `second`" in markdown


def test_recommendation_without_predictions_weighs_the_test_set_size(runs: Path) -> None:
    """No eval-test/predictions.csv: the noise of the test set's size, from metrics.json's test_images
    (the clause had read a key no longer written, and never appeared)."""
    compare(compose_tool("compare", f"runs=[{runs / '1'},{runs / '2'}]", "throughput=false"))
    images = json.loads((runs / "1" / "metrics.json").read_text())["test_images"]
    assert f"beyond the noise of its {images}-image test set" in (runs / "leaderboard.md").read_text()


def test_recommendation_reads_the_test_set_size_that_eval_wrote(tiny_run: TinyRun, tmp_path: Path) -> None:
    """Runs tested by eval.py alone (metrics.json without test_images, no predictions.csv): the size of the
    test set is eval-test/metrics.json's num_images, and the recommendation weighs the gap against it."""
    evaluated = json.loads((tiny_run.run_dir / "eval-test" / "metrics.json").read_text())
    root = tmp_path / "runs"
    for name, accuracy in (("a", 0.9), ("b", 0.5)):
        run = copy_run(tiny_run, root / name, **{"test/acc": accuracy})
        metrics = json.loads((run / "metrics.json").read_text())
        metrics.pop("test_images", None)
        (run / "metrics.json").write_text(json.dumps(metrics))
        (run / "eval-test").mkdir()
        (run / "eval-test" / "metrics.json").write_text(json.dumps(evaluated))
    compare(compose_tool("compare", f"runs={root}", "throughput=false"))
    markdown = (root / "leaderboard.md").read_text()
    assert "The runner-up `b`" in markdown
    assert f"beyond the noise of its {evaluated['num_images']}-image test set" in markdown

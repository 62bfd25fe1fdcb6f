"""eval.py: every artifact, metrics that agree with its own predictions, identical re-runs, clear refusals."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from foodvision.cli import run_tool
from foodvision.errors import ClassMismatchError, ModelLoadError, ToolError
from foodvision.evaluation.evaluate import evaluate
from foodvision.evaluation.metrics import classification_metrics
from foodvision.inference.predictor import Predictor

from .conftest import TinyRun, compose_tool, make_class_tree

ARTIFACTS = (
    "metrics.json",
    "per_class.csv",
    "confusion_matrix.png",
    "confusion_matrix.csv",
    "most_confident_wrong.csv",
    "most_confident_wrong.png",
    "curves.png",
    "predictions.csv",
    "reliability.png",  # the calibration's reliability diagram (foodvision.evaluation.trust)
    "report.html",
)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_metric_helper_on_a_hand_made_confusion_matrix() -> None:
    # rows: true class, columns: predicted; class 3 never occurs and is never predicted
    confusion = [[3, 1, 0, 0], [0, 2, 2, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    m = classification_metrics(confusion)
    assert m["accuracy"] == pytest.approx(6 / 10)
    precision = [3 / 4, 2 / 3, 1 / 3, 0.0]
    recall = [3 / 4, 2 / 4, 1 / 2, 0.0]
    f1 = [0.75, 4 / 7, 0.4, 0.0]
    np.testing.assert_allclose(m["per_class"]["precision"], precision)
    np.testing.assert_allclose(m["per_class"]["recall"], recall)
    np.testing.assert_allclose(m["per_class"]["f1"], f1)
    assert m["per_class"]["support"].tolist() == [4, 4, 2, 0]
    assert m["precision_macro"] == pytest.approx(sum(precision) / 4)
    assert m["f1_macro"] == pytest.approx(sum(f1) / 4)
    assert m["recall_weighted"] == pytest.approx(0.6)  # support-weighted recall is accuracy
    assert m["f1_weighted"] == pytest.approx((4 * 0.75 + 4 * 4 / 7 + 2 * 0.4) / 10)


def run_eval(tiny_run: TinyRun, out: Path, *overrides: str) -> dict:
    return evaluate(compose_tool("eval", f"ckpt_path={tiny_run.checkpoint}", f"output_dir={out}", *overrides))


def test_eval_writes_every_artifact_and_agrees_with_its_predictions(
    tiny_run: TinyRun, tmp_path: Path
) -> None:
    metrics = run_eval(tiny_run, tmp_path / "eval", "precision=32", "num_workers=0")
    out = tmp_path / "eval"
    for name in ARTIFACTS:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert json.loads((out / "metrics.json").read_text()) == metrics

    # the training run's test after fitting (same images, same checkpoint, float32 both times): the same
    # metrics, key for key
    trained = json.loads((tiny_run.run_dir / "metrics.json").read_text())
    tested = {k: v for k, v in metrics.items() if k.startswith("test/")}
    assert set(tested) >= {"test/acc", "test/acc_top5", "test/loss", "test/f1_macro", "test/recall_weighted"}
    assert set(tested) == {k for k in trained if k.startswith("test/")}
    for key, value in tested.items():
        # test/f1_ci is a dict (class -> interval): equal as computed, not approx
        expected = value if isinstance(value, dict) else pytest.approx(value, abs=1e-4)
        assert trained[key] == expected, key

    # hand computation from predictions.csv
    rows = read_csv(out / "predictions.csv")
    assert len(rows) == metrics["num_images"] == 6 * 4
    classes = list(tiny_run.classes)
    true = np.array([classes.index(r["true"]) for r in rows])
    pred = np.array([classes.index(r["predicted"]) for r in rows])
    assert all(Path(r["file"]).parent.name == r["true"] for r in rows)
    assert metrics["test/acc"] == pytest.approx(float((true == pred).mean()))
    precision, recall, f1, support = [], [], [], []
    for c in range(len(classes)):
        tp = int(((pred == c) & (true == c)).sum())
        predicted, actual = int((pred == c).sum()), int((true == c).sum())
        p = tp / predicted if predicted else 0.0
        r = tp / actual if actual else 0.0
        precision.append(p)
        recall.append(r)
        f1.append(2 * p * r / (p + r) if p + r else 0.0)
        support.append(actual)
    weights = np.array(support) / sum(support)
    assert metrics["test/precision_macro"] == pytest.approx(np.mean(precision))
    assert metrics["test/recall_macro"] == pytest.approx(np.mean(recall))
    assert metrics["test/f1_macro"] == pytest.approx(np.mean(f1))
    assert metrics["test/precision_weighted"] == pytest.approx(float(np.dot(precision, weights)))
    assert metrics["test/recall_weighted"] == pytest.approx(float(np.dot(recall, weights)))
    assert metrics["test/f1_weighted"] == pytest.approx(float(np.dot(f1, weights)))
    assert 0.0 <= metrics["test/acc"] <= metrics["test/acc_top5"] <= 1.0  # 6 classes: top-5 reported

    per_class = read_csv(out / "per_class.csv")
    assert [r["class"] for r in per_class] == classes
    for i, r in enumerate(per_class):
        assert float(r["precision"]) == pytest.approx(precision[i], abs=1e-6)
        assert float(r["recall"]) == pytest.approx(recall[i], abs=1e-6)
        assert float(r["f1"]) == pytest.approx(f1[i], abs=1e-6)
        assert int(r["support"]) == support[i]

    with (out / "confusion_matrix.csv").open() as handle:
        table = list(csv.reader(handle))
    assert table[0][1:] == classes
    counts = np.array([[int(v) for v in line[1:]] for line in table[1:]])
    expected = np.zeros((len(classes), len(classes)), dtype=int)
    np.add.at(expected, (true, pred), 1)
    np.testing.assert_array_equal(counts, expected)

    wrong = read_csv(out / "most_confident_wrong.csv")
    assert len(wrong) == int((true != pred).sum())
    confidences = [float(r["confidence"]) for r in wrong]
    assert confidences == sorted(confidences, reverse=True)
    assert all(r["true"] != r["predicted"] for r in wrong)


def test_eval_rerun_gives_identical_files(tiny_run: TinyRun, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    run_eval(tiny_run, out)  # default precision: bf16 autocast where supported
    first = {p.name: stable_bytes(p) for p in out.iterdir()}
    assert set(first) == set(ARTIFACTS)
    run_eval(tiny_run, out)
    assert {p.name: stable_bytes(p) for p in out.iterdir()} == first


def stable_bytes(path: Path) -> bytes:
    """The file's bytes; report.html without its measured timings (the only part that may differ)."""
    data = path.read_bytes()
    return re.sub(rb'<span class="measured">.*?</span>', b"", data) if path.name == "report.html" else data


def test_eval_default_dir_data_from_the_run_and_val_split(tiny_run: TinyRun, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run.run_dir, run, ignore=shutil.ignore_patterns("eval-*", "export"))
    ckpt = run / "checkpoints" / tiny_run.checkpoint.name
    metrics = evaluate(compose_tool("eval", f"ckpt_path={ckpt}", "data.split=validation"))
    assert metrics["split"] == "val" and metrics["num_images"] == 6 * 3
    assert (run / "eval-val" / "curves.png").is_file()


def test_eval_of_a_lone_checkpoint_on_other_data_skips_curves(tiny_run: TinyRun, tmp_path: Path) -> None:
    lone = tmp_path / "models" / "model.ckpt"
    lone.parent.mkdir()
    shutil.copy(tiny_run.checkpoint, lone)
    other = tmp_path / "other"
    make_class_tree(other, tiny_run.classes, 4, start_seed=500)  # a flat tree: split 70/15/15 per class
    metrics = evaluate(compose_tool("eval", f"ckpt_path={lone}", "data=imagefolder", f"data.root={other}"))
    out = lone.parent / "eval-test"
    assert {p.name for p in out.iterdir()} == set(ARTIFACTS) - {"curves.png"}
    assert "no TensorBoard events" in metrics["notes"][0]


def test_eval_refuses_data_with_other_classes(tiny_run: TinyRun, tmp_path: Path) -> None:
    other = tmp_path / "other"
    for split in ("train", "validation", "test"):
        make_class_tree(other / split, ["apple_pie", "baklava", "ramen"], 2)
    cfg = compose_tool("eval", f"ckpt_path={tiny_run.checkpoint}", "data=imagefolder", f"data.root={other}")
    with pytest.raises(ClassMismatchError) as error:
        evaluate(cfg)
    message = str(error.value)
    assert "only in the model: bibimbap, churros, donuts, falafel" in message
    assert "only in the data: ramen" in message
    assert not (tmp_path / "eval-test").exists()


class NotFoodvision(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)


@pytest.mark.parametrize(
    "kind, message",
    [
        ("missing", "does not exist"),
        ("text", "is not a PyTorch checkpoint"),
        ("state_dict", "is not a foodvision checkpoint"),
        ("pickled", "pickled Python objects"),
        ("other_architecture", "do not fit the architecture"),
    ],
)
def test_bad_checkpoints_are_clear_errors(tiny_run: TinyRun, tmp_path: Path, kind: str, message: str) -> None:
    path = tmp_path / "bad.ckpt"
    if kind == "text":
        path.write_text("not a checkpoint\n")
    elif kind == "state_dict":
        torch.save(NotFoodvision().state_dict(), path)
    elif kind == "pickled":
        torch.save(NotFoodvision(), path)
    elif kind == "other_architecture":
        checkpoint = torch.load(tiny_run.checkpoint, map_location="cpu", weights_only=True)
        checkpoint["foodvision"]["model"]["scratch"]["widths"] = [8, 32]
        torch.save(checkpoint, path)
    with pytest.raises(ModelLoadError, match=message):
        Predictor(path)
    with pytest.raises(ModelLoadError, match=message):
        evaluate(compose_tool("eval", f"ckpt_path={path}"))


def test_eval_missing_checkpoint_exits_with_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    cfg = compose_tool("eval", f"ckpt_path={tmp_path / 'nope.ckpt'}")
    with pytest.raises(SystemExit) as exit_info:
        run_tool(evaluate, cfg)
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip() == f"error: model file {tmp_path / 'nope.ckpt'} does not exist"


def test_eval_with_torch_and_onnxruntime_engines_agree(tiny_run: TinyRun, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    common = ("precision=32", "device=cpu", "num_workers=0")
    by_torch = run_eval(tiny_run, tmp_path / "torch", "engine=torch", *common)
    by_ort = run_eval(tiny_run, tmp_path / "ort", "engine=onnxruntime", *common)
    assert (by_torch["engine"], by_ort["engine"]) == ("torch", "onnxruntime")
    assert by_ort["test/acc"] == by_torch["test/acc"]
    assert by_ort["test/loss"] == pytest.approx(by_torch["test/loss"], rel=1e-4, abs=1e-6)
    rows_torch = read_csv(tmp_path / "torch" / "predictions.csv")
    rows_ort = read_csv(tmp_path / "ort" / "predictions.csv")
    assert [(r["file"], r["predicted"]) for r in rows_ort] == [
        (r["file"], r["predicted"]) for r in rows_torch
    ]
    for a, b in zip(rows_ort, rows_torch, strict=True):
        assert float(a["confidence"]) == pytest.approx(float(b["confidence"]), abs=1e-4)


def test_unknown_or_impossible_engine_is_a_clear_error(
    tiny_run: TinyRun, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    message = "engine must be one of auto, torch, onnxruntime, got 'bogus'"
    with pytest.raises(ToolError, match=message):
        Predictor(tiny_run.checkpoint, engine="bogus")
    cfg = compose_tool("eval", f"ckpt_path={tiny_run.checkpoint}", f"output_dir={tmp_path}", "engine=bogus")
    with pytest.raises(SystemExit) as exit_info:
        run_tool(evaluate, cfg)
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip() == f"error: {message}"
    assert not any(tmp_path.iterdir())
    pytest.importorskip("onnxruntime")
    with pytest.raises(ToolError, match="engine=onnxruntime runs float32 on the CPU"):
        Predictor(tiny_run.checkpoint, device="cpu", precision="bf16", engine="onnxruntime")

"""Calibration: the temperature is the NLL minimiser, ECE falls after scaling, the "unknown" threshold, AUROC,
and the calibration travelling with the model (checkpoint, old checkpoints, ONNX, TorchScript, app)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from foodvision.inference.calibration import (
    SCORES,
    Calibration,
    auroc,
    brier_score,
    ece_of_logits,
    fit_calibration,
    fit_temperature,
    in_distribution_score,
    is_unknown,
    nll,
    reliability_bins,
    threshold_keeping,
)
from foodvision.inference.checkpoints import CHECKPOINT_KEY, read_checkpoint, save_calibration
from foodvision.inference.predict import predict
from foodvision.inference.predictor import Predictor

from .conftest import TinyRun, compose_tool


def overconfident_logits(n: int = 2000, classes: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a model right ~70 % of the time but ~3x too sharp: a temperature near 3 fixes them."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=generator)
    logits = torch.randn(n, classes, generator=generator)
    logits[torch.arange(n), labels] += 1.5
    return 3.0 * logits, labels


def test_temperature_is_the_nll_minimiser() -> None:
    logits, labels = overconfident_logits()
    fitted = fit_temperature(logits, labels)
    grid = np.exp(np.linspace(np.log(0.2), np.log(20), 2001))
    losses = [nll(logits, labels, t) for t in grid]
    best = float(grid[int(np.argmin(losses))])
    assert fitted == pytest.approx(best, rel=5e-3)
    assert nll(logits, labels, fitted) <= min(losses) + 1e-9
    assert 1.5 < fitted < 4.5  # the logits were made three times too sharp


def test_temperature_of_underconfident_logits_is_below_one() -> None:
    logits, labels = overconfident_logits()
    assert fit_temperature(logits / 9.0, labels) < 1.0


def test_ece_falls_after_scaling_and_predictions_do_not_change() -> None:
    logits, labels = overconfident_logits()
    fitted = fit_temperature(logits, labels)
    before, after = ece_of_logits(logits, labels), ece_of_logits(logits, labels, fitted)
    assert after < before / 3 and after < 0.03
    assert torch.equal((logits / fitted).argmax(dim=1), logits.argmax(dim=1))
    p_before = logits.softmax(dim=1).numpy()
    p_after = (logits / fitted).softmax(dim=1).numpy()
    assert brier_score(p_after, labels.numpy()) < brier_score(p_before, labels.numpy())


def test_reliability_bins_and_brier_on_known_values() -> None:
    bins = reliability_bins([0.05, 0.95, 0.95, 1.0], [False, True, False, True], bins=10)
    assert [b["count"] for b in bins] == [1, 0, 0, 0, 0, 0, 0, 0, 0, 3]
    assert bins[9]["accuracy"] == pytest.approx(2 / 3) and bins[9]["confidence"] == pytest.approx(2.9 / 3)
    # one photo certain and right (0), one certain and wrong (2), one uniform over 2 classes (0.5)
    p = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    assert brier_score(p, [0, 0, 1]) == pytest.approx((0 + 2 + 0.5) / 3)


def test_scores_threshold_and_auroc() -> None:
    logits = torch.tensor([[4.0, 0.0, 0.0], [1.0, 1.0, 1.0], [10.0, 9.0, 0.0]])
    probability = in_distribution_score(logits, "probability")
    assert probability[1] == pytest.approx(1 / 3)
    assert in_distribution_score(logits, "max_logit").tolist() == [4.0, 1.0, 10.0]
    assert in_distribution_score(logits, "energy")[1] == pytest.approx(1.0 + np.log(3))
    assert set(SCORES) == {"probability", "energy", "max_logit"}
    scores = np.arange(100) / 100  # keep 95 % of these: the threshold is the 6th smallest
    threshold = threshold_keeping(scores, 0.95)
    assert np.mean(scores >= threshold) >= 0.95 and np.mean(scores >= threshold + 0.005) < 0.95
    assert auroc([2, 3, 4], [0, 1]) == 1.0 and auroc([0, 1], [2, 3]) == 0.0
    assert auroc([1, 1], [1, 1]) == 0.5
    assert auroc([0, 2], [1]) == 0.5
    calibration = Calibration(unknown_score="probability", unknown_threshold=0.5)
    assert is_unknown(logits, calibration).tolist() == [False, True, False]  # 1/3 < 0.5 < 0.73
    assert not is_unknown(logits, Calibration()).any()


def test_fit_calibration_keeps_the_share_of_correct_answers() -> None:
    logits, labels = overconfident_logits()
    for score in SCORES:
        fitted = fit_calibration(logits, labels, keep=0.9, score=score, fitted_on="test")
        calibrated = logits / fitted.temperature
        correct = (calibrated.argmax(dim=1) == labels).numpy()
        kept = ~is_unknown(calibrated, fitted)
        assert kept[correct].mean() == pytest.approx(0.9, abs=0.002)
        assert fitted.val["ece_after"] < fitted.val["ece_before"]
        assert fitted.val[f"threshold_{score}"] == fitted.unknown_threshold
    assert Calibration.from_dict(fitted.to_dict()) == fitted
    assert Calibration.from_dict(None) == Calibration() and Calibration().temperature == 1.0
    with pytest.raises(ValueError):
        Calibration.from_dict({"temperature": -1})


# ---- the calibration travels with the model --------------------------------------------------------------
TEMPERATURE = 2.5


def tiny_test_photos(tiny_run: TinyRun) -> list[str]:
    return sorted(str(p) for p in (tiny_run.data_root / "test").rglob("*.jpg"))


@pytest.fixture
def calibrated_checkpoint(tiny_run: TinyRun, tmp_path: Path) -> Path:
    """A copy of the tiny run's checkpoint with a temperature far from 1 and an unknown threshold halfway
    down its test photos' top probabilities (between two of them: no photo sits on it)."""
    from foodvision.inference.batches import infer_files

    path = tmp_path / "checkpoints" / "calibrated.ckpt"
    path.parent.mkdir(parents=True)
    shutil.copyfile(tiny_run.checkpoint, path)
    save_calibration(path, Calibration(temperature=TEMPERATURE, fitted_on="a test"))
    result = infer_files(Predictor(path, precision="32"), tiny_test_photos(tiny_run), progress=False)
    top = np.unique(result.probabilities.max(dim=1).values.double().numpy())
    middle = len(top) // 2
    threshold = float(top[middle - 1] + top[middle]) / 2
    save_calibration(
        path,
        Calibration(
            temperature=TEMPERATURE,
            unknown_score="probability",  # so that a row's flag can be read off its top probability
            unknown_threshold=threshold,
            keep=0.95,
            fitted_on="a test",
        ),
    )
    return path


def test_old_checkpoints_load_with_temperature_one(tiny_run: TinyRun, tmp_path: Path) -> None:
    old = tmp_path / "old.ckpt"
    checkpoint = read_checkpoint(tiny_run.checkpoint)
    checkpoint[CHECKPOINT_KEY].pop("calibration", None)  # metadata as written before calibration existed
    torch.save(checkpoint, old)
    predictor = Predictor(old, precision="32")
    assert predictor.calibration == Calibration()
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(predictor.logits(images), predictor.network_logits(images))


def test_checkpoint_round_trip_divides_logits(tiny_run: TinyRun, calibrated_checkpoint: Path) -> None:
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    plain = Predictor(tiny_run.checkpoint, precision="32", engine="torch")
    plain.set_calibration(Calibration())
    scaled = Predictor(calibrated_checkpoint, precision="32", engine="torch")
    assert scaled.calibration.temperature == TEMPERATURE and scaled.calibration.unknown_threshold is not None
    assert torch.allclose(scaled.logits(images), plain.logits(images) / TEMPERATURE, atol=1e-6)
    before = read_checkpoint(tiny_run.checkpoint)["state_dict"]
    after = read_checkpoint(calibrated_checkpoint)["state_dict"]
    assert all(torch.equal(before[k], after[k]) for k in before)  # the weights are untouched


def test_exports_carry_the_calibrated_probabilities(calibrated_checkpoint: Path, tmp_path: Path) -> None:
    """Checkpoint, ONNX, TorchScript and the app folder: the same calibrated probabilities (to 1e-4), and
    the graph divides by the temperature (so no runtime divides twice)."""
    pytest.importorskip("onnxruntime")
    from foodvision.app import template as app_template
    from foodvision.cli.export import export

    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    want = Predictor(calibrated_checkpoint, precision="32").logits(images).softmax(dim=1)
    onnx_file, script_file, app = tmp_path / "m.onnx", tmp_path / "m.pt", tmp_path / "app"
    for fmt, output in (("onnx", onnx_file), ("torchscript", script_file), ("app", app)):
        export(
            compose_tool(
                "export",
                f"ckpt_path={calibrated_checkpoint}",
                f"format={fmt}",
                f"output={output}",
                "examples=0",
            )
        )
    for path in (onnx_file, script_file):
        exported = Predictor(path, trust_torchscript=True)
        assert exported.calibration.in_graph and exported.calibration.temperature == TEMPERATURE
        got = exported.logits(images).softmax(dim=1)
        assert (got - want).abs().max() < 1e-4, path
    classifier = app_template.OnnxClassifier(app / "model.onnx")
    got = classifier.probabilities(images.numpy())
    assert np.abs(got - want.numpy()).max() < 1e-4
    meta = json.loads(classifier.session.get_modelmeta().custom_metadata_map["foodvision.json"])
    saved = Predictor(calibrated_checkpoint).calibration
    assert (
        meta["calibration"]["in_graph"]
        and meta["calibration"]["unknown_threshold"] == saved.unknown_threshold
    )


def test_eval_calibrate_fits_on_val_and_saves_it(tiny_run: TinyRun, tmp_path: Path) -> None:
    """`eval.py calibrate=true` on a checkpoint without calibration: fitted on the val split, saved in the
    checkpoint, used for the test metrics; the test metrics get ECE before/after and Brier."""
    from foodvision.evaluation.evaluate import evaluate

    path = tmp_path / "checkpoints" / "model.ckpt"
    path.parent.mkdir(parents=True)
    checkpoint = read_checkpoint(tiny_run.checkpoint)
    checkpoint[CHECKPOINT_KEY].pop("calibration", None)
    torch.save(checkpoint, path)
    shutil.copyfile(tiny_run.run_dir / "config.yaml", tmp_path / "config.yaml")
    metrics = evaluate(
        compose_tool(
            "eval", f"ckpt_path={path}", "calibrate=true", f"output_dir={tmp_path / 'eval'}", "report=false"
        )
    )
    saved = Predictor(path).calibration
    assert saved.fitted_on.startswith("val split of") and saved.val["photos"] == 3 * len(tiny_run.classes)
    assert metrics["test/temperature"] == pytest.approx(saved.temperature)
    assert saved.unknown_threshold is not None and 0 <= metrics["test/unknown_share"] <= 1
    for key in ("test/ece", "test/ece_uncalibrated", "test/brier", "test/brier_uncalibrated"):
        assert 0 <= metrics[key] <= 2, key
    assert (tmp_path / "eval" / "reliability.png").is_file()
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert written["calibration"]["temperature"] == pytest.approx(saved.temperature)


def predicted_with_unknown(checkpoint: Path, photos: list[str], *more: str) -> list[dict]:
    _, rows, _ = predict(
        compose_tool(
            "predict", f"ckpt_path={checkpoint}", f"inputs=[{','.join(photos)}]", "precision=32", *more
        )
    )
    return rows


def test_predict_marks_answers_below_the_threshold(
    calibrated_checkpoint: Path, tiny_run: TinyRun, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """predict.py: "not sure" in the table and an unknown flag in the output files, the top guesses kept."""
    threshold = Predictor(calibrated_checkpoint).calibration.unknown_threshold
    photos = tiny_test_photos(tiny_run)
    output = tmp_path / "predictions.csv"
    rows = predicted_with_unknown(calibrated_checkpoint, photos, f"output={output}")
    flags = [row["unknown"] for row in rows]
    assert flags == [row["predictions"][0]["probability"] < threshold for row in rows]
    assert any(flags) and not all(flags)
    assert all(len(row["predictions"]) == 3 for row in rows)  # the top guesses, unknown or not
    table = capsys.readouterr().out
    assert table.splitlines()[0].split()[:2] == ["file", "answer"]
    assert f"not sure ({sum(flags)} of {len(rows)})" in table
    for row in rows:
        line = next(line for line in table.splitlines() if line.startswith(row["file"]))
        answer = ("not sure" if row["unknown"] else row["predictions"][0]["class"]).split()
        assert line[len(row["file"]) :].split()[: len(answer)] == answer
    with output.open(newline="") as handle:
        saved = list(csv.DictReader(handle))
    assert [r["unknown"] == "true" for r in saved] == flags
    # a model without a threshold: no answer column, no flag
    plain = tmp_path / "plain" / "checkpoints" / "plain.ckpt"
    plain.parent.mkdir(parents=True)
    shutil.copyfile(calibrated_checkpoint, plain)
    save_calibration(plain, Calibration(temperature=TEMPERATURE))
    assert not any("unknown" in row for row in predicted_with_unknown(plain, photos[:3]))


def test_serve_answers_not_sure_through_gradio_client(calibrated_checkpoint: Path, tiny_run: TinyRun) -> None:
    """The demo's API: a photo below the threshold is answered "not sure" with its top guesses; one above
    it with its class."""
    gradio_client = pytest.importorskip("gradio_client")
    from foodvision.app.demo import serve

    from .demo_helpers import free_port

    rows = {r["file"]: r for r in predicted_with_unknown(calibrated_checkpoint, tiny_test_photos(tiny_run))}
    unsure = next(f for f, r in rows.items() if r["unknown"])
    sure = next(f for f, r in rows.items() if not r["unknown"])
    demo = serve(
        compose_tool(
            "serve",
            f"ckpt_path={calibrated_checkpoint}",
            f"port={free_port()}",
            "block=false",
            "precision=32",
            "examples=0",
        )
    )
    try:
        client = gradio_client.Client(demo.local_url, verbose=False)
        for photo in (unsure, sure):
            label, status = client.predict(gradio_client.handle_file(photo), api_name="/classify")
            best = rows[photo]["predictions"][0]
            assert label["label"] == best["class"]  # the top guesses either way
            assert f"({100 * best['probability']:.1f}%)" in status
            if photo == unsure:
                assert status.startswith("**Not sure:** this may be none of the 6 classes; best guess")
            else:
                assert status.startswith(f"**{best['class']}**")
    finally:
        demo.close()


def test_app_marks_unknown_answers(calibrated_checkpoint: Path, tiny_run: TinyRun, tmp_path: Path) -> None:
    """`app.py --predict` (no PyTorch): the same unknown flags as predict.py, and the page's facts say so."""
    pytest.importorskip("onnxruntime")
    from foodvision.cli.export import export

    from .demo_helpers import app_predictions

    app = tmp_path / "app"
    export(
        compose_tool(
            "export", f"ckpt_path={calibrated_checkpoint}", "format=app", f"output={app}", "examples=0"
        )
    )
    photos = tiny_test_photos(tiny_run)
    expected = {r["file"]: r["unknown"] for r in predicted_with_unknown(calibrated_checkpoint, photos)}
    results = app_predictions(app, photos, tmp_path / "blocker")
    assert {r["file"]: r["unknown"] for r in results} == expected
    assert any(expected.values()) and not all(expected.values())


def test_eval_reports_intervals_reliability_and_outside_separation(tiny_run: TinyRun, tmp_path: Path) -> None:
    """eval.py: 95 % intervals (test/acc_ci_low ...), each class's F1 interval, the outside photos' AUROC and
    share rejected in metrics.json; report.html shows them ("87.6 % (85.8-89.4)") and the reliability diagram."""
    import base64

    from foodvision.evaluation.evaluate import evaluate

    from .conftest import make_image

    outside = tmp_path / "outside"
    for i in range(8):  # grey noise: none of the six colour classes
        make_image(outside / f"thing_{i}.png", (128, 128, 128), seed=500 + i)
    out = tmp_path / "eval"
    metrics = evaluate(
        compose_tool("eval", f"ckpt_path={tiny_run.checkpoint}", f"output_dir={out}", f"outside=[{outside}]")
    )
    assert metrics["test/acc_ci_low"] <= metrics["test/acc"] <= metrics["test/acc_ci_high"]
    assert metrics["test/f1_macro_ci_low"] <= metrics["test/f1_macro"] <= metrics["test/f1_macro_ci_high"]
    assert sorted(metrics["test/f1_ci"]) == sorted(tiny_run.classes)
    assert metrics["bootstrap"] == {"resamples": 1000, "level": 0.95, "seed": 0}
    assert metrics["test/outside_photos"] == 8 and 0 <= metrics["test/outside_auroc"] <= 1
    assert 0 <= metrics["test/outside_rejected"] <= 1
    assert all(0 <= metrics[f"test/outside_auroc_{score}"] <= 1 for score in SCORES)

    page = (out / "report.html").read_text(encoding="utf-8")
    low, high = metrics["test/acc_ci_low"], metrics["test/acc_ci_high"]
    interval = f"({100 * low:.1f}-{100 * high:.1f})"
    assert f'data-interval="test/acc" title="95 % bootstrap interval">{interval}</div>' in page
    assert f"Accuracy <b>{100 * metrics['test/acc']:.1f} % {interval}</b>" in page
    assert page.count('data-interval="f1"') == len(tiny_run.classes)
    reliability = base64.b64encode((out / "reliability.png").read_bytes()).decode()
    assert f"data:image/png;base64,{reliability}" in page
    assert '<table id="calibration">' in page and '<table id="outside">' in page
    assert f"AUROC {metrics['test/outside_auroc']:.3f}" in page

"""Bounded inference memory (issue #12): chunked forward passes, memory-chosen batch sizes, streaming eval and
predict. Behaviour only: the same results whatever the batch size, the same files as before; the memory
itself is measured by `make bench` (section memory)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from foodvision.data.cached import CachedInputs
from foodvision.errors import ToolError
from foodvision.evaluation.evaluate import evaluate
from foodvision.evaluation.metrics import classification_metrics, confusion_matrix
from foodvision.inference import engine
from foodvision.inference.batches import infer_files
from foodvision.inference.predict import PredictionWriter, collect_inputs, predict, write_output
from foodvision.inference.predictor import Predictor
from foodvision.training.callbacks.feature_cache import COMPACT_MAPS_DTYPE, extract_features

from .conftest import TinyRun, compose_tool


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 5),
    ).eval()


class TwoOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.rest = small_net()[:3], small_net()[3:]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = self.stem(images)
        return self.rest(maps), maps


# ---- engine ------------------------------------------------------------------------------------------------
def test_onnxruntime_chunks_give_the_outputs_of_one_batch() -> None:
    pytest.importorskip("onnxruntime")
    images = torch.randn(10, 3, 24, 24, generator=torch.Generator().manual_seed(1))
    whole = engine.OnnxRuntimeModule(small_net(), images[:1], max_batch=64)
    chunked = engine.OnnxRuntimeModule(small_net(), images[:1], max_batch=3)
    assert (whole.max_batch, chunked.max_batch) == (64, 3)
    torch.testing.assert_close(chunked(images), whole(images), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(chunked(images), small_net()(images), rtol=1e-4, atol=1e-4)
    pair = engine.OnnxRuntimeModule(TwoOutputs(), images[:1], ["logits", "maps"], max_batch=4)
    logits, maps = pair(images)
    assert logits.shape == (10, 5) and maps.shape == (10, 8, 24, 24)
    with torch.no_grad():
        expected_logits, expected_maps = TwoOutputs()(images)
    torch.testing.assert_close(maps, expected_maps, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4)


def test_chunked_torch_forward_concatenates_tensors_and_tuples() -> None:
    net = small_net()
    images = torch.randn(7, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(engine.ChunkedForward(net, 2)(images), net(images), rtol=1e-5, atol=1e-6)
        pair = engine.ChunkedForward(TwoOutputs(), 3)(images)
        expected = TwoOutputs()(images)
    assert isinstance(pair, tuple) and len(pair) == 2
    for got, want in zip(pair, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_batch_size_follows_the_memory_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    mb = 2**20
    per_image = 8 * mb  # x GRAPH_OVERHEAD (2.5) = 20 MB per image
    assert engine.batch_for_memory(per_image, 200) == 10
    assert engine.batch_for_memory(per_image, 1) == 1  # never 0
    assert engine.batch_for_memory(1, 10_000) == engine.LARGEST_AUTO_BATCH
    assert engine.batch_for_memory(None, 200) == 32  # no estimate: a fixed batch
    monkeypatch.setenv(engine.MAX_MEMORY_ENV, "400")
    assert engine.default_max_memory_mb() == 400
    assert engine.batch_for_memory(per_image) == 20
    monkeypatch.setenv(engine.MAX_MEMORY_ENV, "lots")
    with pytest.raises(ValueError, match=engine.MAX_MEMORY_ENV):
        engine.default_max_memory_mb()
    monkeypatch.delenv(engine.MAX_MEMORY_ENV)
    assert engine.default_max_memory_mb() == engine.DEFAULT_MAX_MEMORY_MB


def test_working_memory_estimates_scale_with_pixels() -> None:
    pytest.importorskip("onnxruntime")
    small = engine.OnnxRuntimeModule(small_net(), torch.zeros(1, 3, 32, 32), max_memory_mb=4)
    large = engine.OnnxRuntimeModule(small_net(), torch.zeros(1, 3, 64, 64), max_memory_mb=4)
    assert small.bytes_per_image and large.bytes_per_image
    # the largest live tensors: 3 + 8 channels at full resolution, float32
    assert small.bytes_per_image >= (3 + 8) * 32 * 32 * 4
    assert 3.5 < large.bytes_per_image / small.bytes_per_image < 4.5
    assert large.max_batch < small.max_batch
    by_hooks = engine.module_bytes_per_image(small_net(), torch.zeros(1, 3, 32, 32))
    assert by_hooks == 2 * 8 * 32 * 32 * 4  # BatchNorm: 8 channels in, 8 out
    net = small_net().train()
    engine.module_bytes_per_image(net, torch.zeros(1, 3, 32, 32))
    assert net.training and net[1].training  # modes restored; no BatchNorm update from the probe


# ---- predictor -----------------------------------------------------------------------------------------------
def test_explicit_batch_size_is_used_as_given(tiny_run: TinyRun) -> None:
    pytest.importorskip("onnxruntime")
    predictor = Predictor(tiny_run.checkpoint, device="cpu", precision="32", engine="onnxruntime")
    chosen = predictor.max_batch
    assert 1 <= chosen <= engine.LARGEST_AUTO_BATCH
    assert predictor.use_batch_size(None) == chosen
    assert predictor.use_batch_size(4096) == 4096  # beyond the budget: what the user asked for
    assert predictor.runner is not None and predictor.runner.max_batch == 4096
    tight = Predictor(tiny_run.checkpoint, device="cpu", precision="32", engine="torch", max_memory_mb=0.05)
    assert tight.max_batch < chosen
    with pytest.raises(ToolError, match="max_memory_mb"):
        Predictor(tiny_run.checkpoint, device="cpu", max_memory_mb=-1)


def test_a_call_with_its_own_batch_size_leaves_the_predictor_memory_bound(tiny_run: TinyRun) -> None:
    """infer_files(batch_size=1) for one photo (bench latency, the demo) must not shrink or grow the
    predictor's forward batch for the calls after it; a large read batch runs in memory-bounded chunks."""
    pytest.importorskip("onnxruntime")
    predictor = Predictor(tiny_run.checkpoint, device="cpu", precision="32", engine="onnxruntime")
    chosen = predictor.max_batch
    files = sorted(str(p) for p in (tiny_run.data_root / "test").rglob("*.jpg"))
    one = infer_files(predictor, files[:1], batch_size=1, progress=False)
    assert predictor.max_batch == chosen and predictor.runner is not None
    assert predictor.runner.max_batch == chosen
    many = infer_files(predictor, files, batch_size=len(files), progress=False)
    assert predictor.max_batch == chosen
    torch.testing.assert_close(many.logits[:1], one.logits, rtol=0, atol=1e-5)
    by_default = infer_files(predictor, files, progress=False)
    torch.testing.assert_close(many.logits, by_default.logits, rtol=0, atol=1e-5)


def test_bad_batch_size_is_a_clear_error(tiny_run: TinyRun, tmp_path: Path) -> None:
    cfg = compose_tool("eval", f"ckpt_path={tiny_run.checkpoint}", f"output_dir={tmp_path}", "batch_size=0")
    with pytest.raises(ToolError, match="batch_size must be a positive integer"):
        evaluate(cfg)


# ---- eval --------------------------------------------------------------------------------------------------
def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def reference_eval(tiny_run: TinyRun) -> tuple[dict[str, float], list[list[str]]]:
    """What eval computed before streaming: all logits of the test split at once (PyTorch, float32, one
    batch), metrics over all of them, predictions.csv rows."""
    predictor = Predictor(tiny_run.checkpoint, device="cpu", precision="32", engine="torch")
    test = sorted((tiny_run.data_root / "test").glob("*/*.jpg"))
    names = predictor.class_names
    files = [str(p) for p in test]
    true = torch.tensor([names.index(p.parent.name) for p in test])
    predictor.use_batch_size(len(files))  # one forward pass over every photo
    result = infer_files(predictor, files, progress=False)
    probabilities = result.logits.softmax(dim=1)
    confidence, predicted = probabilities.max(dim=1)
    scores = classification_metrics(confusion_matrix(true.numpy(), predicted.numpy(), len(names)))
    top5 = result.logits.topk(5, dim=1).indices
    metrics = {
        "test/acc": scores["accuracy"],
        "test/acc_top5": float((top5 == true[:, None]).any(dim=1).float().mean()),
        "test/loss": float(F.cross_entropy(result.logits, true)),
        "test/f1_macro": scores["f1_macro"],
        "test/precision_weighted": scores["precision_weighted"],
    }
    rows = [
        [f, names[t], names[p], f"{c:.6f}"]
        for f, t, p, c in zip(files, true.tolist(), predicted.tolist(), confidence.tolist(), strict=True)
    ]
    return metrics, rows


def assert_same_predictions(rows: list[dict[str, str]], expected: list[list[str]]) -> None:
    assert [(r["file"], r["true"], r["predicted"]) for r in rows] == [tuple(e[:3]) for e in expected]
    for row, want in zip(rows, expected, strict=True):
        assert float(row["confidence"]) == pytest.approx(float(want[3]), abs=1e-4)


@pytest.mark.parametrize("eval_engine", ["torch", "onnxruntime"])
def test_eval_streams_the_metrics_of_all_logits_at_once_whatever_the_batch_size(
    tiny_run: TinyRun, tmp_path: Path, eval_engine: str
) -> None:
    if eval_engine == "onnxruntime":
        pytest.importorskip("onnxruntime")
    expected_metrics, expected_rows = reference_eval(tiny_run)
    outputs = {}
    for batch in ("null", "1", "7", "1000"):
        out = tmp_path / f"eval-{batch}"
        outputs[batch] = evaluate(
            compose_tool(
                "eval",
                f"ckpt_path={tiny_run.checkpoint}",
                f"output_dir={out}",
                f"engine={eval_engine}",
                "precision=32",
                "device=cpu",
                "num_workers=0",
                f"batch_size={batch}",
            )
        )
        metrics = outputs[batch]
        for key, value in expected_metrics.items():
            assert metrics[key] == pytest.approx(value, abs=1e-4), (batch, key)
        assert_same_predictions(read_rows(out / "predictions.csv"), expected_rows)
        assert not list(out.glob("*.partial"))
        wrong = read_rows(out / "most_confident_wrong.csv")
        assert [float(r["confidence"]) for r in wrong] == sorted(
            (float(r["confidence"]) for r in wrong), reverse=True
        )
        assert len(wrong) == sum(1 for r in expected_rows if r[1] != r[2])
    first = outputs["null"]
    for metrics in outputs.values():
        assert metrics["test/acc"] == first["test/acc"] and metrics["num_images"] == first["num_images"]


# ---- predict -----------------------------------------------------------------------------------------------
def old_write_output(path: Path, rows: list[dict], failed: list[tuple[str, str]], model: str) -> None:
    """predict.py's writer before streaming, verbatim."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".json":
        document = {
            "model": model,
            "predictions": list(rows),
            "failed": [{"file": name, "error": reason} for name, reason in failed],
        }
        path.write_text(json.dumps(document, indent=2) + "\n")
        return
    k = len(rows[0]["predictions"]) if rows else 1
    header = ["file"] + [f"{what}_{i + 1}" for i in range(k) for what in ("class", "probability")] + ["error"]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for row in rows:
            cells = [v for p in row["predictions"] for v in (p["class"], f"{p['probability']:.6f}")]
            writer.writerow([row["file"], *cells, ""])
        for name, reason in failed:
            writer.writerow([name, *([""] * 2 * k), reason])


@pytest.mark.parametrize("suffix", [".csv", ".json"])
@pytest.mark.parametrize("count", [0, 1, 5])
def test_streaming_writer_writes_the_file_of_before(tmp_path: Path, suffix: str, count: int) -> None:
    rng = np.random.default_rng(count)
    rows = [
        {
            "file": f'photos/{i:03d}, "odd" name.jpg',
            "predictions": [
                {"class": name, "probability": float(p)}
                for name, p in zip(
                    ("apple_pie", "baklava", "bibimbap"), sorted(rng.random(3), reverse=True), strict=True
                )
            ],
        }
        for i in range(count)
    ]
    failed = [("broken.jpg", "cannot identify image file"), ("missing.jpg", "no such file or folder")]
    for fails in ([], failed):
        expected, streamed, at_once = (tmp_path / f"{name}{suffix}" for name in ("old", "new", "once"))
        streamed.unlink(missing_ok=True)
        old_write_output(expected, rows, fails, "model.ckpt")
        writer = PredictionWriter(streamed, "model.ckpt")
        for start in range(0, count, 2):  # batches of two
            writer.add(rows[start : start + 2])
        assert not streamed.exists()  # written under .partial until complete
        writer.close(fails)
        write_output(at_once, rows, fails, "model.ckpt")
        assert streamed.read_bytes() == expected.read_bytes() == at_once.read_bytes()
        assert not list(tmp_path.glob("*.partial"))


def test_predict_results_do_not_depend_on_the_batch_size(tiny_run: TinyRun, tmp_path: Path) -> None:
    folder = tiny_run.data_root / "test"
    files = collect_inputs([str(folder)]).files
    outputs = {}
    for batch in ("null", "1", "5"):
        output = tmp_path / f"preds-{batch}.csv"
        cfg = compose_tool(
            "predict",
            f"ckpt_path={tiny_run.checkpoint}",
            f"inputs=[{folder}]",
            f"output={output}",
            f"batch_size={batch}",
            "precision=32",
            "device=cpu",
        )
        code, rows, failed = predict(cfg)
        assert code == 0 and not failed and len(rows) == len(files)
        outputs[batch] = read_rows(output)
    first = outputs["null"]
    for rows in outputs.values():
        assert [r["file"] for r in rows] == files
        assert [(r["class_1"], r["class_2"]) for r in rows] == [(r["class_1"], r["class_2"]) for r in first]
        for a, b in zip(rows, first, strict=True):
            assert float(a["probability_1"]) == pytest.approx(float(b["probability_1"]), abs=1e-4)


# ---- feature cache -------------------------------------------------------------------------------------------
def test_feature_extraction_fills_preallocated_rows_and_drops_skipped_ones() -> None:
    images = torch.randn(10, 3, 4, 4)
    labels = torch.arange(10)
    batches = [(images[:4], labels[:4]), None, (images[4:7], labels[4:7])]  # rows 7-9 unreadable (skipped)
    module = SimpleNamespace(net=SimpleNamespace(backbone=nn.Identity()))

    class Loader(list):
        dataset = list(range(10))

    def run(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return batch.mean(dim=(2, 3)), batch * 2

    pooled, got_labels, maps = extract_features(module, Loader(batches), run, "test")
    assert pooled.shape == (7, 3) and maps is not None and maps.shape == (7, 3, 4, 4)
    torch.testing.assert_close(pooled, images[:7].mean(dim=(2, 3)))
    torch.testing.assert_close(maps, images[:7] * 2)
    assert got_labels.tolist() == list(range(7))
    assert maps.untyped_storage().nbytes() == maps.numel() * 4  # trimmed: no unused rows saved


def test_compact_prefix_maps_take_half_the_memory_and_give_the_logits_of_float32_maps() -> None:
    """Train-split prefix maps stored in float16 (COMPACT_MAPS_DTYPE), served as float32 batches: half the
    bytes, and the network's logits on them within float16 rounding of the float32 maps' logits."""
    from torch.utils.data import DataLoader, TensorDataset

    from foodvision.models.classifier import build_classifier, prefix_entry

    torch.manual_seed(0)
    net, _, _ = build_classifier(4, name="mobilenetv2_100", pretrained=False)
    net.eval()
    images = torch.randn(12, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    labels = torch.arange(12) % 4
    module = SimpleNamespace(net=net)

    class Loader(list):
        dataset = list(range(12))

    def run(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        prefix = net.forward_prefix(batch, 5)
        return net.forward_suffix(prefix, 5), prefix

    batches = [(images[:5], labels[:5]), (images[5:], labels[5:])]
    pooled, _, wide = extract_features(module, Loader(batches), run, "float32")
    pooled16, _, compact = extract_features(
        module, Loader(batches), run, "compact", maps_dtype=COMPACT_MAPS_DTYPE
    )
    assert wide is not None and compact is not None
    assert wide.dtype == torch.float32 and compact.dtype == torch.float16
    assert compact.untyped_storage().nbytes() * 2 == wide.untyped_storage().nbytes()
    torch.testing.assert_close(pooled16, pooled, rtol=0, atol=0)  # pooled features stay float32, exact

    cached = CachedInputs(prefix_entry(5), [TensorDataset(compact, labels)])
    batch = next(iter(DataLoader(cached, batch_size=12, collate_fn=cached.collate)))
    assert batch["inputs"].dtype == torch.float32  # what the model gets, whatever the storage
    with torch.inference_mode():
        reference = net.forward_entry(wide, batch["entry"])
        logits = net.forward_entry(batch["inputs"], batch["entry"])
    scale = float(reference.abs().max())
    torch.testing.assert_close(logits, reference, rtol=0, atol=2e-3 * scale)
    assert torch.equal(logits.argmax(1), reference.argmax(1))


def test_maps_beyond_float16_range_stay_float32() -> None:
    images = torch.randn(6, 3, 4, 4)
    images[4, 0, 0, 0] = 1e6  # beyond float16's 65504, in the second batch
    module = SimpleNamespace(net=SimpleNamespace(backbone=nn.Identity()))

    class Loader(list):
        dataset = list(range(6))

    def run(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return batch.mean(dim=(2, 3)), batch

    batches = [(images[:3], torch.arange(3)), (images[3:], torch.arange(3, 6))]
    _, _, maps = extract_features(module, Loader(batches), run, "wide", maps_dtype=COMPACT_MAPS_DTYPE)
    assert maps is not None and maps.dtype == torch.float32
    torch.testing.assert_close(maps[3:], images[3:], rtol=0, atol=0)
    torch.testing.assert_close(maps[:3], images[:3].half().float(), rtol=0, atol=0)

"""Extraction and eval on the batched decode (workers read bytes, the batch is decoded and transformed on
the model's device): the same features, logits and bad-file reports as the PIL path, forced on a CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from foodvision.data.batched import BatchedTransform
from foodvision.data.datamodule import FoodDataModule
from foodvision.data.datasets import EncodedFileDataset
from foodvision.data.images import BadImageError
from foodvision.data.store import open_store
from foodvision.inference.batches import Stream, batched_decode_default, infer_files, stream_files
from foodvision.inference.predictor import Predictor
from foodvision.training.callbacks.feature_cache import DecodedEvalBatches, FeatureCache, batched_extraction
from foodvision.training.callbacks.finetune import TwoStageFinetuning
from foodvision.training.module import LitClassifier

from .test_finetune import fit

MODEL = {
    "kind": "timm",
    "name": "mobilenetv2_100",
    "pretrained": True,
    "head": {"hidden": 16, "dropout": 0.0},
}


def _corrupt(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    return path


def _datamodule(root: Path, out: Path, pipeline: str, **kwargs) -> FoodDataModule:
    dm = FoodDataModule(
        source="imagefolder",
        root=str(root),
        batch_size=8,
        eval_batch_size=16,
        num_workers=0,
        image_size=32,
        pipeline=pipeline,
        cache_dir=str(out / "data-cache"),
        output_dir=str(out),
        group_duplicates=False,
        **kwargs,
    )
    dm.discover()
    return dm


def _module(dm: FoodDataModule) -> LitClassifier:
    torch.manual_seed(0)
    module = LitClassifier(
        dm.num_classes,
        dm.classes,
        model={**MODEL, "image_size": dm.image_size},
        optimizer={"name": "adamw", "lr": 1e-2, "weight_decay": 1e-2, "backbone_lr_factor": 0.1},
        scheduler={"name": "cosine"},
        max_epochs=1,
    )
    dm.preprocessing = module.preprocessing
    return module


def _cache_run(root: Path, out: Path, pipeline: str) -> FeatureCache:
    dm = _datamodule(root, out, pipeline)
    module = _module(dm)
    cache = FeatureCache("auto", str(out / "features"), engine="torch")
    fit(module, dm, out, [TwoStageFinetuning(5, "none"), cache], epochs=1)
    return cache


# ---- feature extraction ------------------------------------------------------------------------------
def test_extraction_decodes_batchwise_on_cuda_and_where_training_takes_the_tensor_path() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert batched_extraction(cuda, "pil") and batched_extraction(cuda, None)
    assert batched_extraction(cpu, "tensor")
    assert not batched_extraction(cpu, "pil") and not batched_extraction(cpu, "decoded")


def test_batched_extraction_builds_the_pil_paths_entries(image_folder: Path, tmp_path: Path, caplog) -> None:
    """data.pipeline=tensor on a CPU: the feature cache's photos are decoded batch-wise, under the same
    entry names (the key does not depend on the path) and with the same features, to resize rounding."""
    pil = _cache_run(image_folder, tmp_path / "pil", "pil")
    with caplog.at_level("INFO", logger="foodvision"):
        tensor = _cache_run(image_folder, tmp_path / "tensor", "tensor")
    assert "decoded in batches on cpu" in caplog.text
    assert len(pil.builds) == 2 and [Path(p).name for p in pil.builds] == [
        Path(p).name for p in tensor.builds
    ]
    for a, b in zip(pil.builds, tensor.builds, strict=True):
        reference, batched = open_store(a), open_store(b)
        assert torch.equal(reference.load("labels"), batched.load("labels"))
        features, other = reference.load("features"), batched.load("features")
        assert (features - other).abs().max() <= 0.05 * features.abs().max()


def _extraction_loaders(dm: FoodDataModule):
    """The val split's eval batches through PIL workers and through the batched decode (on the CPU)."""
    samples = dm.discover().splits["val"]
    pil = dm.loader(dm.image_dataset("val"), shuffle=False, batch_size=16)
    encoded = EncodedFileDataset(
        samples, skip_bad_images=dm.skip_bad_images, bad_images_log=dm.bad_images_log
    )
    batched = DecodedEvalBatches(
        dm.loader(encoded, shuffle=False, batch_size=16),
        BatchedTransform.from_config(dm.preprocessing, None, train=False),
        torch.device("cpu"),
        dm.preprocessing.resize_size,
        dm.skip_bad_images,
        dm.bad_images_log,
    )
    return pil, batched


def test_batched_extraction_batches_equal_the_pil_ones(image_folder: Path, tmp_path: Path) -> None:
    dm = _datamodule(image_folder, tmp_path, "tensor")
    _module(dm)
    dm.setup("fit")
    pil, batched = _extraction_loaders(dm)
    assert len(batched) == len(pil)
    for (a, ta), (b, tb) in zip(pil, batched, strict=True):
        assert torch.equal(ta, tb) and a.shape == b.shape
        assert (a - b).abs().mean() < 0.01  # the same pixels but for a few one grey level apart


def test_a_bad_file_in_extraction_is_named_or_skipped_as_on_the_pil_path(
    image_folder: Path, tmp_path: Path
) -> None:
    logs = {}
    for skip in (False, True):
        for path in ("pil", "batched"):
            out = tmp_path / f"{path}-{skip}"
            dm = _datamodule(image_folder, out, "tensor", skip_bad_images=skip)
            _module(dm)
            dm.setup("fit")
            bad = sorted((image_folder / "validation" / "baklava").iterdir())[1]
            original = bad.read_bytes()
            _corrupt(bad)
            try:
                loader = dict(zip(("pil", "batched"), _extraction_loaders(dm), strict=True))[path]
                if not skip:
                    with pytest.raises(BadImageError, match=bad.name):
                        list(loader)
                    continue
                served = sum(len(batch[1]) for batch in loader if batch is not None)
                assert served == len(dm.discover().splits["val"]) - 1
                assert dm.bad_images() == [str(bad)]
                logs[path] = Path(dm.bad_images_log).read_text()
            finally:
                bad.write_bytes(original)
    assert logs["pil"] == logs["batched"]  # the same file, the same reason


# ---- eval / predict streaming --------------------------------------------------------------------------
def test_batched_decode_is_the_default_only_on_cuda(tiny_run) -> None:
    assert not batched_decode_default(
        Predictor(tiny_run.checkpoint, device="cpu", precision="32", engine="torch")
    )


def test_batched_streaming_gives_the_pil_paths_logits_and_reports(tiny_run, tmp_path: Path) -> None:
    """Forced on a CPU: the same logits (to resize rounding), the same files kept, the same failures
    (a truncated JPEG, a missing file, a text file) in the same order, the same totals."""
    predictor = Predictor(tiny_run.checkpoint, device="cpu", precision="32", engine="torch")
    files = sorted(str(p) for p in (tiny_run.data_root / "test").rglob("*.jpg"))[:10]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(Path(files[3]).read_bytes())
    _corrupt(broken)
    text = tmp_path / "notes.jpg"
    text.write_text("not a photo")
    files = [*files[:2], str(broken), *files[2:6], str(tmp_path / "missing.jpg"), str(text), *files[6:]]
    results, streams, per_batch = {}, {}, {}
    for batched in (False, True):
        results[batched] = infer_files(predictor, files, batch_size=4, progress=False, batched_decode=batched)
        streams[batched] = Stream()
        batches = list(
            stream_files(predictor, files, 4, progress=False, stream=streams[batched], batched_decode=batched)
        )
        per_batch[batched] = [(b.indices, [name for name, _ in b.failed]) for b in batches]
        assert sum(len(b.indices) for b in batches) == streams[batched].predicted
    pil, batched = results[False], results[True]
    assert batched.indices == pil.indices and len(pil.indices) == len(files) - 3
    assert batched.failed == pil.failed and [name for name, _ in pil.failed] == [
        str(broken),
        str(tmp_path / "missing.jpg"),
        str(text),
    ]
    torch.testing.assert_close(batched.logits, pil.logits, rtol=0, atol=0.05 * float(pil.logits.abs().max()))
    assert (
        streams[True].failed == streams[False].failed and streams[True].predicted == streams[False].predicted
    )
    assert per_batch[True] == per_batch[False]  # batch by batch too


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_streaming_decodes_on_the_gpu_and_matches_the_cpu(tiny_run) -> None:
    gpu = Predictor(tiny_run.checkpoint, device="cuda", precision="32", engine="torch")
    cpu = Predictor(tiny_run.checkpoint, device="cpu", precision="32", engine="torch")
    assert batched_decode_default(gpu)
    files = sorted(str(p) for p in (tiny_run.data_root / "test").rglob("*.jpg"))
    on_gpu = infer_files(gpu, files, progress=False)
    on_cpu = infer_files(cpu, files, progress=False)
    assert on_gpu.indices == on_cpu.indices and on_gpu.failed == on_cpu.failed
    torch.testing.assert_close(
        on_gpu.logits, on_cpu.logits, rtol=0, atol=0.05 * float(on_cpu.logits.abs().max())
    )

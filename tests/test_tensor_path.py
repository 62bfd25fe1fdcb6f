"""The tensor data path (data.pipeline): loaders that only read bytes or decoded-cache rows, the decode and
transform batched on the training device, the decoded-photo cache, bad files, and resume."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from PIL import Image

from foodvision.config.check import ConfigError
from foodvision.data import decoded as decoded_module
from foodvision.data.datamodule import FoodDataModule
from foodvision.data.datasets import ImageListDataset
from foodvision.data.images import BadImageError
from foodvision.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from foodvision.training.fit import train

from .conftest import ROOT, SHARED_MINI, make_class_tree
from .test_faults import QUIET, run_cli

CLASSES = ["apple_pie", "baklava", "bibimbap"]
QUICK_ROOT = SHARED_MINI
AUGMENTED = [
    "experiment=scratch_baseline",
    "augment=seed",
    "model.scratch.widths=[8,16]",
    "trainer.precision=32-true",
    "test=false",
]
PRE = Preprocessing(
    image_size=32, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bilinear", crop_pct=0.875
)


class TargetShapes(Callback):
    """Test-only: the shape and dtype of each training batch's images and targets, as the module gets
    them, written as JSON to ``out`` at the end of the fit."""

    def __init__(self, out: str):
        self.out = Path(out)
        self.seen: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        images, targets = batch
        self.seen.append(
            {"images": list(images.shape), "dtype": str(images.dtype), "targets": list(targets.shape)}
        )

    def on_fit_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        self.out.write_text(json.dumps(self.seen))


def datamodule(root: Path, cache: Path, pipeline: str, **kwargs) -> FoodDataModule:
    """A set-up datamodule over an image-folder tree, preprocessing as a 32 px pretrained model's."""
    options = {
        "source": "imagefolder",
        "root": str(root),
        "batch_size": 8,
        "eval_batch_size": 16,
        "num_workers": 0,
        "cache_dir": str(cache),
        "pipeline": pipeline,
        "group_duplicates": False,
        **kwargs,
    }
    dm = FoodDataModule(**options)
    dm.discover(save_splits=False)
    dm.preprocessing = PRE
    dm.setup("fit")
    return dm


def batches(dm: FoodDataModule, split: str) -> list:
    loader = dm.train_dataloader() if split == "train" else dm.val_dataloader()
    return [dm.prepare_batch(batch) for batch in loader]


# ---- the config key ------------------------------------------------------------------------------------
@pytest.mark.parametrize("pipeline", ["pil", "tensor", "decoded"])
def test_each_pipeline_trains_an_augmented_recipe(
    compose_train, image_folder, tmp_path, caplog, pipeline
) -> None:
    """data.pipeline composes and a 1-epoch augmented fit runs on each path, with MixUp on top (the
    module's batch mixing still sees every batch: soft targets), logging the path it took."""
    out = tmp_path / "shapes.json"
    cfg = compose_train(
        *AUGMENTED,
        f"data.pipeline={pipeline}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        "augment.mixup=0.4",
        "+callbacks.shapes._target_=tests.test_tensor_path.TargetShapes",
        f"+callbacks.shapes.out={out}",
        root=image_folder,
    )
    with caplog.at_level(logging.INFO, logger="foodvision"):
        _, metrics = train(cfg)
    assert 0.0 <= metrics["val/acc"] <= 1.0
    assert f"data.pipeline={pipeline}: {pipeline} data path" in caplog.text
    seen = json.loads(out.read_text())
    assert seen and all(s["images"][1:] == [3, 32, 32] and s["dtype"] == "torch.float32" for s in seen)
    assert all(len(s["targets"]) == 2 for s in seen)  # mixed: [B, classes] soft targets


def test_an_unknown_pipeline_is_refused_naming_the_key(compose_train, image_folder) -> None:
    cfg = compose_train(*AUGMENTED, "data.pipeline=fast", root=image_folder)
    with pytest.raises(ConfigError, match=r"data\.pipeline='fast'"):
        train(cfg)


def test_a_preset_without_a_batched_version_keeps_the_pil_path(image_folder, tmp_path, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="foodvision"):
        dm = datamodule(image_folder, tmp_path, "tensor", augment={"name": "randaugment"})
    assert dm.resolved_pipeline == "pil"
    assert "augment=randaugment has no batched tensor version" in caplog.text
    assert isinstance(dm.train_dataloader().dataset, ImageListDataset)


def test_auto_is_the_decoded_path_on_a_cpu(image_folder, tmp_path) -> None:
    assert datamodule(image_folder, tmp_path, "auto", augment={"name": "seed"}).resolved_pipeline == "decoded"


# ---- the decoded-photo cache -------------------------------------------------------------------------------
def test_the_decoded_cache_is_built_once_and_reused(image_folder, tmp_path, caplog) -> None:
    """The first datamodule decodes each split's photos once into the cache; a second one (a later run)
    finds them and decodes nothing; a changed photo makes its split decoded again."""
    first = datamodule(image_folder, tmp_path / "cache", "decoded", augment={"name": "seed"})
    first_train = batches(first, "train")
    batches(first, "val")
    assert len(first.decoded_builds) == 2 and first.decoded_hits == []
    assert all(Path(entry).is_relative_to(tmp_path / "cache" / "decoded") for entry in first.decoded_builds)

    with caplog.at_level(logging.INFO, logger="foodvision"):
        second = datamodule(image_folder, tmp_path / "cache", "decoded", augment={"name": "seed"})
        second_train = batches(second, "train")
        batches(second, "val")
    assert second.decoded_builds == [] and sorted(second.decoded_hits) == sorted(first.decoded_builds)
    assert "decoded-photo cache hit" in caplog.text and "decoded 36" not in caplog.text
    for (a, ta), (b, tb) in zip(first_train, second_train, strict=True):  # same epoch, same seed: same views
        assert torch.equal(a, b) and torch.equal(ta, tb)

    changed = sorted((image_folder / "train" / "baklava").iterdir())[0]
    Image.new("RGB", (50, 40), (1, 2, 3)).save(changed)
    third = datamodule(image_folder, tmp_path / "cache", "decoded", augment={"name": "seed"})
    batches(third, "train")
    assert len(third.decoded_builds) == 1


def test_a_decoded_cache_too_large_for_the_disk_decodes_every_epoch_instead(
    image_folder, tmp_path, caplog, monkeypatch
) -> None:
    """A cache that would take more than its share of the free disk is not written: the split is decoded
    every epoch (the tensor path), with a warning naming the size; the batches are still served."""
    monkeypatch.setattr(decoded_module, "MAX_SHARE_OF_FREE_DISK", 0.0)
    with caplog.at_level(logging.WARNING, logger="foodvision"):
        dm = datamodule(image_folder, tmp_path / "cache", "decoded", augment={"name": "seed"})
        served = batches(dm, "train")
    assert dm.decoded_builds == [] and not (tmp_path / "cache" / "decoded").exists()
    assert "decoding every epoch instead" in caplog.text and served and served[0][0].ndim == 4


def test_validation_on_the_decoded_cache_is_the_pil_eval_transform(image_folder, tmp_path) -> None:
    """The cache stores the PIL path's resized photo (decode, shorter side to the eval resize, centre
    square), so validation batches are the PIL eval transform's tensors (to float rounding)."""
    dm = datamodule(image_folder, tmp_path, "decoded", augment={"name": "seed"})
    pil = ImageListDataset(dm.discover().splits["val"], PRE.eval_transform(), draft_size=PRE.resize_size)
    reference = torch.stack([pil[i][0] for i in range(len(pil))])
    served = torch.cat([images for images, _ in batches(dm, "val")])
    torch.testing.assert_close(served, reference, rtol=0, atol=1e-6)  # the same pixels; float rounding


def test_tensor_path_batches_match_the_pil_path_in_distribution(image_folder, tmp_path) -> None:
    """tensor (decode every epoch) and decoded (the cache) serve the same shapes and range, and their
    eval batches differ from the PIL path's only by JPEG decoder rounding."""
    tensor = datamodule(image_folder, tmp_path, "tensor", augment={"name": "seed"})
    pil = ImageListDataset(tensor.discover().splits["val"], PRE.eval_transform(), draft_size=PRE.resize_size)
    reference = torch.stack([pil[i][0] for i in range(len(pil))])
    served = torch.cat([images for images, _ in batches(tensor, "val")])
    assert served.shape == reference.shape
    assert (served - reference).abs().mean() < 0.05  # a few grey levels (of 255, normalised) on average
    for images, targets in batches(tensor, "train"):
        assert images.dtype == torch.float32 and images.shape[1:] == (3, 32, 32)
        assert targets.dtype == torch.long and len(targets) == len(images)


@pytest.mark.parametrize("pipeline", ["tensor", "decoded"])
def test_loader_workers_hand_over_whole_raw_batches(image_folder, tmp_path, pipeline) -> None:
    """With a loader worker (a process), every photo of the split arrives, once."""
    dm = datamodule(image_folder, tmp_path, pipeline, augment={"name": "seed"}, num_workers=1)
    served = batches(dm, "train")
    assert sum(len(targets) for _, targets in served) == len(dm.discover().splits["train"])


# ---- bad files -----------------------------------------------------------------------------------------------
def _corrupt(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    return path


@pytest.mark.parametrize("pipeline", ["tensor", "decoded"])
def test_a_file_that_goes_bad_after_the_check_is_named(image_folder, tmp_path, pipeline) -> None:
    """A photo corrupted after the up-front image check: without data.skip_bad_images the error names it."""
    dm = datamodule(image_folder, tmp_path / "cache", pipeline, augment={"name": "seed"})
    bad = _corrupt(sorted((image_folder / "train" / "apple_pie").iterdir())[2])
    with pytest.raises(BadImageError, match=bad.name):
        batches(dm, "train")


@pytest.mark.parametrize("pipeline", ["tensor", "decoded"])
def test_skip_bad_images_skips_a_file_that_goes_bad_and_lists_it(image_folder, tmp_path, pipeline) -> None:
    dm = datamodule(
        image_folder,
        tmp_path / "cache",
        pipeline,
        augment={"name": "seed"},
        skip_bad_images=True,
        output_dir=str(tmp_path / "run"),
    )
    bad = _corrupt(sorted((image_folder / "train" / "apple_pie").iterdir())[2])
    served = batches(dm, "train")
    assert sum(len(targets) for _, targets in served) == len(dm.discover().splits["train"]) - 1
    assert dm.bad_images() == [str(bad)]


def test_skip_bad_images_leaves_out_bad_files_on_the_tensor_path(
    compose_train, image_folder, tmp_path
) -> None:
    """Bad files found by the image check: named, and with data.skip_bad_images=true left out of the fit."""
    bad = _corrupt(sorted((image_folder / "train" / "baklava").iterdir())[0])
    cfg = compose_train(*AUGMENTED, "data.pipeline=tensor", "data.skip_bad_images=true", root=image_folder)
    _, metrics = train(cfg)
    assert metrics["bad_images"] == [str(bad)]


# ---- resume ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pipeline", ["tensor", pytest.param("decoded", marks=pytest.mark.slow)])
def test_sigkill_resume_of_an_augmented_run_on_the_tensor_path_is_bit_exact(
    tmp_path: Path, pipeline: str
) -> None:
    """augment=seed on the tensor path (with a loader worker), SIGKILLed in epoch 2 and resumed from
    last.ckpt: the augmentation draws are a function of (seed, epoch, photo), so it ends with the
    uninterrupted run's weights, bit for bit (the PIL path's draws depend on its workers' seeds: a
    documented exception there)."""
    data = tmp_path / "food3"
    for split, count, seed in (("train", 12, 0), ("validation", 4, 100), ("test", 4, 200)):
        make_class_tree(data / split, CLASSES, count, start_seed=seed)
    common = [
        *AUGMENTED,
        "data=imagefolder",
        f"data.root={data}",
        "data.image_size=32",
        "data.batch_size=8",
        "data.num_workers=1",
        f"data.pipeline={pipeline}",
        "trainer.max_epochs=3",
        *QUIET,
    ]
    straight = run_cli("train.py", *common, f"paths.root_dir={tmp_path / 'straight'}", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-2000:]
    root = tmp_path / "killed"
    kill = ["+callbacks.killer._target_=tests.killer.KillAt", "+callbacks.killer.epoch=2"]
    killed = run_cli("train.py", *common, f"paths.root_dir={root}", *kill, cwd=ROOT)
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = run_cli("train.py", *common, f"paths.root_dir={root}", "ckpt_path=last", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    def last(base: Path) -> dict:
        (run_dir,) = (base / "lightning_logs" / "runs").iterdir()
        return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)

    expected, final = last(tmp_path / "straight"), last(root)
    assert final["epoch"] == expected["epoch"] == 2 and final["global_step"] == expected["global_step"]
    differing = [k for k, v in expected["state_dict"].items() if not torch.equal(final["state_dict"][k], v)]
    assert differing == []


# ---- CUDA --------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_match_the_cpu_ones(image_folder, tmp_path) -> None:
    """The same raw batches prepared on the GPU (nvJPEG decode, CUDA transform) and on the CPU."""
    dm = datamodule(image_folder, tmp_path, "tensor", augment={"name": "seed"})
    for batch in dm.train_dataloader():
        cpu_images, cpu_targets = dm.prepare_batch(batch, "cpu")
        gpu_images, gpu_targets = dm.prepare_batch(batch, "cuda")
        assert gpu_images.is_cuda and torch.equal(gpu_targets.cpu(), cpu_targets)
        assert (gpu_images.cpu() - cpu_images).abs().mean() < 0.05


# ---- the benches' smoke tests ------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(not (QUICK_ROOT / "meta").is_dir(), reason="needs food101-mini (../shared/data)")
def test_the_tensor_path_bench_runs_at_toy_sizes(tmp_path: Path) -> None:
    """bench/tensor_path.py --quick: every recipe on every pipeline, one row per recipe."""
    out = tmp_path / "tensor_path.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "tensor_path.py"), "--quick", "--out", str(out), f"--data-root={QUICK_ROOT}"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [row["section"] for row in rows] == [
        "tensor_path: mnv2_2b_augment",
        "tensor_path: scratch_baseline augment=seed",
    ]


@pytest.mark.slow
def test_the_cuda_bench_runs_on_a_cpu_at_toy_sizes(tmp_path: Path) -> None:
    """bench/cuda_bench.sh --tiny --device cpu: every step but the CUDA calls (bound, tree, stage-2 runs,
    extraction, recipe), results.json and results.md written."""
    out = tmp_path / "cuda"
    done = subprocess.run(
        [str(ROOT / "bench" / "cuda_bench.sh"), "--tiny", "--device", "cpu", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHON": sys.executable},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    document = json.loads((out / "results.json").read_text())
    assert document["bound"]["train_images_per_s"] > 0 and document["errors"] == []
    assert [run["name"] for run in document["stage2"]] == ["stage2-tensor-1w", "stage2-decoded-0w"]
    assert document["extraction"]["images_per_s"] > 0 and document["recipe"]["wall_seconds"] > 0
    assert "model-only bound" in (out / "results.md").read_text()

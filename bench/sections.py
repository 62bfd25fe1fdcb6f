"""The measured work of each benchmark section, run inside the section's own spawned processes.

Each section is a class built in a fresh process for one *side* (``baseline``, ``ours`` or ``main``):
``__init__`` prepares (data, model, warm-up; not timed unless said), ``run()`` does one timed repeat and
returns plain numbers, ``finish()`` returns what is measured once (accuracy, ...). ``bench/run.py``
interleaves the repeats of the two sides and keeps every raw number.

Baseline = what a plain PyTorch script does: ``Image.open().convert('RGB')`` + torchvision
``Resize/CenterCrop/ToTensor/Normalize``, float32, NCHW, ``torch.no_grad``, a ``DataLoader``. Ours =
foodvision's own classes and functions (:data:`FOODVISION`), channels_last, precision=auto (bf16 only where
the hardware has it), ``torch.inference_mode``.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import math
import multiprocessing
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchvision import transforms as T

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = Path(__file__).resolve().parent
MODEL_NAME = "mobilenetv2_100"
HEAD = {"hidden": 128, "dropout": 0.3}
STAGE2_UNFREEZE = "blocks.5"  # timm mobilenetv2: blocks.5, blocks.6 (+ conv_head/bn2): the default recipe
STAGE2_TRAINABLE = ("blocks.5.", "blocks.6.", "conv_head.")  # BatchNorm stays frozen, as in the recipe
# Every foodvision name the bench uses, with its module: the one place a refactor of foodvision touches.
# Imported when a side first needs it, so a baseline's RSS holds only what a plain script imports.
FOODVISION = {
    **dict.fromkeys(("inference_precision", "trainer_precision", "autocast"), "foodvision.hardware"),
    **dict.fromkeys(("discover_food101", "discover_image_folder"), "foodvision.data.sources"),
    **dict.fromkeys(("Preprocessing",), "foodvision.data.transforms"),
    **dict.fromkeys(("FoodDataModule",), "foodvision.data.datamodule"),
    **dict.fromkeys(("ImageListDataset",), "foodvision.data.datasets"),
    **dict.fromkeys(("CachedInputs",), "foodvision.data.cached"),
    **dict.fromkeys(("build_classifier", "POOLED", "prefix_entry"), "foodvision.models.classifier"),
    **dict.fromkeys(("LitClassifier",), "foodvision.training.module"),
    **dict.fromkeys(("TwoStageFinetuning",), "foodvision.training.callbacks.finetune"),
    **dict.fromkeys(("extract_features", "frozen_forward"), "foodvision.training.callbacks.feature_cache"),
    **dict.fromkeys(("load_checkpoint_model",), "foodvision.inference.checkpoints"),
    **dict.fromkeys(
        ("OnnxRuntimeModule", "resolve_engine", "session_options"), "foodvision.inference.engine"
    ),
    **dict.fromkeys(("Predictor",), "foodvision.inference.predictor"),
    **dict.fromkeys(("infer_files",), "foodvision.inference.batches"),
    **dict.fromkeys(("collect_inputs", "top_k_rows"), "foodvision.inference.predict"),
    **dict.fromkeys(("export_onnx",), "foodvision.inference.export"),
    **dict.fromkeys(("calibration_reader", "quantize_onnx"), "foodvision.inference.quantize"),
    **dict.fromkeys(
        ("run_row", "read_config", "read_overrides", "hydra_value", "METRICS"), "foodvision.runs.layout"
    ),
}
# foodvision's precision in the sections: ``auto`` (what the tools choose here) or ``32`` (``--precision``).
PRECISION = "auto"

for _pattern in (
    r".*does not have many workers.*",
    r".*module\(s\) in eval mode.*",
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
    r".*validation_step.*",
    r".*val_dataloader.*",
    r".*GPU available but not used.*",
):
    warnings.filterwarnings("ignore", message=_pattern)


def fv(name: str) -> Any:
    """The foodvision name ``name`` (:data:`FOODVISION`), imported now."""
    return getattr(importlib.import_module(FOODVISION[name]), name)


# ---- shared helpers ------------------------------------------------------------------------------------
def setup_process(cfg: dict[str, Any]) -> None:
    """Threads, quiet libraries, precision: called first in every section process."""
    global PRECISION
    PRECISION = str(cfg.get("precision", "auto"))
    # A spawned process inherits "spawn" as its start method; DataLoader workers should start the way they do
    # in a plain script (the platform default, fork on Linux), or each worker would re-import torch.
    multiprocessing.set_start_method(None, force=True)
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(int(cfg["threads"]))
    quiet("foodvision", "timm")


def quiet(*extra: str) -> None:
    """Lightning sets its loggers to INFO when imported: silence them (again) after that."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", *extra):
        logging.getLogger(name).setLevel(logging.ERROR)


def say(cfg: dict[str, Any], message: str) -> None:
    print(f"    [{cfg['label']}] {message}", flush=True)


def device_of(cfg: dict[str, Any]) -> torch.device:
    return torch.device(cfg.get("device", "cpu"))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def precision_for(device: torch.device) -> str:
    """foodvision's inference precision here: ``bf16`` where the hardware runs it natively, else ``32``."""
    return fv("inference_precision")(PRECISION, device)


def trainer_precision(device: torch.device) -> str:
    if PRECISION == "32":
        return "32-true"
    return str(fv("trainer_precision")("auto", "gpu" if device.type == "cuda" else "cpu"))


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def side_info(cfg: dict[str, Any]) -> dict[str, Any]:
    return {"threads": torch.get_num_threads(), "device": cfg.get("device", "cpu")}


def load_splits(root: str | Path) -> Any:
    """Food-101 layout via ``discover_food101(root, 0.1, 42)``; any class-per-folder tree otherwise."""
    root = Path(root)
    if (root / "meta" / "classes.txt").is_file():
        return fv("discover_food101")(root, 0.1, 42)
    return fv("discover_image_folder")(root, (0.7, 0.15, 0.15), 42)


def pick(samples: list[tuple[str, int]], count: int, seed: int = 0) -> list[tuple[str, int]]:
    """``count`` samples in a seeded random order (repeating the list when it is shorter)."""
    if not samples:
        raise ValueError("no samples to benchmark on")
    order = list(samples)
    random.Random(seed).shuffle(order)
    chosen = order[:count]
    while len(chosen) < count:
        chosen += order[: count - len(chosen)]
    return chosen


def warm_page_cache(paths: list[str]) -> None:
    """Read every file once so neither side pays the first disk read."""
    for path in paths:
        with open(path, "rb") as handle:
            while handle.read(1 << 20):
                pass


def build_model(num_classes: int, image_size: int) -> tuple[nn.Module, Any, str]:
    """MobileNetV2 with the reference head, offline ImageNet weights (random ones, noted, if absent)."""
    kwargs = {"kind": "timm", "name": MODEL_NAME, "head": HEAD, "image_size": image_size}
    try:
        return fv("build_classifier")(num_classes, pretrained=True, **kwargs)
    except RuntimeError as error:  # PretrainedWeightsError: speed does not depend on the weights
        model, pre, _ = fv("build_classifier")(num_classes, pretrained=False, **kwargs)
        return model, pre, f"random init (no offline weights: {str(error).splitlines()[0][:120]})"


def preprocessing_for(image_size: int) -> Any:
    """What ``build_classifier`` gives the model (timm's pretrained config), without building a model."""
    import timm

    return fv("Preprocessing").from_timm(timm.models.get_pretrained_cfg(MODEL_NAME).to_dict(), image_size)


def lit_module(num_classes: int, classes: list[str], image_size: int) -> Any:
    model = {"kind": "timm", "name": MODEL_NAME, "pretrained": True, "head": HEAD, "image_size": image_size}
    try:
        return fv("LitClassifier")(num_classes, classes, model=model, channels_last=True)
    except RuntimeError:
        return fv("LitClassifier")(
            num_classes, classes, model={**model, "pretrained": False}, channels_last=True
        )


def plain_transform(pre: Any) -> T.Compose:
    """The classic torchvision eval transform a plain script writes."""
    return T.Compose([T.Resize(pre.resize_size), T.CenterCrop(pre.image_size), T.ToTensor(),
                      T.Normalize(list(pre.mean), list(pre.std))])  # fmt: skip


def load_plain(ckpt: str, device: Any = "cpu") -> tuple[nn.Module, T.Compose]:
    """A plain script's model load: ``torch.load`` + build + ``load_state_dict``, and its transform."""
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    meta = checkpoint["foodvision"]
    model, _, _ = fv("build_classifier")(len(meta["class_names"]), **{**meta["model"], "pretrained": False})
    model.load_state_dict({k[4:]: v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")})
    return model.eval().to(device), plain_transform(fv("Preprocessing").from_dict(meta["preprocessing"]))


class PlainImages(Dataset):
    """The baseline dataset: ``Image.open().convert('RGB')`` and the plain transform."""

    def __init__(self, samples: list[tuple[str, int]], transform: T.Compose):
        self.samples, self.transform = list(samples), transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return self.transform(Image.open(path).convert("RGB")), label


def plain_loader(
    samples: list[tuple[str, int]], pre: Any, batch: int, workers: int, shuffle: bool = False
) -> DataLoader:
    return DataLoader(
        PlainImages(samples, plain_transform(pre)), batch_size=batch, shuffle=shuffle, num_workers=workers
    )


def plain_train_steps(
    model: nn.Module, optimizer: Any, loader: DataLoader, device: Any, limit: int | None
) -> int:
    """The baseline's training loop: plain forward, cross-entropy, backward, step. Returns images seen."""
    count = 0
    for step, (images, labels) in enumerate(loader):
        if limit is not None and step >= limit:
            break
        images, labels = images.to(device), labels.to(device)
        loss = nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        count += len(labels)
    sync(device)
    return count


def ours_loader(cfg: dict[str, Any], dataset: Any, batch: int, shuffle: bool = False) -> DataLoader:
    """``FoodDataModule.loader``: the loaders foodvision trains and extracts with (new workers every repeat)."""
    datamodule = fv("FoodDataModule")(
        root=str(cfg["data_root"]), batch_size=batch, eval_batch_size=batch, num_workers=int(cfg["workers"]),
        persistent_workers=False, seed=0,
    )  # fmt: skip
    return datamodule.loader(dataset, shuffle=shuffle, batch_size=batch)


def ours_images(cfg: dict[str, Any], samples: list[tuple[str, int]], pre: Any, batch: int) -> DataLoader:
    dataset = fv("ImageListDataset")(samples, pre.eval_transform(), draft_size=pre.resize_size)
    return ours_loader(cfg, dataset, batch)


def load_all(loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    batches = [b for b in loader if b is not None]
    return torch.cat([b[0] for b in batches]), torch.cat([torch.as_tensor(b[1]) for b in batches])


def tile(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """``rows`` rows made by repeating ``tensor`` (compute on cached tensors does not depend on values)."""
    reps = math.ceil(rows / len(tensor))
    return tensor.repeat(reps, *([1] * (tensor.dim() - 1)))[:rows].contiguous()


def fit_one_epoch(module: Any, loader: DataLoader, finetune: Any, device: torch.device) -> dict[str, float]:
    """One training epoch of foodvision's LitClassifier in a Lightning Trainer, as ``train.py`` runs it; the
    epoch's own seconds (first to last batch) and the whole fit's."""
    import lightning as L

    class EpochTimer(L.Callback):
        seconds: list[float] = []

        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            sync(device)
            self.started = time.perf_counter()

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            sync(device)
            self.seconds = [*self.seconds, time.perf_counter() - self.started]

    quiet()
    timer = EpochTimer()
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, max_epochs=1,
        precision=trainer_precision(device), callbacks=[finetune, timer], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
    )  # fmt: skip
    started = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    return {"epoch_seconds": timer.seconds[-1], "fit_seconds": time.perf_counter() - started}


def timed(function: Any, *args: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - started


def rate(images: int, seconds: float, prefix: str = "") -> dict[str, Any]:
    return {f"{prefix}images": images, f"{prefix}seconds": seconds, f"{prefix}images_per_s": images / seconds}


# ---- matmul_peak ---------------------------------------------------------------------------------------
class MatmulPeak:
    """GFLOP/s of ``torch.mm`` n x n in float32 and bfloat16: the physical limit the models are compared to."""

    def __init__(self, side: str, cfg: dict[str, Any]):
        self.device, self.n = device_of(cfg), int(cfg["matmul_size"])
        generator = torch.Generator().manual_seed(0)
        self.inputs, self.iterations = {}, {}
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            a, b = (torch.randn(self.n, self.n, generator=generator).to(self.device, dtype) for _ in range(2))
            self.inputs[name] = (a, b)
            self.mm(a, b, 1)  # warm-up
            once = max(self.mm(a, b, 1), 1e-6)
            self.iterations[name] = max(1, min(200, math.ceil(float(cfg["matmul_seconds"]) / once)))
        say(cfg, f"{self.n}x{self.n}, iterations per repeat {self.iterations}")

    def mm(self, a: torch.Tensor, b: torch.Tensor, iterations: int) -> float:
        sync(self.device)
        started = time.perf_counter()
        for _ in range(iterations):
            torch.mm(a, b)
        sync(self.device)
        return time.perf_counter() - started

    def run(self) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for name, (a, b) in self.inputs.items():
            seconds = self.mm(a, b, self.iterations[name])
            result[f"{name}_gflops"] = 2.0 * self.n**3 * self.iterations[name] / seconds / 1e9
            result[f"{name}_seconds"] = seconds
        return result

    def finish(self) -> dict[str, Any]:
        return {"size": self.n, "iterations": self.iterations}


# ---- data_loading --------------------------------------------------------------------------------------
class DataLoading:
    """JPEG on disk -> normalised float batch, through a DataLoader with the same workers and batch size."""

    def __init__(self, side: str, cfg: dict[str, Any]):
        self.cfg, self.side = cfg, side
        self.samples = pick(load_splits(cfg["data_root"]).splits["train"], int(cfg["load_images"]))
        self.pre = preprocessing_for(int(cfg["image_size"]))  # no model: RSS is the loading's own
        warm_page_cache([p for p, _ in self.samples])
        self.batch = int(cfg["load_batch"])
        self.loader()  # imports (lightning, for FoodDataModule) happen here, not in the first timed repeat

    def loader(self) -> DataLoader:
        if self.side == "baseline":
            return plain_loader(self.samples, self.pre, self.batch, int(self.cfg["workers"]))
        return ours_images(self.cfg, self.samples, self.pre, self.batch)

    def run(self) -> dict[str, Any]:
        loader, count, shape = self.loader(), 0, None
        started = time.perf_counter()
        for batch in loader:  # worker start-up included (the same for both)
            count += len(batch[1])
            shape = list(batch[0].shape)
        return {**rate(count, time.perf_counter() - started), "batch_shape": shape}

    def finish(self) -> dict[str, Any]:
        what = (
            f"PIL full decode + torchvision Resize({self.pre.resize_size}, bilinear)"
            if self.side == "baseline"
            else f"ImageListDataset draft decode + v2 Resize({self.pre.resize_size}, {self.pre.interpolation})"
        )
        return {"pipeline": what, "batch": self.batch, "workers": int(self.cfg["workers"])}


# ---- inference -----------------------------------------------------------------------------------------
class Inference:
    """Model forward on preloaded batches; FLOPs per image; test accuracy of a checkpoint per path."""

    def __init__(self, side: str, cfg: dict[str, Any]):
        self.cfg, self.side, self.device = cfg, side, device_of(cfg)
        self.data = load_splits(cfg["data_root"])
        model, self.pre, self.weights = build_model(len(self.data.classes), int(cfg["image_size"]))
        samples = pick(self.data.splits["test"], int(cfg["infer_images"]))
        self.engine, self.flops_per_image = "torch", None
        if side == "baseline":
            images, _ = load_all(plain_loader(samples, self.pre, 64, int(cfg["workers"])))
            self.batch, self.precision = int(cfg["baseline_batch"]), "32"
            self.model, self.images = model.eval().to(self.device), images.to(self.device)
            from torch.utils.flop_counter import FlopCounterMode

            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                self.model(self.images[:1])
            self.flops_per_image = int(counter.get_total_flops())
        else:
            images, _ = load_all(ours_images(cfg, samples, self.pre, 64))
            self.batch, self.precision = int(cfg["ours_batch"]), precision_for(self.device)
            self.model = model.eval().to(self.device, memory_format=torch.channels_last)
            self.images = images.to(self.device).contiguous(memory_format=torch.channels_last)
            self.engine = fv("resolve_engine")("auto", self.device, self.precision)
            if self.engine == "onnxruntime":
                self.runner = fv("OnnxRuntimeModule")(self.model, self.images[:1])
        self.batches = list(self.images.split(self.batch))
        self.forward(self.batches[:1] + self.batches[-1:])  # warm-up: oneDNN primitives of both batch shapes
        if self.alternative():
            self.forward(self.batches[:1] + self.batches[-1:], *self.alternative())
        say(cfg, f"{side}: {len(self.images)} preloaded images, batch {self.batch}, precision {self.precision}, "
            f"engine {self.engine}")  # fmt: skip

    def alternative(self) -> tuple[str, str] | None:
        """foodvision's path without its fastest part, measured in the same process: eager PyTorch
        (channels_last) float32 where ONNX Runtime or bf16 autocast runs."""
        faster = self.engine == "onnxruntime" or self.precision != "32"
        return ("32", "torch") if self.side == "ours" and faster else None

    def forward(
        self, batches: list[torch.Tensor], precision: str | None = None, engine: str | None = None
    ) -> None:
        if self.side == "ours" and (engine or self.engine) == "onnxruntime":
            for batch in batches:
                self.runner(batch)
            return
        with contextlib.ExitStack() as stack:
            if self.side == "baseline":
                stack.enter_context(torch.no_grad())
            else:
                stack.enter_context(torch.inference_mode())
                stack.enter_context(fv("autocast")(self.device, precision or self.precision))
            for batch in batches:
                self.model(batch)
        sync(self.device)

    def run(self) -> dict[str, Any]:
        count = len(self.images)
        result = rate(count, timed(self.forward, self.batches)[1])
        if self.alternative():
            result.update(rate(count, timed(self.forward, self.batches, *self.alternative())[1], "alt_"))
            del result["alt_images"]
        return result

    def finish(self) -> dict[str, Any]:
        result: dict[str, Any] = {
            "batch": self.batch,
            "precision": self.precision,
            "channels_last": self.side != "baseline",
            "engine": self.engine,
            "alternative": "eager PyTorch channels_last fp32" if self.alternative() else None,
            "flops_per_image": self.flops_per_image,
            "weights": self.weights,
        }
        if self.cfg.get("accuracy"):
            result["accuracy"] = self.accuracy()
        return result

    def accuracy(self) -> dict[str, Any]:
        """Top-1 on a fixed (seeded) subset of the test split, the checkpoint's weights, each side's path."""
        ckpt, test = self.cfg.get("ckpt"), self.data.splits["test"]
        if not ckpt:
            return {"skipped": self.cfg.get("ckpt_note") or "no checkpoint"}
        samples = pick(test, min(int(self.cfg["acc_images"]) or len(test), len(test)), seed=1)
        labels = torch.tensor([label for _, label in samples])
        started, workers = time.perf_counter(), int(self.cfg["workers"])
        differ = {"skipped": "the checkpoint's classes differ from the data's"}
        if self.side == "baseline":
            model, info, _ = fv("load_checkpoint_model")(ckpt)
            if list(info.class_names) != list(self.data.classes):
                return differ
            model, predicted = model.to(self.device), []
            with torch.no_grad():
                for images, _ in plain_loader(samples, info.preprocessing, 64, workers):
                    predicted.append(model(images.to(self.device)).argmax(1).cpu())
            correct = (torch.cat(predicted) == labels).float().mean().item()
            path = "plain PIL + torchvision, float32 NCHW, no_grad"
            return {
                "images": len(samples),
                "acc": correct,
                "path": path,
                "seconds": time.perf_counter() - started,
            }
        result: dict[str, Any] = {"images": len(samples)}
        for key, precision, engine in (("acc", PRECISION, "auto"), ("acc_fp32", "32", "torch")):
            predictor = fv("Predictor")(ckpt, device=str(self.device), precision=precision, engine=engine)
            if list(predictor.class_names) != list(self.data.classes):
                return differ
            out = fv("infer_files")(predictor, [p for p, _ in samples], batch_size=int(self.cfg["ours_batch"]),
                                    num_workers=workers, progress=False)  # fmt: skip
            result[key] = (out.logits.argmax(1) == labels[out.indices]).float().mean().item()
            if key == "acc":
                result["precision"] = f"{predictor.precision} on {predictor.engine}"
                result["path"] = f"Predictor + infer_files ({predictor.describe().split(': ', 1)[-1]})"
        return {**result, "seconds": time.perf_counter() - started}


# ---- frozen_epoch --------------------------------------------------------------------------------------
class FrozenEpoch:
    """Stage 1 (backbone frozen, head trains). Baseline: images -> whole model every epoch, on a subset of K
    images, extrapolated to the split. Ours: pooled features extracted once (measured on the same K images),
    then a head epoch on in-memory features of the full split size."""

    unfreeze: str | None = None  # what trains besides the head (stage 2: STAGE2_UNFREEZE)

    def __init__(self, side: str, cfg: dict[str, Any]):
        self.cfg, self.side, self.device = cfg, side, device_of(cfg)
        self.data = load_splits(cfg["data_root"])
        self.split_size = len(self.data.splits["train"])
        self.batch = int(cfg["train_batch"])
        num_classes = len(self.data.classes)
        count = (
            cfg["train_images"]
            if self.unfreeze is None
            else cfg[f"{'stage2' if side == 'baseline' else 'prefix'}_images"]
        )
        self.samples = pick(self.data.splits["train"], int(count))
        warm_page_cache([p for p, _ in self.samples])
        if side == "baseline":
            model, self.pre, _ = build_model(num_classes, int(cfg["image_size"]))
            self.model = model.to(self.device)
            self.optimizer = torch.optim.AdamW(self.trainable(), lr=1e-3 if self.unfreeze is None else 1e-4,
                                               weight_decay=1e-4)  # fmt: skip
            self.train_batches(limit=1)  # warm-up
        else:
            self.module = lit_module(num_classes, self.data.classes, int(cfg["image_size"])).to(self.device)
            self.pre = self.module.preprocessing
            self.depth = None if self.unfreeze is None else self.module.net.prefix_depth(self.unfreeze)
            warm = self.extract(self.samples[: int(cfg["extract_batch"])])  # warm-up, then a 2-batch epoch
            self.fit(tile(warm["inputs"], 2 * self.batch), tile(warm["labels"], 2 * self.batch))
            self.inputs: torch.Tensor | None = None
            self.prepare()
        say(cfg, f"{side}: {len(self.samples)} train images of {self.split_size}, batch {self.batch}")

    # baseline ---------------------------------------------------------------------------------------------
    def trainable(self) -> list[nn.Parameter]:
        self.model.backbone.requires_grad_(False)
        return list(self.model.head.parameters())

    def train_batches(self, limit: int | None = None) -> int:
        loader = plain_loader(self.samples, self.pre, self.batch, int(self.cfg["workers"]), shuffle=True)
        self.model.train()
        self.model.backbone.eval()  # frozen: BatchNorm statistics do not move
        return plain_train_steps(self.model, self.optimizer, loader, self.device, limit)

    # ours -------------------------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Stage 1 extracts in every repeat (its cost is measured); stage 2 extracts once, here."""

    def extract(self, samples: list[tuple[str, int]]) -> dict[str, Any]:
        """foodvision's extraction: the frozen backbone (its in-memory ONNX export included) over a loader."""
        loader = ours_images(self.cfg, samples, self.pre, int(self.cfg["extract_batch"]))
        precision = precision_for(self.device)
        engine = fv("resolve_engine")("auto", self.device, precision)
        started = time.perf_counter()
        run = fv("frozen_forward")(
            self.module, engine, lambda: fv("autocast")(self.device, precision), self.depth
        )
        pooled, labels, maps = fv("extract_features")(self.module, loader, run, "bench")
        sync(self.device)
        inputs = pooled if self.depth is None else maps
        return {"inputs": inputs, "labels": labels, "seconds": time.perf_counter() - started}

    def fit(self, inputs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """One epoch of foodvision's training step on cached tensors (``FoodDataModule.loader``, Lightning)."""
        entry = fv("POOLED") if self.depth is None else fv("prefix_entry")(self.depth)
        loader = ours_loader(
            self.cfg, fv("CachedInputs")(entry, [TensorDataset(inputs, labels)]), self.batch, True
        )
        if self.unfreeze is None:  # stage 1: the backbone stays frozen
            finetune = fv("TwoStageFinetuning")(stage1_epochs=None, unfreeze="none")
        else:  # stage 2 from the first epoch, BatchNorm frozen
            finetune = fv("TwoStageFinetuning")(stage1_epochs=0, unfreeze=self.unfreeze, train_bn=False)
        return fit_one_epoch(self.module, loader, finetune, self.device)

    def run(self) -> dict[str, Any]:
        if self.side == "baseline":
            return rate(*timed(self.train_batches))
        extracted = self.extract(self.samples)
        if self.inputs is None:
            rows = int(self.cfg["frozen_rows"]) or self.split_size
            self.inputs, self.labels = tile(extracted["inputs"], rows), tile(extracted["labels"], rows)
        timing = self.fit(self.inputs, self.labels)
        return {
            **rate(len(extracted["labels"]), extracted["seconds"], "extract_"),
            **rate(len(self.labels), timing["epoch_seconds"]),
            "fit_seconds": timing["fit_seconds"],
        }

    def finish(self) -> dict[str, Any]:
        out = {"split_size": self.split_size, "subset": len(self.samples), "batch": self.batch,
               "workers": int(self.cfg["workers"])}  # fmt: skip
        if self.side == "ours":
            out["trainer_precision"] = trainer_precision(self.device)
            out["feature_shape"] = list(self.inputs.shape) if self.inputs is not None else None
        return out


# ---- stage2_epoch --------------------------------------------------------------------------------------
class Stage2Epoch(FrozenEpoch):
    """Stage 2 (blocks.5, blocks.6, conv_head train; BatchNorm frozen). Baseline: float32 NCHW whole model
    forward + backward on images (subset K, extrapolated). Ours: the recipe's path, ``forward_suffix`` on
    cached prefix maps (depth 5) in a Lightning Trainer with bf16-mixed and channels_last."""

    unfreeze = STAGE2_UNFREEZE

    def trainable(self) -> list[nn.Parameter]:
        trainable = []
        for name, parameter in self.model.backbone.named_parameters():
            parameter.requires_grad_(name.startswith(STAGE2_TRAINABLE) and ".bn" not in f".{name}")
            trainable += [parameter] if parameter.requires_grad else []
        self.trainable_params = sum(p.numel() for p in trainable)
        return [*self.model.head.parameters(), *trainable]

    def train_batches(self, limit: int | None = None) -> int:
        loader = plain_loader(self.samples, self.pre, self.batch, int(self.cfg["workers"]), shuffle=True)
        self.model.train()
        for module in self.model.backbone.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()  # frozen BatchNorm, as the recipe (train_bn=false)
        return plain_train_steps(self.model, self.optimizer, loader, self.device, limit)

    def prepare(self) -> None:
        extracted = self.extract(self.samples)
        maps = extracted["inputs"]
        self.extraction = {
            **rate(len(extracted["labels"]), extracted["seconds"]),
            "map_shape": list(maps.shape[1:]),
            "map_dtype": str(maps.dtype).replace("torch.", ""),
        }
        rows = int(self.cfg["stage2_ours_images"]) or self.split_size
        self.inputs, self.labels = tile(maps, rows), tile(extracted["labels"], rows)
        say(
            self.cfg,
            f"ours: prefix maps {self.extraction['map_shape']} ({self.extraction['map_dtype']}), {rows} rows",
        )

    def run(self) -> dict[str, Any]:
        if self.side == "baseline":
            return rate(*timed(self.train_batches))
        timing = self.fit(self.inputs, self.labels)
        return {**rate(len(self.labels), timing["epoch_seconds"]), "fit_seconds": timing["fit_seconds"]}

    def finish(self) -> dict[str, Any]:
        out: dict[str, Any] = {"split_size": self.split_size, "batch": self.batch}
        if self.side == "baseline":
            return {**out, "subset": len(self.samples), "trainable_backbone_params": self.trainable_params,
                    "precision": "32"}  # fmt: skip
        trainable = sum(p.numel() for p in self.module.net.backbone.parameters() if p.requires_grad)
        return {**out, "extraction": self.extraction, "depth": self.depth, "rows": len(self.labels),
                "trainer_precision": trainer_precision(self.device), "trainable_backbone_params": trainable}  # fmt: skip


# ---- predict -------------------------------------------------------------------------------------------
class Predict:
    """Model load time, one-photo latency and a folder's throughput: a plain script vs ``predict.py``'s path."""

    def __init__(self, side: str, cfg: dict[str, Any]):
        self.cfg, self.side, self.device, self.ckpt = cfg, side, device_of(cfg), cfg["ckpt"]
        test = load_splits(cfg["data_root"]).splits["test"]
        self.photos = [p for p, _ in pick(test, int(cfg["latency_photos"]), seed=2)]
        folder_files = [p for p, _ in pick(test, int(cfg["folder_photos"]), seed=3)]
        self.folder = Path(tempfile.mkdtemp(prefix=f"bench-predict-{side}-"))
        try:
            for index, path in enumerate(folder_files):  # repeats (tiny trees) get their own names
                (self.folder / f"{index:05d}_{Path(path).name}").symlink_to(Path(path).resolve())
            warm_page_cache(self.photos + folder_files)
            self.load()  # warm-up: first-time imports and allocations are not model loading
            self.latency(self.photos[:1])
        except BaseException:
            self.close()
            raise
        say(cfg, f"{side}: {len(self.photos)} photos for latency, folder of {len(folder_files)}")

    def load(self) -> float:
        started = time.perf_counter()
        if self.side == "baseline":
            self.model, self.transform = load_plain(self.ckpt, self.device)
        else:
            self.predictor = fv("Predictor")(self.ckpt, device=str(self.device), precision=PRECISION)
        sync(self.device)
        return time.perf_counter() - started

    def predict_plain(self, path: str) -> torch.Tensor:
        image = Image.open(path).convert("RGB")
        with torch.no_grad():
            return self.model(self.transform(image).unsqueeze(0).to(self.device)).softmax(1).cpu()

    def latency(self, photos: list[str]) -> list[float]:
        seconds = []
        for photo in photos:
            started = time.perf_counter()
            if self.side == "baseline":
                self.predict_plain(photo)
            else:
                fv("infer_files")(self.predictor, [photo], batch_size=1, num_workers=0, progress=False)
            seconds.append(time.perf_counter() - started)
        return seconds

    def run_folder(self) -> int:
        if self.side == "baseline":
            files = sorted(str(p) for p in self.folder.iterdir())
            for path in files:  # plain loop: one photo at a time
                self.predict_plain(path)
            return len(files)
        found = fv("collect_inputs")([str(self.folder)])
        batch, workers = int(self.cfg["predict_batch"]) or None, int(self.cfg["predict_workers"])
        result = fv("infer_files")(
            self.predictor, found.files, batch_size=batch, num_workers=workers, progress=False
        )
        fv("top_k_rows")(found.files, result.indices, result.probabilities, self.predictor.class_names, 3)
        return len(result.indices)

    def run(self) -> dict[str, Any]:
        load_seconds = self.load()
        latencies = self.latency(self.photos)
        return {"load_seconds": load_seconds, "latency_seconds": statistics.median(latencies),
                "latencies": latencies, **rate(*timed(self.run_folder))}  # fmt: skip

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def finish(self) -> dict[str, Any]:
        if self.side == "baseline":
            return {
                "path": "torch.load + build + load_state_dict; PIL + torchvision; fp32 no_grad; 1 photo per forward"
            }
        return {
            "path": f"Predictor + collect_inputs + infer_files: {self.predictor.describe().split(': ', 1)[-1]}",
            "batch": self.predictor.max_batch,
            "workers": int(self.cfg["predict_workers"]),
        }


# ---- whole commands: memory, scale, recipe -------------------------------------------------------------
def _process_tree(root: int) -> list[int]:
    """``root`` and every process below it (DataLoader workers, ONNX export helpers)."""
    children: dict[int, list[int]] = {}
    for name in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError, IndexError, ValueError), open(f"/proc/{name}/stat") as handle:
            children.setdefault(int(handle.read().rsplit(")", 1)[1].split()[1]), []).append(int(name))
    found, todo = [], [root]
    while todo:
        found.append(pid := todo.pop())
        todo.extend(children.get(pid, []))
    return found


def _anon_and_pss_kb(pids: list[int]) -> tuple[int, int]:
    """Pss_Anon and Pss summed over ``pids`` (PSS: pages shared copy-on-write with forked workers count
    once; Pss_Anon leaves out file-backed pages, e.g. a memory-mapped cache, which the kernel can drop)."""
    anon = pss = 0
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Pss_Anon:"):
                    anon += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
    return anon, pss


def run_command(
    command: list[str], env: dict[str, str] | None, log: Path | None, sample: float = 0.0
) -> dict:
    """Run ``command`` in a process of its own: its peak RSS (``ru_maxrss`` from ``wait4``: the process and
    the workers it waited for, as ``/usr/bin/time -f %M`` reports it), wall time and exit code; with
    ``sample`` also the peaks of anonymous memory and PSS summed over it and its descendants, sampled every
    ``sample`` seconds from ``/proc/PID/smaps_rollup``."""
    started = time.perf_counter()
    peak_anon = peak_pss = 0
    with open(log or os.devnull, "w") as sink:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG if sample else 0)
            if pid:
                break
            anon, pss = _anon_and_pss_kb(_process_tree(process.pid))
            peak_anon, peak_pss = max(peak_anon, anon), max(peak_pss, pss)
            time.sleep(sample)
    result = {"peak_rss_mb": usage.ru_maxrss / 1024.0, "seconds": time.perf_counter() - started,
              "returncode": os.waitstatus_to_exitcode(status)}  # fmt: skip
    if result["returncode"] != 0:
        tail = Path(log).read_text()[-3000:] if log else ""
        raise RuntimeError(f"{' '.join(command[1:3])} exited with {result['returncode']}:\n{tail}")
    return (
        {"peak_anon_mb": peak_anon / 1024.0, "peak_pss_mb": peak_pss / 1024.0, **result} if sample else result
    )


def tool_env(**extra: str) -> dict[str, str]:
    """The environment of a measured command: its progress bar on (as a user runs it), offline weights."""
    return {**{k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}, "HF_HUB_OFFLINE": "1", **extra}


class Memory:
    """Peak RSS of whole commands, each in a process of its own: ``train.py`` (the default recipe, or shortened
    by ``--memory-train-args``; cold feature cache), ``eval.py`` on the test split and on a tree of
    ``memory_big_photos`` photos, ``predict.py`` on a folder of ``folder_photos`` and of ``memory_big_photos``;
    beside the plain-PyTorch scripts of ``bench/plain_memory.py`` (training steps on images, an eval loop
    with a DataLoader, one photo at a time)."""

    def __init__(self, side: str, cfg: dict[str, Any]):
        self.cfg = cfg
        self.scratch = Path(tempfile.mkdtemp(prefix="bench-memory-"))
        self.data = load_splits(cfg["data_root"])
        self.food101 = (Path(cfg["data_root"]) / "meta" / "classes.txt").is_file()
        self.results: list[dict[str, Any]] = []

    def close(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)

    def data_args(self, root: Path | None = None) -> list[str]:
        if root is None and self.food101:
            return [f"data.root={self.cfg['data_root']}"]
        return ["data=imagefolder", f"data.root={root or self.cfg['data_root']}"]

    def listing(self, name: str, samples: list[tuple[str, int]]) -> str:
        path = self.scratch / f"{name}.tsv"
        path.write_text("".join(f"{p}\t{label}\n" for p, label in samples))
        return str(path)

    def folder(self, name: str, samples: list[tuple[str, int]], classes: bool = False) -> Path:
        """Symlinks to ``samples`` (repeats get their own names); ``classes``: class folders."""
        root = self.scratch / name
        for index, (path, label) in enumerate(samples):
            where = root / self.data.classes[label] if classes else root
            where.mkdir(parents=True, exist_ok=True)
            (where / f"{index:05d}_{Path(path).name}").symlink_to(Path(path).resolve())
        return root

    def big_tree(self, count: int) -> Path:
        """An image-folder tree whose test split holds ``count`` photos (every photo of the data, repeated
        when there are fewer); train/validation: a few per class."""
        every = [s for split in ("train", "val", "test") for s in self.data.splits[split]]
        self.folder("big/test", pick(every, count, seed=4), classes=True)
        few = [next(s for s in every if s[1] == label) for label in range(len(self.data.classes))]
        for split in ("train", "validation"):
            self.folder(f"big/{split}", few * 2, classes=True)
        return self.scratch / "big"

    def measure(self, key: str, side: str, photos: int, command: list[str], env: dict | None = None) -> None:
        say(self.cfg, f"{key} ({side}, {photos} photos): {' '.join(command[1:])[:160]}")
        result = run_command(command, env, self.scratch / f"{key}-{side}.log")
        say(self.cfg, f"  {result['peak_rss_mb']:.0f} MB peak RSS, {result['seconds']:.0f} s")
        self.results.append({"command": key, "side": side, "photos": photos, **result})

    def run(self) -> dict[str, Any]:
        python, cfg, splits = sys.executable, self.cfg, self.data.splits
        env = tool_env(FOODVISION_CACHE=str(self.scratch / "cache"))  # a cold cache
        plain = [python, str(BENCH_DIR / "plain_memory.py")]
        ckpt = str(cfg["ckpt"]) if cfg.get("ckpt") else None
        if not cfg.get("memory_skip_train"):
            logs = self.scratch / "logs"
            args = [*cfg.get("memory_train_args", []), *self.data_args(), f"paths.log_dir={logs}"]
            photos = sum(len(splits[s]) for s in ("train", "val", "test"))
            self.measure("train.py", "foodvision", photos, [python, str(ROOT / "train.py"), *args], env)
            found = sorted(logs.glob("runs/*/checkpoints/last.ckpt"))
            ckpt = ckpt or (str(found[-1]) if found else None)
        if not ckpt:
            raise RuntimeError("no checkpoint: pass --ckpt or let the section run train.py")
        steps = int(cfg["memory_train_steps"])
        train_list = self.listing("train", pick(splits["train"], steps * 64, seed=5))
        self.measure("train.py", "plain", steps * 64, [*plain, "train", ckpt, train_list, str(steps)])
        test, common = (
            splits["test"],
            ["progress=false", f"ckpt_path={ckpt}", *cfg.get("memory_tool_args", [])],
        )
        evaluate = [python, str(ROOT / "eval.py"), *common]
        self.measure(
            "eval.py",
            "foodvision",
            len(test),
            [*evaluate, *self.data_args(), f"output_dir={self.scratch / 'eval'}"],
            env,
        )
        self.measure("eval.py", "plain", len(test), [*plain, "eval", ckpt, self.listing("test", test)])
        samples = pick(test, int(cfg["folder_photos"]), seed=3)
        folder, predict = self.folder("folder", samples), [python, str(ROOT / "predict.py"), *common]
        self.measure("predict.py", "foodvision", len(samples),
                     [*predict, f"inputs=[{folder}]", f"output={self.scratch / 'folder.csv'}"], env)  # fmt: skip
        self.measure(
            "predict.py", "plain", len(samples), [*plain, "predict", ckpt, self.listing("folder", samples)]
        )
        big = int(cfg["memory_big_photos"])
        if big:
            root = self.big_tree(big)
            self.measure("eval.py", "foodvision", big,
                         [*evaluate, *self.data_args(root), f"output_dir={self.scratch / 'ebig'}"], env)  # fmt: skip
            self.measure("predict.py", "foodvision", big,
                         [*predict, f"inputs=[{root / 'test'}]", f"output={self.scratch / 'big.csv'}"], env)  # fmt: skip
        return {"measurements": self.results, "checkpoint": ckpt}

    def finish(self) -> dict[str, Any]:
        return {"train_args": self.cfg.get("memory_train_args", []), "threads": self.cfg["threads"]}


def _variant(job: tuple[str, str, int]) -> None:
    """One photo variant (deterministic in its index): mirrored, cropped and re-encoded, so files differ."""
    source, target, index = job
    if os.path.exists(target):
        return
    with Image.open(source) as opened:
        image = opened.convert("RGB")
    rng = random.Random(index)
    if index % 2:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    width, height = image.size
    cut = rng.uniform(0.78, 0.95)
    w, h = max(8, int(width * cut)), max(8, int(height * cut))
    left, top = rng.randint(0, width - w), rng.randint(0, height - h)
    image = image.crop((left, top, left + w, top + h)).resize((width, height), Image.Resampling.BILINEAR)
    image.save(target, quality=rng.randint(70, 95))


def make_variant_tree(source: Path, target: Path, copies: int, processes: int) -> Path:
    """A Food-101 layout at ``target`` whose train list holds every train photo of ``source`` and
    ``copies`` variants of each (:func:`_variant`); test: the source's test photos (links). Kept between
    runs (``.complete`` marks a finished tree)."""
    done = target / ".complete"
    if done.is_file() and done.read_text() == str(copies):
        return target
    lines = {split: (source / "meta" / f"{split}.txt").read_text().split() for split in ("train", "test")}
    (target / "meta").mkdir(parents=True, exist_ok=True)
    shutil.copy2(source / "meta" / "classes.txt", target / "meta" / "classes.txt")
    jobs, train = [], []
    for number, item in enumerate(lines["train"] + lines["test"]):
        link = target / "images" / f"{item}.jpg"
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(source / "images" / f"{item}.jpg")
        if number >= len(lines["train"]):
            continue
        train.append(item)
        for copy in range(copies):
            jobs.append((str(source / "images" / f"{item}.jpg"), str(target / "images" / f"{item}_v{copy}.jpg"),
                         number * 16 + copy))  # fmt: skip
            train.append(f"{item}_v{copy}")
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        for _ in pool.imap_unordered(_variant, jobs, chunksize=256):
            pass
    (target / "meta" / "train.txt").write_text("\n".join(train) + "\n")
    (target / "meta" / "test.txt").write_text("\n".join(lines["test"]) + "\n")
    done.write_text(str(copies))
    return target


class Scale:
    """``train.py`` (the default recipe, shortened by ``--scale-train-args``; cold feature cache; no test)
    at several numbers of training photos: peak anonymous memory summed over the process and its loader
    workers (``Pss_Anon``, sampled every 0.5 s), whole-process peak RSS, and the seconds per photo of the
    feature extraction and of a stage-2 epoch. Trees: food101-64px as it is (18,180 training photos after
    the 10 % validation carve-out), capped per class for smaller sizes, and for larger ones a tree of
    variants of its photos (flips, crops, re-encodes), made once under ``--scale-dir``."""

    def __init__(self, side: str, cfg: dict[str, Any]):
        self.cfg = cfg
        self.scratch = Path(tempfile.mkdtemp(prefix="bench-scale-"))
        self.source = Path(cfg["scale_root"])
        if not (self.source / "meta" / "classes.txt").is_file():
            raise RuntimeError(f"--scale-root {self.source}: not a Food-101 layout (meta/classes.txt)")
        self.classes = len((self.source / "meta" / "classes.txt").read_text().split())
        self.source_train = len((self.source / "meta" / "train.txt").read_text().split())

    def close(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)

    def tree_for(self, photos: int) -> tuple[Path, list[str], int]:
        """(root, caps, training photos) for about ``photos`` training photos."""
        available = int(self.source_train * 0.9)
        root, listed = self.source, self.source_train
        if photos > available:
            copies = math.ceil(photos / available) - 1
            target = Path(self.cfg["scale_dir"]) / f"variants-{copies}"
            say(self.cfg, f"variant tree with {copies} variant(s) per photo: {target}")
            root = make_variant_tree(self.source, target, copies, max(1, self.cfg["threads"]))
            listed = self.source_train * (copies + 1)
        train_cap = min(int(listed // self.classes * 0.9), math.ceil(photos / self.classes))
        val_cap = max(2, math.ceil(train_cap / 9))
        caps = [f"++data.max_per_class.train={train_cap}", f"++data.max_per_class.val={val_cap}"]
        return root, caps, train_cap * self.classes

    def run(self) -> dict[str, Any]:
        cfg, results = self.cfg, []
        code = Path(cfg.get("scale_code") or ROOT)
        env = tool_env(PYTHONPATH=os.pathsep.join([str(code / "src"), str(BENCH_DIR)]), TQDM_MININTERVAL="30")
        for photos in [int(p) for p in str(cfg["scale_sizes"]).split(",") if p.strip()]:
            root, caps, train_photos = self.tree_for(photos)
            times = self.scratch / f"times-{photos}.json"
            env["FOODVISION_CACHE"] = str(self.scratch / f"cache-{photos}")  # a cold cache
            command = [
                sys.executable, str(code / "train.py"), f"data.root={root}", *caps,
                f"data.image_size={cfg['scale_image_size']}", *cfg.get("scale_train_args", []),
                f"paths.log_dir={self.scratch / f'run-{photos}'}",
                "+callbacks.scale_timer._target_=scale_timer.EpochTimes", f"+callbacks.scale_timer.out={times}",
            ]  # fmt: skip
            say(cfg, f"train.py, {train_photos:,} training photos: {' '.join(command[2:])[:200]}")
            result = run_command(command, env, self.scratch / f"train-{photos}.log", sample=0.5)
            stamps = json.loads(times.read_text())
            epochs = stamps["epochs"]
            first, last = epochs["0"], epochs[str(max(int(k) for k in epochs))]
            stage2_seconds, extraction = last["train_end"] - last["start"], first["start"] - stamps["setup"]
            trained = int(last.get("samples") or train_photos)  # the stage-2 epoch's photos
            row = {
                "photos": photos, "train_photos": train_photos, "root": str(root), **result,
                "extraction_seconds": extraction, "extraction_s_per_photo": extraction / train_photos,
                "stage2_epoch_seconds": stage2_seconds, "stage2_photos": trained,
                "stage2_s_per_photo": stage2_seconds / trained, "code": str(code),
            }  # fmt: skip
            say(
                cfg,
                f"  anon {row['peak_anon_mb']:,.0f} MB, RSS {row['peak_rss_mb']:,.0f} MB, {row['seconds']:.0f} s",
            )
            results.append(row)
            shutil.rmtree(self.scratch / f"cache-{photos}", ignore_errors=True)
        return {"measurements": results}

    def finish(self) -> dict[str, Any]:
        return {"threads": self.cfg["threads"]}


DEFAULT_MODEL_PRESET = "mobilenetv2_ft"
# What makes a run the default recipe: everything that changes its training (not paths, data.root, precision
# as resolved, ...). Compared with conf/ as it is now, since presets change.
RECIPE_KEYS = (
    "model", "callbacks.finetune", "callbacks.feature_cache.enabled", "optimizer", "scheduler", "label_smoothing",
    "augment", "channels_last", "seed", "trainer.max_epochs", "trainer.fast_dev_run", "trainer.limit_train_batches",
    "trainer.limit_val_batches", "data.image_size", "data.batch_size", "data.balance", "data.classes",
    "data.max_per_class",
)  # fmt: skip


def lookup(config: dict[str, Any], dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def default_recipe_config() -> dict[str, Any]:
    """``conf/train.yaml`` composed without overrides (what ``make train`` runs), unresolved."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            return OmegaConf.to_container(compose("train"), resolve=False)
    finally:
        GlobalHydra.instance().clear()


def recipe_differences(config: dict[str, Any], default: dict[str, Any]) -> list[str]:
    def value(source: dict[str, Any], key: str) -> Any:
        found = lookup(source, key)
        if key == "scheduler" and isinstance(found, dict) and found.get("name") in (None, "none"):
            return {"name": "none"}  # no scheduler: its other settings (min_lr, ...) do nothing
        return found

    return [key for key in RECIPE_KEYS if value(config, key) != value(default, key)]


def run_summary(run_dir: Path, default: dict[str, Any]) -> dict[str, Any] | None:
    """A finished run (:func:`foodvision.runs.layout.run_row`; None when training did not finish): its model
    preset, overrides, how it differs from the default recipe, and its results."""
    from omegaconf import OmegaConf

    row = fv("run_row")(run_dir)
    if row["status"] != "ok":
        return None
    config = fv("read_config")(run_dir)
    config = OmegaConf.to_container(config, resolve=False) if config is not None else {}
    differences = recipe_differences(config, default)
    return {
        "run_dir": str(run_dir),
        "model_preset": fv("hydra_value")(run_dir, "hydra.runtime.choices.model"),
        "overrides": fv("read_overrides")(run_dir),
        "differs_from_default_in": differences,
        "default_recipe": not differences,
        "finished": (Path(run_dir) / fv("METRICS")).stat().st_mtime,
        **{key: row[key] for key in ("wall_seconds", "train_seconds", "test_acc", "val_acc", "image_size")},
        "stage1_epochs": lookup(config, "callbacks.finetune.stage1_epochs"),
        "max_epochs": lookup(config, "trainer.max_epochs"),
        "precision": lookup(config, "trainer.precision"),
    }


def newest_default_run(log_dir: Path, default: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """The newest finished run of the default recipe; else the newest full-size mobilenetv2_ft run (not a debug
    run), with what differs; else the newest mobilenetv2_ft run."""
    runs = [s for d in sorted(log_dir.glob("runs/*/")) if (s := run_summary(d, default)) is not None]
    matching = [r for r in runs if r["default_recipe"]]
    if matching:
        return max(
            matching, key=lambda r: r["finished"]
        ), "newest run of the default recipe (conf/ as it is now)"
    runs = [r for r in runs if r["model_preset"] == DEFAULT_MODEL_PRESET]
    if not runs:
        return None, f"no finished run of model={DEFAULT_MODEL_PRESET} under {log_dir}/runs"
    size = lookup(default, "data.image_size")
    full = [
        r
        for r in runs
        if r["image_size"] == size and not any(str(o).startswith("debug=") for o in r["overrides"])
    ]
    chosen = max(full or runs, key=lambda r: r["finished"])
    kind = "full-size run without debug overrides" if full else "run"
    return chosen, (f"no run of the default recipe; newest {DEFAULT_MODEL_PRESET} {kind}, which differs in "
                    f"{', '.join(chosen['differs_from_default_in'])} (overrides {chosen['overrides']})")  # fmt: skip


class Recipe:
    """The whole default recipe: read from the newest finished run, or run ``train.py`` (``--run-recipe``)."""

    def __init__(self, side: str, cfg: dict[str, Any]):
        self.cfg = cfg
        self.children_rss_mb: float | None = None

    def run(self) -> dict[str, Any]:
        log_dir, default = Path(self.cfg["log_dir"]), default_recipe_config()
        if not self.cfg.get("run_recipe"):
            run, note = newest_default_run(log_dir, default)
            return {"source": "existing run", "run": run, "note": note}
        command = [sys.executable, str(ROOT / "train.py"), *self.cfg.get("recipe_args", [])]
        say(self.cfg, "running " + " ".join(command))
        started_at, started = time.time(), time.perf_counter()
        completed = subprocess.run(command, cwd=ROOT, env=tool_env(), check=False)  # with its progress bar
        seconds = time.perf_counter() - started
        self.children_rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
        fresh = [d for d in log_dir.glob("runs/*/") if d.stat().st_mtime >= started_at - 1]
        summaries = [
            s for d in fresh if (s := run_summary(d, default)) is not None and s["finished"] >= started_at
        ]
        run = max(summaries, key=lambda r: r["finished"]) if summaries else None
        note = "train.py wrote no metrics.json"
        if run:
            differs = run["differs_from_default_in"]
            note = f"not the default recipe: {', '.join(differs)} differ" if differs else "the default recipe"
        return {"source": "ran train.py", "command": command, "returncode": completed.returncode,
                "seconds": seconds, "run": run, "note": note}  # fmt: skip

    def finish(self) -> dict[str, Any]:
        return {"train_py_peak_rss_mb": self.children_rss_mb}


# ---- int8 ----------------------------------------------------------------------------------------------
class Int8:
    """ONNX Runtime on the checkpoint's float32 export (baseline) against its INT8 model (``export.py
    quantize=int8``: static, calibrated on ``int8_calibration`` train photos), both with foodvision's session
    options: throughput on the same preloaded test images, and top-1 accuracy on the test split."""

    def __init__(self, side: str, cfg: dict[str, Any]):
        import onnxruntime as ort

        self.cfg, self.side, ckpt = cfg, side, cfg.get("ckpt")
        if not ckpt:
            raise RuntimeError(f"int8 needs a checkpoint: {cfg.get('ckpt_note') or 'pass --ckpt'}")
        self.data = load_splits(cfg["data_root"])
        model, self.info, _ = fv("load_checkpoint_model")(ckpt)
        if list(self.info.class_names) != list(self.data.classes):
            raise RuntimeError("the checkpoint's classes differ from the data's")
        self.folder = Path(tempfile.mkdtemp(prefix="bench-int8-"))
        pre = self.info.preprocessing
        path = fv("export_onnx")(
            model.float().eval(), self.info, self.folder / "float32.onnx", Path(ckpt).name
        )
        self.calibration_seconds = None
        if side == "ours":
            started = time.perf_counter()
            train = pick(self.data.splits["train"], int(cfg["int8_calibration"]), seed=2)
            dataset = fv("ImageListDataset")(train, pre.eval_transform(), draft_size=pre.resize_size)
            reader = fv("calibration_reader")(dataset, list(range(len(train))), "images")
            fv("quantize_onnx")(path, self.folder / "int8.onnx", reader)
            path = self.folder / "int8.onnx"
            self.calibration_seconds = time.perf_counter() - started
        self.path = path
        self.session = ort.InferenceSession(
            str(path), fv("session_options")(), providers=["CPUExecutionProvider"]
        )
        images, _ = load_all(
            ours_images(cfg, pick(self.data.splits["test"], int(cfg["infer_images"])), pre, 64)
        )
        self.batch = 32
        self.batches = [b.numpy() for b in images.split(self.batch)]
        self.forward(self.batches[:1] + self.batches[-1:])  # warm-up: both batch shapes
        say(cfg, f"{side}: {path.name}, {len(images)} preloaded images, batch {self.batch}")

    def forward(self, batches: list[Any]) -> list[Any]:
        return [self.session.run(None, {"images": batch})[0] for batch in batches]

    def run(self) -> dict[str, Any]:
        return rate(sum(len(b) for b in self.batches), timed(self.forward, self.batches)[1])

    def finish(self) -> dict[str, Any]:
        test = self.data.splits["test"]
        samples = pick(test, min(int(self.cfg["acc_images"]) or len(test), len(test)), seed=1)
        predicted, labels = [], []
        for images, targets in ours_images(self.cfg, samples, self.info.preprocessing, 64):
            predicted.extend(int(p) for logits in self.forward([images.numpy()]) for p in logits.argmax(1))
            labels.extend(int(t) for t in targets)
        correct = sum(p == t for p, t in zip(predicted, labels, strict=True))
        return {
            "model": "INT8 (QDQ, per-channel)" if self.side == "ours" else "float32",
            "size_mb": self.path.stat().st_size / 1e6,
            "batch": self.batch,
            "image_size": self.info.preprocessing.image_size,
            "calibration_seconds": self.calibration_seconds,
            "test_images": len(labels),
            "test_acc": correct / max(1, len(labels)),
            "predictions": predicted,
        }

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def environment() -> dict[str, Any]:
    """Torch build, threads and precision support of this machine (asked in a child, so the parent stays small)."""
    # Plain str, never torch's TorchVersion: unpickling that in the parent would import torch there.
    info: dict[str, Any] = {
        "torch": str(torch.__version__),
        "python": sys.version.split()[0],
        "torch_threads_default": torch.get_num_threads(),
        "mkldnn_bf16_supported": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "cuda_available": torch.cuda.is_available(),
        # Peak RSS of a process that imported torch/torchvision only: the floor of every section's RSS.
        "import_peak_rss_mb": round(maxrss_mb(), 1),
    }
    for package in ("torchvision", "timm", "lightning", "PIL"):
        with contextlib.suppress(Exception):
            info[package] = str(__import__(package).__version__)
    if torch.cuda.is_available():
        info["cuda_device"] = str(torch.cuda.get_device_name(0))
        info["cuda_bf16_supported"] = bool(torch.cuda.is_bf16_supported())
    return info

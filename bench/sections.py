"""The measured work of each benchmark section, run inside the section's own spawned processes.

Each section is a class built in a fresh process for one *side* (``baseline``, ``ours`` or ``main``):
``__init__`` prepares (data, model, warm-up; not timed unless said), ``run()`` does one timed repeat and
returns plain numbers, ``finish()`` returns what is measured once (accuracy, ...). ``bench/run.py``
interleaves the repeats of the two sides and keeps every raw number.

Baseline = what a plain PyTorch script does: ``Image.open().convert('RGB')`` + torchvision
``Resize/CenterCrop/ToTensor/Normalize``, float32, NCHW, ``torch.no_grad``, a ``DataLoader``.
Ours = foodvision's own classes and functions (``ImageListDataset`` with JPEG draft decoding,
``FoodDataModule.loader``, ``LitClassifier`` + ``TwoStageFinetuning`` in a Lightning ``Trainer``,
``extract_features``, ``Predictor``/``infer_files``), channels_last, precision=auto (bf16 only where the hardware has it),
``torch.inference_mode``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
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

for _pattern in (
    r".*does not have many workers.*",
    r".*module\(s\) in eval mode.*",
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
    r".*validation_step.*",
    r".*val_dataloader.*",
    r".*GPU available but not used.*",
):
    warnings.filterwarnings("ignore", message=_pattern)


# ---- shared helpers ------------------------------------------------------------------------------------
# foodvision's precision in the sections: ``auto`` (what the tools choose on this hardware) or ``32`` (float32,
# e.g. the ONNX Runtime path of CPUs without bf16, measured on a CPU that has it); set by ``--precision``.
PRECISION = "auto"


def setup_process(cfg: dict[str, Any]) -> None:
    """Threads, quiet libraries, precision: called first in every section process."""
    import multiprocessing

    global PRECISION
    PRECISION = str(cfg.get("precision", "auto"))

    # A spawned process inherits "spawn" as its start method; DataLoader workers should start the way they do
    # in a plain script (the platform default, fork on Linux), or each worker would re-import torch.
    multiprocessing.set_start_method(None, force=True)
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(int(cfg["threads"]))
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "foodvision", "timm"):
        logging.getLogger(name).setLevel(logging.ERROR)


def quiet_lightning() -> None:
    """Lightning sets its loggers to INFO when imported: silence them after that."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


def say(cfg: dict[str, Any], message: str) -> None:
    print(f"    [{cfg['label']}] {message}", flush=True)


def device_of(cfg: dict[str, Any]) -> torch.device:
    return torch.device(cfg.get("device", "cpu"))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def precision_for(device: torch.device) -> str:
    """foodvision's choice: ``bf16`` where the hardware runs it natively, else ``32`` (``--precision 32``:
    ``32``)."""
    from foodvision.hardware import inference_precision as resolve_precision

    return resolve_precision(PRECISION, device)


def trainer_precision(device: torch.device) -> str:
    if PRECISION == "32":
        return "32-true"
    from foodvision.hardware import trainer_precision as resolve_precision

    return str(resolve_precision("auto", "gpu" if device.type == "cuda" else "cpu"))


def load_splits(root: str | Path) -> Any:
    """Food-101 layout via ``discover_food101(root, 0.1, 42)``; any class-per-folder tree otherwise."""
    from foodvision.data.sources import discover_food101, discover_image_folder

    root = Path(root)
    if (root / "meta" / "classes.txt").is_file():
        return discover_food101(root, 0.1, 42)
    return discover_image_folder(root, (0.7, 0.15, 0.15), 42)


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


def warm_page_cache(samples: list[tuple[str, int]]) -> None:
    """Read every file once so neither side pays the first disk read."""
    for path, _ in samples:
        with open(path, "rb") as handle:
            while handle.read(1 << 20):
                pass


def build_model(num_classes: int, image_size: int) -> tuple[nn.Module, Any, str]:
    """MobileNetV2 with the reference head, offline ImageNet weights (random ones, noted, if absent)."""
    from foodvision.models.classifier import build_classifier

    kwargs = {"kind": "timm", "name": MODEL_NAME, "head": HEAD, "image_size": image_size}
    try:
        return build_classifier(num_classes, pretrained=True, **kwargs)
    except RuntimeError as error:  # PretrainedWeightsError: speed does not depend on the weights
        model, pre, _ = build_classifier(num_classes, pretrained=False, **kwargs)
        return model, pre, f"random init (no offline weights: {str(error).splitlines()[0][:120]})"


def preprocessing_for(image_size: int) -> Any:
    """What ``build_classifier`` gives the model (timm's pretrained config), without building a model."""
    import timm

    from foodvision.data.transforms import Preprocessing

    return Preprocessing.from_timm(timm.models.get_pretrained_cfg(MODEL_NAME).to_dict(), image_size)


def lit_module(num_classes: int, classes: list[str], image_size: int) -> Any:
    from foodvision.training.module import LitClassifier

    model = {"kind": "timm", "name": MODEL_NAME, "pretrained": True, "head": HEAD, "image_size": image_size}
    try:
        return LitClassifier(num_classes, classes, model=model, channels_last=True)
    except RuntimeError:
        return LitClassifier(num_classes, classes, model={**model, "pretrained": False}, channels_last=True)


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


class PlainImageDataset(Dataset):
    """The baseline: ``Image.open().convert('RGB')`` and the classic torchvision eval transform."""

    def __init__(
        self,
        samples: list[tuple[str, int]],
        resize: int,
        crop: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
    ):
        self.samples = list(samples)
        self.transform = T.Compose(
            [T.Resize(resize), T.CenterCrop(crop), T.ToTensor(), T.Normalize(list(mean), list(std))]
        )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        image = Image.open(path).convert("RGB")
        return self.transform(image), label


def plain_loader(
    samples: list[tuple[str, int]], pre: Any, batch: int, workers: int, shuffle: bool = False
) -> DataLoader:
    dataset = PlainImageDataset(samples, pre.resize_size, pre.image_size, pre.mean, pre.std)
    return DataLoader(dataset, batch_size=batch, shuffle=shuffle, num_workers=workers)


def datamodule(cfg: dict[str, Any], batch: int) -> Any:
    """A ``FoodDataModule`` only for its ``loader()`` (the loaders foodvision trains and extracts with)."""
    from foodvision.data.datamodule import FoodDataModule

    return FoodDataModule(
        root=str(cfg["data_root"]),
        batch_size=batch,
        eval_batch_size=batch,
        num_workers=int(cfg["workers"]),
        persistent_workers=False,  # new workers every repeat, as for the baseline
        seed=0,
    )


def ours_loader(
    cfg: dict[str, Any], samples: list[tuple[str, int]], pre: Any, batch: int, shuffle: bool = False
) -> DataLoader:
    from foodvision.data.datasets import ImageListDataset

    dataset = ImageListDataset(samples, pre.eval_transform(), draft_size=pre.resize_size)
    return datamodule(cfg, batch).loader(dataset, shuffle=shuffle, batch_size=batch)


def load_all(loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for batch in loader:
        if batch is None:
            continue
        images.append(batch[0])
        labels.append(torch.as_tensor(batch[1]))
    return torch.cat(images), torch.cat(labels)


def tile(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """``rows`` rows made by repeating ``tensor`` (compute on cached tensors does not depend on values)."""
    reps = math.ceil(rows / len(tensor))
    return tensor.repeat(reps, *([1] * (tensor.dim() - 1)))[:rows].contiguous()


def maxrss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def side_info(cfg: dict[str, Any]) -> dict[str, Any]:
    return {"threads": torch.get_num_threads(), "device": cfg.get("device", "cpu")}


def epoch_timer(device: torch.device) -> Any:
    """A Lightning callback that records the seconds of each training epoch (first to last batch)."""
    import lightning as L

    class EpochTimer(L.Callback):
        def __init__(self) -> None:
            self.seconds: list[float] = []
            self.started = 0.0

        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            sync(device)
            self.started = time.perf_counter()

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            sync(device)
            self.seconds.append(time.perf_counter() - self.started)

    return EpochTimer()


def fit_one_epoch(module: Any, loader: DataLoader, finetune: Any, device: torch.device) -> dict[str, float]:
    """One training epoch of foodvision's LitClassifier in a Lightning Trainer, as ``train.py`` runs it."""
    import lightning as L

    quiet_lightning()
    timer = epoch_timer(device)
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        max_epochs=1,
        precision=trainer_precision(device),
        callbacks=[finetune, timer],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    started = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    return {"epoch_seconds": timer.seconds[-1], "fit_seconds": time.perf_counter() - started}


# ---- 1. matmul_peak -------------------------------------------------------------------------------------
class MatmulPeak:
    """GFLOP/s of ``torch.mm`` n x n in float32 and bfloat16: the physical limit the models are compared to."""

    def __init__(self, side: str, cfg: dict[str, Any]):
        self.cfg = cfg
        self.device = device_of(cfg)
        self.n = int(cfg["matmul_size"])
        generator = torch.Generator().manual_seed(0)
        self.inputs = {}
        self.iterations = {}
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            a = torch.randn(self.n, self.n, generator=generator).to(self.device, dtype)
            b = torch.randn(self.n, self.n, generator=generator).to(self.device, dtype)
            self.inputs[name] = (a, b)
            torch.mm(a, b)  # warm-up
            sync(self.device)
            started = time.perf_counter()
            torch.mm(a, b)
            sync(self.device)
            once = max(time.perf_counter() - started, 1e-6)
            target = float(cfg["matmul_seconds"])
            self.iterations[name] = max(1, min(200, math.ceil(target / once)))
        say(cfg, f"{self.n}x{self.n}, iterations per repeat {self.iterations}")

    def run(self) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for name, (a, b) in self.inputs.items():
            iterations = self.iterations[name]
            sync(self.device)
            started = time.perf_counter()
            for _ in range(iterations):
                torch.mm(a, b)
            sync(self.device)
            seconds = time.perf_counter() - started
            result[f"{name}_gflops"] = 2.0 * self.n**3 * iterations / seconds / 1e9
            result[f"{name}_seconds"] = seconds
        return result

    def finish(self) -> dict[str, Any]:
        return {"size": self.n, "iterations": self.iterations}


# ---- 2. data_loading ------------------------------------------------------------------------------------
class DataLoading:
    """JPEG on disk -> normalised float batch, through a DataLoader with the same workers and batch size."""

    def __init__(self, side: str, cfg: dict[str, Any]):
        self.cfg, self.side = cfg, side
        data = load_splits(cfg["data_root"])
        self.samples = pick(data.splits["train"], int(cfg["load_images"]))
        self.pre = preprocessing_for(int(cfg["image_size"]))  # no model: RSS is the loading's own
        warm_page_cache(self.samples)
        self.batch = int(cfg["load_batch"])
        self.loader()  # imports (lightning, for FoodDataModule) happen here, not in the first timed repeat

    def loader(self) -> DataLoader:
        if self.side == "baseline":
            return plain_loader(self.samples, self.pre, self.batch, int(self.cfg["workers"]))
        return ours_loader(self.cfg, self.samples, self.pre, self.batch)

    def run(self) -> dict[str, Any]:
        loader = self.loader()
        started = time.perf_counter()
        count = 0
        shape = None
        for batch in loader:  # worker start-up included (the same for both)
            count += len(batch[1])
            shape = list(batch[0].shape)
        seconds = time.perf_counter() - started
        return {"images": count, "seconds": seconds, "images_per_s": count / seconds, "batch_shape": shape}

    def finish(self) -> dict[str, Any]:
        what = (
            f"PIL full decode + torchvision Resize({self.pre.resize_size}, bilinear)"
            if self.side == "baseline"
            else f"ImageListDataset draft decode + v2 Resize({self.pre.resize_size}, {self.pre.interpolation})"
        )
        return {"pipeline": what, "batch": self.batch, "workers": int(self.cfg["workers"])}


# ---- 3. inference ---------------------------------------------------------------------------------------
class Inference:
    """Model forward on preloaded batches; FLOPs per image; test accuracy of a checkpoint per path."""

    def __init__(self, side: str, cfg: dict[str, Any]):
        self.cfg, self.side = cfg, side
        self.device = device_of(cfg)
        self.data = load_splits(cfg["data_root"])
        model, self.pre, self.weights = build_model(len(self.data.classes), int(cfg["image_size"]))
        samples = pick(self.data.splits["test"], int(cfg["infer_images"]))
        workers = int(cfg["workers"])
        if side == "baseline":
            images, _ = load_all(plain_loader(samples, self.pre, 64, workers))
            self.batch = int(cfg["baseline_batch"])
            self.model = model.eval().to(self.device)
            self.images = images.to(self.device)
            self.precision = "32"
        else:
            from foodvision.inference.engine import OnnxRuntimeModule, resolve_engine

            images, _ = load_all(ours_loader(cfg, samples, self.pre, 64))
            self.batch = int(cfg["ours_batch"])
            self.model = model.eval().to(self.device, memory_format=torch.channels_last)
            self.images = images.to(self.device).contiguous(memory_format=torch.channels_last)
            self.precision = precision_for(self.device)
            self.engine = resolve_engine("auto", self.device, self.precision)
            if self.engine == "onnxruntime":
                self.runner = OnnxRuntimeModule(self.model, self.images[:1])
        self.batches = list(self.images.split(self.batch))
        self.flops_per_image = None
        if side == "baseline":
            from torch.utils.flop_counter import FlopCounterMode

            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                self.model(self.images[:1])
            self.flops_per_image = int(counter.get_total_flops())
        self.forward(self.batches[:1] + self.batches[-1:])  # warm-up: oneDNN primitives of both batch shapes
        if self.alternative():
            self.forward(self.batches[:1] + self.batches[-1:], *self.alternative())
        say(
            cfg,
            f"{side}: {len(self.images)} preloaded images, batch {self.batch}, precision {self.precision}"
            + (f", engine {self.engine}" if side == "ours" else ""),
        )

    def alternative(self) -> tuple[str, str] | None:
        """foodvision's path without its fastest part, measured in the same process: eager PyTorch
        (channels_last) where ONNX Runtime runs, float32 where bf16 autocast runs."""
        if self.side != "ours":
            return None
        if self.engine == "onnxruntime":
            return ("32", "torch")
        return ("32", "torch") if self.precision != "32" else None

    def context(self, precision: str | None = None) -> contextlib.ExitStack:
        from foodvision.hardware import autocast

        stack = contextlib.ExitStack()
        if self.side == "baseline":
            stack.enter_context(torch.no_grad())
        else:
            stack.enter_context(torch.inference_mode())
            stack.enter_context(autocast(self.device, precision or self.precision))
        return stack

    def forward(
        self, batches: list[torch.Tensor], precision: str | None = None, engine: str | None = None
    ) -> None:
        if self.side == "ours" and (engine or self.engine) == "onnxruntime":
            for batch in batches:
                self.runner(batch)
            return
        with self.context(precision):
            for batch in batches:
                self.model(batch)
        sync(self.device)

    def run(self) -> dict[str, Any]:
        count = len(self.images)
        started = time.perf_counter()
        self.forward(self.batches)
        seconds = time.perf_counter() - started
        result = {"images": count, "seconds": seconds, "images_per_s": count / seconds}
        if self.alternative():
            started = time.perf_counter()
            self.forward(self.batches, *self.alternative())
            result["alt_seconds"] = time.perf_counter() - started
            result["alt_images_per_s"] = count / result["alt_seconds"]
        return result

    def finish(self) -> dict[str, Any]:
        result: dict[str, Any] = {
            "batch": self.batch,
            "precision": self.precision,
            "channels_last": self.side != "baseline",
            "engine": getattr(self, "engine", "torch"),
            "alternative": "eager PyTorch channels_last fp32" if self.alternative() else None,
            "flops_per_image": self.flops_per_image,
            "weights": self.weights,
        }
        if self.cfg.get("accuracy"):
            result["accuracy"] = self.accuracy()
        return result

    def accuracy(self) -> dict[str, Any]:
        """Top-1 on a fixed (seeded) subset of the test split, the checkpoint's weights, each side's path."""
        ckpt = self.cfg.get("ckpt")
        if not ckpt:
            return {"skipped": self.cfg.get("ckpt_note") or "no checkpoint"}
        from foodvision.inference.batches import infer_files
        from foodvision.inference.checkpoints import load_checkpoint_model
        from foodvision.inference.predictor import Predictor

        count = int(self.cfg["acc_images"]) or len(self.data.splits["test"])
        samples = pick(self.data.splits["test"], min(count, len(self.data.splits["test"])), seed=1)
        labels = torch.tensor([label for _, label in samples])
        workers = int(self.cfg["workers"])
        started = time.perf_counter()
        if self.side == "baseline":
            model, info, _ = load_checkpoint_model(ckpt)
            if list(info.class_names) != list(self.data.classes):
                return {"skipped": f"checkpoint classes {info.class_names[:3]}... differ from the data's"}
            model = model.to(self.device)
            predicted = []
            with torch.no_grad():
                for images, _ in plain_loader(samples, info.preprocessing, 64, workers):
                    predicted.append(model(images.to(self.device)).argmax(1).cpu())
            correct = (torch.cat(predicted) == labels).float().mean().item()
            return {
                "images": len(samples),
                "acc": correct,
                "path": "plain PIL + torchvision, float32 NCHW, no_grad",
                "seconds": time.perf_counter() - started,
            }
        files = [path for path, _ in samples]
        result: dict[str, Any] = {"images": len(samples)}
        for key, precision, engine in (("acc", PRECISION, "auto"), ("acc_fp32", "32", "torch")):
            predictor = Predictor(ckpt, device=str(self.device), precision=precision, engine=engine)
            if list(predictor.class_names) != list(self.data.classes):
                return {
                    "skipped": f"checkpoint classes {predictor.class_names[:3]}... differ from the data's"
                }
            out = infer_files(
                predictor, files, batch_size=int(self.cfg["ours_batch"]), num_workers=workers, progress=False
            )
            predicted = out.logits.argmax(1)
            result[key] = (predicted == labels[out.indices]).float().mean().item()
            if key == "acc":
                result["precision"] = f"{predictor.precision} on {predictor.engine}"
                result["path"] = f"Predictor + infer_files ({predictor.describe().split(': ', 1)[-1]})"
        result["seconds"] = time.perf_counter() - started
        return result


# ---- 4. frozen_epoch ------------------------------------------------------------------------------------
class FrozenEpoch:
    """Stage 1 (backbone frozen, head trains). Baseline: images -> whole model every epoch, on a subset of K
    images, extrapolated to the split. Ours: pooled features extracted once (measured on the same K images),
    then a head epoch on in-memory features of the full split size."""

    def __init__(self, side: str, cfg: dict[str, Any]):
        self.cfg, self.side = cfg, side
        self.device = device_of(cfg)
        self.data = load_splits(cfg["data_root"])
        self.split_size = len(self.data.splits["train"])
        self.samples = pick(self.data.splits["train"], int(cfg["train_images"]))
        warm_page_cache(self.samples)
        self.batch = int(cfg["train_batch"])
        num_classes = len(self.data.classes)
        if side == "baseline":
            model, self.pre, _ = build_model(num_classes, int(cfg["image_size"]))
            self.model = model.to(self.device)
            self.model.backbone.requires_grad_(False)
            self.optimizer = torch.optim.AdamW(self.model.head.parameters(), lr=1e-3, weight_decay=1e-4)
            self.train_batches(self.loader(), limit=1)  # warm-up
        else:
            from foodvision.training.callbacks.finetune import TwoStageFinetuning

            self.module = lit_module(num_classes, self.data.classes, int(cfg["image_size"])).to(self.device)
            self.pre = self.module.preprocessing
            self.finetune = TwoStageFinetuning
            self.features: torch.Tensor | None = None
            warm = self.extract(self.samples[: int(cfg["extract_batch"])])  # warm-up, then a 2-batch epoch
            self.fit(tile(warm["pooled"], 2 * self.batch), tile(warm["labels"], 2 * self.batch), None)
        say(cfg, f"{side}: {len(self.samples)} train images of {self.split_size}, batch {self.batch}")

    # baseline ---------------------------------------------------------------------------------------------
    def loader(self) -> DataLoader:
        return plain_loader(self.samples, self.pre, self.batch, int(self.cfg["workers"]), shuffle=True)

    def train_batches(self, loader: DataLoader, limit: int | None = None) -> int:
        self.model.train()
        self.model.backbone.eval()  # frozen: BatchNorm statistics do not move
        return plain_train_steps(self.model, self.optimizer, loader, self.device, limit)

    # ours -------------------------------------------------------------------------------------------------
    def extract(self, samples: list[tuple[str, int]], depth: int | None = None) -> dict[str, Any]:
        from foodvision.inference.engine import resolve_engine
        from foodvision.hardware import autocast
        from foodvision.training.callbacks.feature_cache import extract_features, frozen_forward

        loader = ours_loader(self.cfg, samples, self.pre, int(self.cfg["extract_batch"]))
        precision = precision_for(self.device)
        engine = resolve_engine("auto", self.device, precision)
        started = time.perf_counter()  # the in-memory ONNX export is part of what extraction costs
        run = frozen_forward(self.module, engine, lambda: autocast(self.device, precision), depth)
        pooled, labels, maps = extract_features(self.module, loader, run, "bench")
        sync(self.device)
        seconds = time.perf_counter() - started
        return {
            "pooled": pooled,
            "labels": labels,
            "maps": maps,
            "seconds": seconds,
            "precision": precision,
            "engine": engine,
        }

    def run_baseline(self) -> dict[str, Any]:
        started = time.perf_counter()
        count = self.train_batches(self.loader())
        seconds = time.perf_counter() - started
        return {"images": count, "seconds": seconds, "images_per_s": count / seconds}

    def run(self) -> dict[str, Any]:
        if self.side == "baseline":
            return self.run_baseline()
        extracted = self.extract(self.samples)
        extract_rate = len(extracted["labels"]) / extracted["seconds"]
        if self.features is None:
            rows = int(self.cfg["frozen_rows"]) or self.split_size
            self.features = tile(extracted["pooled"], rows)
            self.labels = tile(extracted["labels"], rows)
        timing = self.fit(self.features, self.labels, None)
        return {
            "extract_images": len(extracted["labels"]),
            "extract_seconds": extracted["seconds"],
            "extract_images_per_s": extract_rate,
            "images": len(self.labels),
            "seconds": timing["epoch_seconds"],
            "fit_seconds": timing["fit_seconds"],
            "images_per_s": len(self.labels) / timing["epoch_seconds"],
        }

    def fit(self, inputs: torch.Tensor, labels: torch.Tensor, unfreeze: str | None) -> dict[str, float]:
        """One epoch of foodvision's training step on cached tensors (``FoodDataModule.loader``, Lightning)."""
        from foodvision.data.cached import CachedInputs
        from foodvision.models.classifier import POOLED, prefix_entry

        entry = POOLED if unfreeze is None else prefix_entry(self.depth)  # what the cached tensors are
        loader = datamodule(self.cfg, self.batch).loader(
            CachedInputs(entry, [TensorDataset(inputs, labels)]), shuffle=True, batch_size=self.batch
        )
        if unfreeze is None:  # stage 1: the backbone stays frozen
            finetune = self.finetune(stage1_epochs=None, unfreeze="none")
        else:  # stage 2 from the first epoch, BatchNorm frozen
            finetune = self.finetune(stage1_epochs=0, unfreeze=unfreeze, train_bn=False)
        return fit_one_epoch(self.module, loader, finetune, self.device)

    def finish(self) -> dict[str, Any]:
        out = {
            "split_size": self.split_size,
            "subset": len(self.samples),
            "batch": self.batch,
            "workers": int(self.cfg["workers"]),
        }
        if self.side == "ours":
            out["trainer_precision"] = trainer_precision(self.device)
            out["feature_shape"] = list(self.features.shape) if self.features is not None else None
        return out


# ---- 5. stage2_epoch ------------------------------------------------------------------------------------
class Stage2Epoch(FrozenEpoch):
    """Stage 2 (blocks.5, blocks.6, conv_head train; BatchNorm frozen). Baseline: float32 NCHW whole model
    forward + backward on images (subset K, extrapolated). Ours: the recipe's path, ``forward_suffix`` on
    cached prefix maps (depth 5) in a Lightning Trainer with bf16-mixed and channels_last."""

    def __init__(self, side: str, cfg: dict[str, Any]):
        self.cfg, self.side = cfg, side
        self.device = device_of(cfg)
        self.data = load_splits(cfg["data_root"])
        self.split_size = len(self.data.splits["train"])
        self.batch = int(cfg["train_batch"])
        num_classes = len(self.data.classes)
        if side == "baseline":
            self.samples = pick(self.data.splits["train"], int(cfg["stage2_images"]))
            warm_page_cache(self.samples)
            model, self.pre, _ = build_model(num_classes, int(cfg["image_size"]))
            self.model = model.to(self.device)
            trainable = []
            for name, parameter in self.model.backbone.named_parameters():
                is_norm = ".bn" in f".{name}"
                parameter.requires_grad_(name.startswith(STAGE2_TRAINABLE) and not is_norm)
                if parameter.requires_grad:
                    trainable.append(parameter)
            self.trainable = sum(p.numel() for p in trainable)
            params = [*self.model.head.parameters(), *trainable]
            self.optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4)
            self.train_batches(self.loader(), limit=1)  # warm-up
            say(cfg, f"baseline: {len(self.samples)} train images of {self.split_size}, batch {self.batch}")
            return
        from foodvision.training.callbacks.finetune import TwoStageFinetuning

        self.samples = pick(self.data.splits["train"], int(cfg["prefix_images"]))
        warm_page_cache(self.samples)
        self.module = lit_module(num_classes, self.data.classes, int(cfg["image_size"])).to(self.device)
        self.pre = self.module.preprocessing
        self.finetune = TwoStageFinetuning
        self.depth = self.module.net.prefix_depth(STAGE2_UNFREEZE)
        warm = self.extract(self.samples[: int(cfg["extract_batch"])], self.depth)  # warm-up
        self.fit(tile(warm["maps"], 2 * self.batch), tile(warm["labels"], 2 * self.batch), STAGE2_UNFREEZE)
        extracted = self.extract(self.samples, self.depth)
        self.extraction = {
            "images": len(extracted["labels"]),
            "seconds": extracted["seconds"],
            "images_per_s": len(extracted["labels"]) / extracted["seconds"],
            "map_shape": list(extracted["maps"].shape[1:]),
            "map_dtype": str(extracted["maps"].dtype).replace("torch.", ""),
        }
        rows = int(cfg["stage2_ours_images"]) or self.split_size
        self.maps = tile(extracted["maps"], rows)
        self.labels = tile(extracted["labels"], rows)
        say(
            cfg,
            f"ours: prefix maps {self.extraction['map_shape']} ({self.extraction['map_dtype']}), {rows} rows",
        )

    def loader(self) -> DataLoader:
        return plain_loader(self.samples, self.pre, self.batch, int(self.cfg["workers"]), shuffle=True)

    def train_batches(self, loader: DataLoader, limit: int | None = None) -> int:
        self.model.train()
        for module in self.model.backbone.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()  # frozen BatchNorm, as the recipe (train_bn=false)
        return plain_train_steps(self.model, self.optimizer, loader, self.device, limit)

    def run(self) -> dict[str, Any]:
        if self.side == "baseline":
            return self.run_baseline()
        timing = self.fit(self.maps, self.labels, STAGE2_UNFREEZE)
        rows = len(self.labels)
        return {
            "images": rows,
            "seconds": timing["epoch_seconds"],
            "fit_seconds": timing["fit_seconds"],
            "images_per_s": rows / timing["epoch_seconds"],
        }

    def finish(self) -> dict[str, Any]:
        out: dict[str, Any] = {"split_size": self.split_size, "batch": self.batch}
        if self.side == "baseline":
            out.update(subset=len(self.samples), trainable_backbone_params=self.trainable, precision="32")
        else:
            out.update(
                extraction=self.extraction,
                depth=self.depth,
                rows=len(self.labels),
                trainer_precision=trainer_precision(self.device),
                trainable_backbone_params=sum(
                    p.numel() for p in self.module.net.backbone.parameters() if p.requires_grad
                ),
            )
        return out


# ---- 6. predict -----------------------------------------------------------------------------------------
class Predict:
    """Model load time, one-photo latency and a folder's throughput: a plain script vs ``foodvision.inference.predict``."""

    def __init__(self, side: str, cfg: dict[str, Any]):
        self.cfg, self.side = cfg, side
        self.device = device_of(cfg)
        self.ckpt = cfg["ckpt"]
        data = load_splits(cfg["data_root"])
        self.photos = [p for p, _ in pick(data.splits["test"], int(cfg["latency_photos"]), seed=2)]
        folder_files = [p for p, _ in pick(data.splits["test"], int(cfg["folder_photos"]), seed=3)]
        self.folder = Path(tempfile.mkdtemp(prefix=f"bench-predict-{side}-"))
        try:
            for index, path in enumerate(folder_files):  # repeats (tiny trees) get their own names
                (self.folder / f"{index:05d}_{Path(path).name}").symlink_to(Path(path).resolve())
            warm_page_cache([(p, 0) for p in self.photos + folder_files])
            self.load()  # warm-up: first-time imports and allocations are not model loading
            self.latency(self.photos[:1])
        except BaseException:
            self.close()
            raise
        say(cfg, f"{side}: {len(self.photos)} photos for latency, folder of {len(folder_files)}")

    def load(self) -> float:
        started = time.perf_counter()
        if self.side == "baseline":
            from foodvision.data.transforms import Preprocessing
            from foodvision.models.classifier import build_classifier

            checkpoint = torch.load(self.ckpt, map_location="cpu", weights_only=True)
            meta = checkpoint["foodvision"]
            model, _, _ = build_classifier(len(meta["class_names"]), **{**meta["model"], "pretrained": False})
            state = {k[4:]: v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}
            model.load_state_dict(state)
            self.model = model.eval().to(self.device)
            self.pre = Preprocessing.from_dict(meta["preprocessing"])
            self.transform = T.Compose(
                [
                    T.Resize(self.pre.resize_size),
                    T.CenterCrop(self.pre.image_size),
                    T.ToTensor(),
                    T.Normalize(list(self.pre.mean), list(self.pre.std)),
                ]
            )
        else:
            from foodvision.inference.predictor import Predictor

            self.predictor = Predictor(self.ckpt, device=str(self.device), precision=PRECISION)
        sync(self.device)
        return time.perf_counter() - started

    def predict_plain(self, path: str) -> torch.Tensor:
        image = Image.open(path).convert("RGB")
        with torch.no_grad():
            logits = self.model(self.transform(image).unsqueeze(0).to(self.device))
        return logits.softmax(1).cpu()

    def latency(self, photos: list[str]) -> list[float]:
        from foodvision.inference.batches import infer_files

        seconds = []
        for photo in photos:
            started = time.perf_counter()
            if self.side == "baseline":
                self.predict_plain(photo)
            else:
                infer_files(self.predictor, [photo], batch_size=1, num_workers=0, progress=False)
            seconds.append(time.perf_counter() - started)
        return seconds

    def run_folder(self) -> tuple[int, float]:
        started = time.perf_counter()
        if self.side == "baseline":
            files = sorted(str(p) for p in self.folder.iterdir())
            for path in files:  # plain loop: one photo at a time
                self.predict_plain(path)
            count = len(files)
        else:
            from foodvision.inference.batches import infer_files
            from foodvision.inference.predict import collect_inputs, top_k_rows

            found = collect_inputs([str(self.folder)])
            batch, workers = int(self.cfg["predict_batch"]) or None, int(self.cfg["predict_workers"])
            result = infer_files(
                self.predictor, found.files, batch_size=batch, num_workers=workers, progress=False
            )
            top_k_rows(found.files, result.indices, result.probabilities, self.predictor.class_names, 3)
            count = len(result.indices)
        return count, time.perf_counter() - started

    def run(self) -> dict[str, Any]:
        load_seconds = self.load()
        latencies = self.latency(self.photos)
        count, seconds = self.run_folder()
        return {
            "load_seconds": load_seconds,
            "latency_seconds": statistics.median(latencies),
            "latencies": latencies,
            "images": count,
            "seconds": seconds,
            "images_per_s": count / seconds,
        }

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


# ---- 7. memory ------------------------------------------------------------------------------------------
def run_measured(
    command: list[str], env: dict[str, str] | None = None, log: Path | None = None
) -> dict[str, Any]:
    """Run ``command`` in a process of its own; its peak RSS (``ru_maxrss`` from ``wait4``: the process and the
    workers it waited for, as ``/usr/bin/time -f %M`` reports it), wall time and exit code."""
    started = time.perf_counter()
    with open(log or os.devnull, "w") as sink:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return {
        "peak_rss_mb": usage.ru_maxrss / 1024.0,
        "seconds": time.perf_counter() - started,
        "returncode": process.returncode,
    }


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

    def listing(self, name: str, samples: list[tuple[str, int]]) -> Path:
        path = self.scratch / f"{name}.tsv"
        path.write_text("".join(f"{p}\t{label}\n" for p, label in samples))
        return path

    def folder(self, name: str, samples: list[tuple[str, int]], classes: bool = False) -> Path:
        """Symlinks to ``samples`` (repeats get their own names); ``classes``: class folders."""
        root = self.scratch / name
        for index, (path, label) in enumerate(samples):
            where = root / self.data.classes[label] if classes else root
            where.mkdir(parents=True, exist_ok=True)
            (where / f"{index:05d}_{Path(path).name}").symlink_to(Path(path).resolve())
        return root

    def big_tree(self, count: int) -> tuple[Path, list[tuple[str, int]]]:
        """An image-folder tree whose test split holds ``count`` photos (every photo of the data, repeated
        when there are fewer); train/validation: a few per class."""
        every = [s for split in ("train", "val", "test") for s in self.data.splits[split]]
        samples = pick(every, count, seed=4)
        root = self.scratch / "big"
        self.folder("big/test", samples, classes=True)
        for split in ("train", "validation"):
            few = [next(s for s in every if s[1] == label) for label in range(len(self.data.classes))]
            self.folder(f"big/{split}", few * 2, classes=True)
        return root, samples

    def measure(self, key: str, side: str, photos: int, command: list[str], env: dict | None = None) -> dict:
        say(self.cfg, f"{key} ({side}, {photos} photos): {' '.join(command[1:])[:160]}")
        result = run_measured(command, env, self.scratch / f"{key}-{side}.log")
        if result["returncode"] != 0:
            tail = (self.scratch / f"{key}-{side}.log").read_text()[-2000:]
            raise RuntimeError(f"{key} ({side}) exited with {result['returncode']}:\n{tail}")
        row = {"command": key, "side": side, "photos": photos, **result}
        say(self.cfg, f"  {row['peak_rss_mb']:.0f} MB peak RSS, {row['seconds']:.0f} s")
        self.results.append(row)
        return row

    def run(self) -> dict[str, Any]:
        python, cfg = sys.executable, self.cfg
        env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
        env.update(FOODVISION_CACHE=str(self.scratch / "cache"), HF_HUB_OFFLINE="1")  # a cold cache
        splits = self.data.splits
        train_photos = sum(len(splits[s]) for s in ("train", "val", "test"))
        plain = [python, str(ROOT / "bench" / "plain_memory.py")]
        ckpt = str(cfg["ckpt"]) if cfg.get("ckpt") else None
        if not cfg.get("memory_skip_train"):
            logs = self.scratch / "logs"
            args = [*cfg.get("memory_train_args", []), *self.data_args(), f"paths.log_dir={logs}"]
            self.measure("train.py", "foodvision", train_photos, [python, str(ROOT / "train.py"), *args], env)
            found = sorted(logs.glob("runs/*/checkpoints/last.ckpt"))
            ckpt = ckpt or (str(found[-1]) if found else None)
        if not ckpt:
            raise RuntimeError("no checkpoint: pass --ckpt or let the section run train.py")
        steps = int(cfg["memory_train_steps"])
        train_list = self.listing("train", pick(splits["train"], steps * 64, seed=5))
        self.measure("train.py", "plain", steps * 64, [*plain, "train", ckpt, str(train_list), str(steps)])

        test = splits["test"]
        common = ["progress=false", f"ckpt_path={ckpt}", *cfg.get("memory_tool_args", [])]
        self.measure(
            "eval.py",
            "foodvision",
            len(test),
            [
                python,
                str(ROOT / "eval.py"),
                *common,
                *self.data_args(),
                f"output_dir={self.scratch / 'eval'}",
            ],
            env,
        )
        self.measure("eval.py", "plain", len(test), [*plain, "eval", ckpt, str(self.listing("test", test))])
        folder_samples = pick(test, int(cfg["folder_photos"]), seed=3)
        folder = self.folder("folder", folder_samples)
        predict = [python, str(ROOT / "predict.py"), *common]
        self.measure(
            "predict.py",
            "foodvision",
            len(folder_samples),
            [*predict, f"inputs=[{folder}]", f"output={self.scratch / 'folder.csv'}"],
            env,
        )
        self.measure(
            "predict.py",
            "plain",
            len(folder_samples),
            [*plain, "predict", ckpt, str(self.listing("folder", folder_samples))],
        )
        big = int(cfg["memory_big_photos"])
        if big:
            root, samples = self.big_tree(big)
            self.measure(
                "eval.py",
                "foodvision",
                big,
                [
                    python,
                    str(ROOT / "eval.py"),
                    *common,
                    *self.data_args(root),
                    f"output_dir={self.scratch / 'ebig'}",
                ],
                env,
            )
            self.measure(
                "predict.py",
                "foodvision",
                big,
                [*predict, f"inputs=[{root / 'test'}]", f"output={self.scratch / 'big.csv'}"],
                env,
            )
        return {"measurements": self.results, "checkpoint": ckpt}

    def finish(self) -> dict[str, Any]:
        return {"train_args": self.cfg.get("memory_train_args", []), "threads": self.cfg["threads"]}


# ---- 7b. scale ------------------------------------------------------------------------------------------
def _process_tree(root: int) -> list[int]:
    """``root`` and every process below it (DataLoader workers, ONNX export helpers)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as handle:
                parent = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _anon_and_pss_kb(pids: list[int]) -> tuple[int, int]:
    """Pss_Anon and Pss summed over ``pids`` (PSS: pages shared copy-on-write with forked workers count
    once; Pss_Anon leaves out file-backed pages, e.g. a memory-mapped cache, which the kernel can drop)."""
    anon = pss = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as handle:
                for line in handle:
                    if line.startswith("Pss_Anon:"):
                        anon += int(line.split()[1])
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1])
        except OSError:
            continue
    return anon, pss


def run_sampled(
    command: list[str], env: dict[str, str] | None, log: Path, every: float = 0.5
) -> dict[str, Any]:
    """:func:`run_measured` plus the peak of anonymous memory (and of PSS) summed over the process and its
    descendants, sampled every ``every`` seconds from ``/proc/PID/smaps_rollup``."""
    started = time.perf_counter()
    peak_anon = peak_pss = 0
    with open(log, "w") as sink:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            anon, pss = _anon_and_pss_kb(_process_tree(process.pid))
            peak_anon, peak_pss = max(peak_anon, anon), max(peak_pss, pss)
            time.sleep(every)
    process.returncode = os.waitstatus_to_exitcode(status)
    return {
        "peak_anon_mb": peak_anon / 1024.0,
        "peak_pss_mb": peak_pss / 1024.0,
        "peak_rss_mb": usage.ru_maxrss / 1024.0,
        "seconds": time.perf_counter() - started,
        "returncode": process.returncode,
    }


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
    import multiprocessing

    lines = {split: (source / "meta" / f"{split}.txt").read_text().split() for split in ("train", "test")}
    (target / "meta").mkdir(parents=True, exist_ok=True)
    shutil.copy2(source / "meta" / "classes.txt", target / "meta" / "classes.txt")
    jobs, train = [], []
    for number, item in enumerate(lines["train"]):
        klass, name = item.split("/")
        folder = target / "images" / klass
        folder.mkdir(parents=True, exist_ok=True)
        original = folder / f"{name}.jpg"
        if not original.exists():
            original.symlink_to(source / "images" / f"{item}.jpg")
        train.append(item)
        for copy in range(copies):
            jobs.append(
                (
                    str(source / "images" / f"{item}.jpg"),
                    str(folder / f"{name}_v{copy}.jpg"),
                    number * 16 + copy,
                )
            )
            train.append(f"{item}_v{copy}")
    for item in lines["test"]:
        link = target / "images" / f"{item}.jpg"
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(source / "images" / f"{item}.jpg")
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
        if photos <= available:
            root, listed = self.source, self.source_train
        else:
            copies = math.ceil(photos / available) - 1
            target = Path(self.cfg["scale_dir"]) / f"variants-{copies}"
            say(self.cfg, f"variant tree with {copies} variant(s) per photo: {target}")
            root = make_variant_tree(self.source, target, copies, max(1, self.cfg["threads"]))
            listed = self.source_train * (copies + 1)
        per_class = listed // self.classes
        train_cap = min(int(per_class * 0.9), math.ceil(photos / self.classes))
        val_cap = max(2, math.ceil(train_cap / 9))
        caps = [f"++data.max_per_class.train={train_cap}", f"++data.max_per_class.val={val_cap}"]
        return root, caps, train_cap * self.classes

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        code = Path(cfg.get("scale_code") or ROOT)
        env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
        env.update(
            HF_HUB_OFFLINE="1",
            PYTHONPATH=os.pathsep.join([str(code / "src"), str(BENCH_DIR)]),
            TQDM_MININTERVAL="30",
        )
        results = []
        for photos in [int(p) for p in str(cfg["scale_sizes"]).split(",") if p.strip()]:
            root, caps, train_photos = self.tree_for(photos)
            run = self.scratch / f"run-{photos}"
            times = self.scratch / f"times-{photos}.json"
            env["FOODVISION_CACHE"] = str(self.scratch / f"cache-{photos}")  # a cold cache
            command = [
                sys.executable, str(code / "train.py"), f"data.root={root}", *caps,
                f"data.image_size={cfg['scale_image_size']}", *cfg.get("scale_train_args", []),
                f"paths.log_dir={run}", "+callbacks.scale_timer._target_=scale_timer.EpochTimes",
                f"+callbacks.scale_timer.out={times}",
            ]  # fmt: skip
            say(cfg, f"train.py, {train_photos:,} training photos: {' '.join(command[2:])[:200]}")
            result = run_sampled(command, env, self.scratch / f"train-{photos}.log")
            if result["returncode"] != 0:
                tail = (self.scratch / f"train-{photos}.log").read_text()[-3000:]
                raise RuntimeError(f"train.py at {photos} photos exited with {result['returncode']}:\n{tail}")
            stamps = json.loads(times.read_text())
            epochs = stamps["epochs"]
            first, last = epochs["0"], epochs[str(max(int(k) for k in epochs))]
            stage2_seconds = last["train_end"] - last["start"]
            trained = int(last.get("samples") or train_photos)  # the stage-2 epoch's photos
            extraction = first["start"] - stamps["setup"]
            row = {
                "photos": photos,
                "train_photos": train_photos,
                "root": str(root),
                **result,
                "extraction_seconds": extraction,
                "extraction_s_per_photo": extraction / train_photos,
                "stage2_epoch_seconds": stage2_seconds,
                "stage2_photos": trained,
                "stage2_s_per_photo": stage2_seconds / trained,
                "code": str(code),
            }
            say(
                cfg,
                f"  anon {row['peak_anon_mb']:,.0f} MB, RSS {row['peak_rss_mb']:,.0f} MB, extraction "
                f"{1e3 * row['extraction_s_per_photo']:.2f} ms/photo, stage 2 {1e3 * row['stage2_s_per_photo']:.2f} "
                f"ms/photo, {row['seconds']:.0f} s",
            )
            results.append(row)
            shutil.rmtree(self.scratch / f"cache-{photos}", ignore_errors=True)
        return {"measurements": results}

    def finish(self) -> dict[str, Any]:
        return {"threads": self.cfg["threads"]}


# ---- 8. recipe ------------------------------------------------------------------------------------------
DEFAULT_MODEL_PRESET = "mobilenetv2_ft"
# What makes a run the default recipe: everything that changes its training (not paths, data.root, precision
# as resolved, ...). Compared with conf/ as it is now, since presets change.
RECIPE_KEYS = (
    "model",
    "callbacks.finetune",
    "callbacks.feature_cache.enabled",
    "optimizer",
    "scheduler",
    "label_smoothing",
    "augment",
    "channels_last",
    "seed",
    "trainer.max_epochs",
    "trainer.fast_dev_run",
    "trainer.limit_train_batches",
    "trainer.limit_val_batches",
    "data.image_size",
    "data.batch_size",
    "data.balance",
    "data.classes",
    "data.max_per_class",
)


def lookup(config: dict[str, Any], dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
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


def recipe_value(config: dict[str, Any], key: str) -> Any:
    value = lookup(config, key)
    if key == "scheduler" and isinstance(value, dict) and value.get("name") in (None, "none"):
        return {"name": "none"}  # no scheduler: its other settings (min_lr, ...) do nothing
    return value


def recipe_differences(config: dict[str, Any], default: dict[str, Any]) -> list[str]:
    return [key for key in RECIPE_KEYS if recipe_value(config, key) != recipe_value(default, key)]


def run_summary(run_dir: Path, default: dict[str, Any]) -> dict[str, Any] | None:
    """Model preset, overrides, difference from the default recipe and metrics of a finished run dir (None when
    it has no metrics.json)."""
    import json

    import yaml

    metrics_path = run_dir / "metrics.json"
    if not metrics_path.is_file():
        return None
    metrics = json.loads(metrics_path.read_text())
    hydra_file, overrides_file = run_dir / ".hydra" / "hydra.yaml", run_dir / ".hydra" / "overrides.yaml"
    preset = None
    if hydra_file.is_file():
        hydra_cfg = yaml.safe_load(hydra_file.read_text()) or {}
        preset = lookup(hydra_cfg, "hydra.runtime.choices.model")
    overrides = (yaml.safe_load(overrides_file.read_text()) or []) if overrides_file.is_file() else []
    config_file = run_dir / "config.yaml"
    config = (yaml.safe_load(config_file.read_text()) if config_file.is_file() else None) or {}
    differences = recipe_differences(config, default)
    return {
        "run_dir": str(run_dir),
        "model_preset": preset,
        "overrides": overrides,
        "differs_from_default_in": differences,
        "default_recipe": not differences,
        "finished": metrics_path.stat().st_mtime,
        "wall_seconds": metrics.get("wall_seconds"),
        "train_seconds": metrics.get("train_seconds"),
        "test_acc": metrics.get("test/acc"),
        "val_acc": metrics.get("val/acc"),
        "image_size": lookup(config, "data.image_size"),
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
    full = [
        r
        for r in runs
        if r["image_size"] == lookup(default, "data.image_size")
        and not any(str(o).startswith("debug=") for o in r["overrides"])
    ]
    chosen = max(full or runs, key=lambda r: r["finished"])
    kind = "full-size run without debug overrides" if full else "run"
    return chosen, (
        f"no run of the default recipe; newest {DEFAULT_MODEL_PRESET} {kind}, which differs in "
        f"{', '.join(chosen['differs_from_default_in'])} (overrides {chosen['overrides']})"
    )


class Recipe:
    """The whole default recipe: read from the newest finished run, or run ``train.py`` (``--run-recipe``)."""

    def __init__(self, side: str, cfg: dict[str, Any]):
        self.cfg = cfg
        self.children_rss_mb: float | None = None

    def run(self) -> dict[str, Any]:
        log_dir = Path(self.cfg["log_dir"])
        default = default_recipe_config()
        if not self.cfg.get("run_recipe"):
            run, note = newest_default_run(log_dir, default)
            return {"source": "existing run", "run": run, "note": note}
        import resource

        command = [sys.executable, str(ROOT / "train.py"), *self.cfg.get("recipe_args", [])]
        say(self.cfg, "running " + " ".join(command))
        started_at = time.time()
        started = time.perf_counter()
        env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}  # train.py keeps its progress bar
        completed = subprocess.run(command, cwd=ROOT, env=env, check=False)
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
            note = (
                "the default recipe"
                if not differs
                else f"not the default recipe: {', '.join(differs)} differ"
            )
        return {
            "source": "ran train.py",
            "command": command,
            "returncode": completed.returncode,
            "seconds": seconds,
            "run": run,
            "note": note,
        }

    def finish(self) -> dict[str, Any]:
        return {"train_py_peak_rss_mb": self.children_rss_mb}


# ---- int8 ----------------------------------------------------------------------------------------------
class Int8:
    """ONNX Runtime on the checkpoint's float32 export (baseline) against its INT8 model (``export.py
    quantize=int8``: static, calibrated on ``int8_calibration`` train photos), both with foodvision's session
    options: throughput on the same preloaded test images, and top-1 accuracy on the test split."""

    def __init__(self, side: str, cfg: dict[str, Any]):
        import onnxruntime as ort

        from foodvision.data.datasets import ImageListDataset
        from foodvision.inference.checkpoints import load_checkpoint_model
        from foodvision.inference.engine import session_options
        from foodvision.inference.export import export_onnx
        from foodvision.inference.quantize import calibration_reader, quantize_onnx

        self.cfg, self.side = cfg, side
        ckpt = cfg.get("ckpt")
        if not ckpt:
            raise RuntimeError(f"int8 needs a checkpoint: {cfg.get('ckpt_note') or 'pass --ckpt'}")
        self.data = load_splits(cfg["data_root"])
        model, self.info, _ = load_checkpoint_model(ckpt)
        if list(self.info.class_names) != list(self.data.classes):
            raise RuntimeError("the checkpoint's classes differ from the data's")
        self.folder = Path(tempfile.mkdtemp(prefix="bench-int8-"))
        path = export_onnx(model.float().eval(), self.info, self.folder / "float32.onnx", Path(ckpt).name)
        self.calibration_seconds = None
        if side == "ours":
            started = time.perf_counter()
            train = pick(self.data.splits["train"], int(cfg["int8_calibration"]), seed=2)
            pre = self.info.preprocessing
            dataset = ImageListDataset(train, pre.eval_transform(), draft_size=pre.resize_size)
            quantized = self.folder / "int8.onnx"
            quantize_onnx(path, quantized, calibration_reader(dataset, list(range(len(train))), "images"))
            self.calibration_seconds = time.perf_counter() - started
            path = quantized
        self.path = path
        self.session = ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
        samples = pick(self.data.splits["test"], int(cfg["infer_images"]))
        images, _ = load_all(ours_loader(cfg, samples, self.info.preprocessing, 64))
        self.batch = 32
        self.batches = [b.numpy() for b in images.split(self.batch)]
        self.forward(self.batches[:1] + self.batches[-1:])  # warm-up: both batch shapes
        say(cfg, f"{side}: {path.name}, {len(images)} preloaded images, batch {self.batch}")

    def forward(self, batches: list[Any]) -> list[Any]:
        return [self.session.run(None, {"images": batch})[0] for batch in batches]

    def run(self) -> dict[str, Any]:
        count = sum(len(b) for b in self.batches)
        started = time.perf_counter()
        self.forward(self.batches)
        seconds = time.perf_counter() - started
        return {"images": count, "seconds": seconds, "images_per_s": count / seconds}

    def finish(self) -> dict[str, Any]:
        count = int(self.cfg["acc_images"]) or len(self.data.splits["test"])
        samples = pick(self.data.splits["test"], min(count, len(self.data.splits["test"])), seed=1)
        predicted, labels = [], []
        for images, targets in ours_loader(self.cfg, samples, self.info.preprocessing, 64):
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


SECTIONS = {
    "matmul_peak": MatmulPeak,
    "data_loading": DataLoading,
    "inference": Inference,
    "frozen_epoch": FrozenEpoch,
    "stage2_epoch": Stage2Epoch,
    "predict": Predict,
    "memory": Memory,
    "scale": Scale,
    "recipe": Recipe,
    "int8": Int8,
}


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

"""Cached backbone outputs: the frozen part of the backbone runs once per split, not once per epoch.

While the backbone is frozen and the training images are not augmented, every epoch would compute
the same pooled features again. This callback computes them once (progress bar), stores them on disk
under a key that covers everything they depend on, and hands them to the datamodule, so stage 1
trains the head on in-memory tensors. Stage 2 leaves the stem and lower blocks frozen, so their output
(feature maps) is cached in the same pass and stage 2 trains only the unfrozen top on it; where that is
not possible (augmentation on, a backbone that cannot be cut), stage 2 goes back to images. A second
run, and every trial of a sweep, finds the features on disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

from foodvision.callbacks.finetune import TwoStageFinetuning
from foodvision.data.cached import CachedInputs
from foodvision.data.verify import image_list_digest
from foodvision.engine import ChunkedForward, onnxruntime_or_none, resolve_engine, torch_max_batch
from foodvision.models.classifier import POOLED, prefix_entry

log = logging.getLogger(__name__)

# 2: prefix maps may be stored in float16 (see extract_features' maps_dtype); 3: the train split's are (files
# of earlier formats are rebuilt).
CACHE_FORMAT = 3
# Storage dtype of the cached prefix maps of the train split: half the bytes of float32 (3,380 MobileNetV2
# maps at 256 px: 159 MB instead of 317 MB), served as float32 batch by batch (CachedInputs.collate).
# Rounding to float16 (11 significant bits, relative error <= 2**-11) is far below what training
# resolves; val keeps float32, so that validation on cached maps measures exactly what eval.py measures.
COMPACT_MAPS_DTYPE = torch.float16
FLOAT16_MAX = float(torch.finfo(torch.float16).max)


def state_digest(module: torch.nn.Module, keep: Callable[[str], bool] = lambda name: True) -> str:
    """sha256 of a module's parameters and buffers (names, shapes, bytes), optionally of some names only."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        if not keep(name):
            continue
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def in_prefix(depth: int) -> Callable[[str], bool]:
    """Parameter names of the stem and the first ``depth`` blocks (see ``ImageClassifier.forward_prefix``)."""
    blocks = tuple(f"blocks.{i}." for i in range(depth))
    return lambda name: name.startswith(("conv_stem.", "bn1.", *blocks))


def feature_cache_key(
    model_name: str,
    weights_digest: str,
    preprocessing: dict[str, Any],
    paths: list[str],
    precision: str,
    output: str,
) -> str:
    """Everything the cached features depend on; nothing else (batch size, lr, epochs...) is in it."""
    payload = {
        "format": CACHE_FORMAT,
        "model": model_name,
        "output": output,
        "weights": weights_digest,
        "preprocessing": preprocessing,
        "precision": precision,
        "images": image_list_digest(paths),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def frozen_forward(
    pl_module: L.LightningModule,
    engine: str,
    forward_context: Any,
    depth: int | None,
    requested: str = "onnxruntime",
    precision: str = "32",
) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]:
    """images -> (pooled features, prefix maps or None) of the frozen backbone in eval mode, run by
    ``engine`` (``torch`` under the trainer's precision, or ``onnxruntime`` in float32; where ONNX Runtime
    cannot run the model and ``requested`` was ``auto``, PyTorch)."""
    net = pl_module.net
    channels_last = pl_module.hparams.get("channels_last", False)
    runner = None
    if engine == "onnxruntime":
        size = pl_module.preprocessing.image_size
        outputs = ["pooled"] + (["prefix"] if depth is not None else [])
        runner = onnxruntime_or_none(
            PooledAndPrefix(net, depth), torch.zeros(1, 3, size, size), outputs, requested
        )
    if runner is not None:

        def run_onnx(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            outputs = runner(images)
            return (outputs[0], outputs[1]) if depth is not None else (outputs, None)  # type: ignore[return-value]

        return run_onnx

    def run_torch(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        images = images.to(pl_module.device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with forward_context():
            if depth is None:
                return net.backbone(images).float().cpu(), None
            prefix = net.forward_prefix(images, depth)
            return net.forward_suffix(prefix, depth).float().cpu(), prefix.cpu().contiguous()

    if pl_module.device.type != "cpu":
        return run_torch
    # On a CPU, the loader's batches run in chunks that fit the inference memory budget (as ONNX Runtime's).
    size = pl_module.preprocessing.image_size
    chunked = ChunkedForward(
        lambda images: tuple(t for t in run_torch(images) if t is not None),
        torch_max_batch(PooledAndPrefix(net, depth), size, precision=precision),
    )

    def run_torch_chunked(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        outputs = chunked(images)
        return (outputs[0], outputs[1]) if depth is not None else (outputs[0], None)

    return run_torch_chunked


class PooledAndPrefix(torch.nn.Module):
    """The backbone as one exportable graph with its pooled output and (with ``depth``) the prefix maps."""

    def __init__(self, net: torch.nn.Module, depth: int | None):
        super().__init__()
        self.net, self.depth = net, depth

    def forward(self, images: torch.Tensor) -> Any:
        if self.depth is None:
            return self.net.backbone(images)
        prefix = self.net.forward_prefix(images, self.depth)
        return self.net.forward_suffix(prefix, self.depth), prefix


@torch.inference_mode()
def extract_features(
    pl_module: L.LightningModule,
    loader: torch.utils.data.DataLoader,
    run: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]],
    desc: str,
    flip: bool = False,
    maps_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Pooled backbone features, labels and (when ``run`` gives them) the frozen prefix's feature maps of
    every readable image of ``loader``, in order, from one pass of the backbone in eval mode (of the
    mirrored images with ``flip``).

    Rows are written into tensors sized for the whole dataset when the first batch arrives, not gathered
    and concatenated: the prefix maps are large (3,380 x 96x16x16 floats: 330 MB), and a list plus its
    concatenation would hold them twice. ``maps_dtype``: how float32 prefix maps are stored (``None``: as
    ``run`` gives them, e.g. bf16 under bf16 autocast); :data:`COMPACT_MAPS_DTYPE` halves their memory (the
    consumer upcasts each batch: :meth:`foodvision.data.cached.CachedInputs.collate`); a map beyond
    float16's range keeps the whole split in float32."""
    backbone = pl_module.net.backbone
    was_training = backbone.training
    backbone.eval()
    rows = len(loader.dataset)  # an upper bound: unreadable images may be skipped
    pooled = labels = maps = None
    filled = 0
    try:
        for batch in tqdm(loader, desc=desc, unit="batch", dynamic_ncols=True):
            if batch is None:
                continue
            images, targets = batch
            if flip:
                images = images.flip(-1)
            features, prefix = run(images)
            del images
            if pooled is None:
                pooled = features.new_empty((rows, *features.shape[1:]), dtype=torch.float32)
                labels = targets.new_empty((rows, *targets.shape[1:]), device="cpu")
                if prefix is not None:
                    dtype = (
                        maps_dtype
                        if maps_dtype is not None and prefix.dtype == torch.float32
                        else prefix.dtype
                    )
                    maps = prefix.new_empty((rows, *prefix.shape[1:]), device="cpu", dtype=dtype)
            count = len(features)
            pooled[filled : filled + count] = features.float()
            labels[filled : filled + count] = targets.cpu()
            if maps is not None and prefix is not None:
                if maps.dtype == torch.float16 and float(prefix.abs().max()) > FLOAT16_MAX:
                    log.warning("%s: feature maps beyond float16's range: stored in float32", desc)
                    wide = maps.new_empty(maps.shape, dtype=torch.float32)
                    wide[:filled] = maps[:filled]
                    maps = wide
                maps[filled : filled + count] = prefix
            filled += count
    finally:
        backbone.train(was_training)
    if pooled is None:
        raise RuntimeError(f"{desc}: no readable images")
    if filled < rows:  # a copy, so that the saved tensors do not carry the unused rows
        pooled, labels = pooled[:filled].clone(), labels[:filled].clone()
        maps = maps[:filled].clone() if maps is not None else None
    return pooled, labels, maps


class FeatureCache(Callback):
    """Frozen parts of the backbone run once per split, not once per epoch; see the module docstring.

    Stage 1 trains the head on cached pooled features. When stage 2 unfreezes from block ``blocks.K`` of a
    backbone that can be cut there and the training images are not augmented, the output of the frozen
    stem and first K blocks is cached too (in the same pass), and stage 2 trains the top blocks and head
    on those feature maps. ``enabled``: ``auto`` caches when the datamodule does no augmentation;
    ``true`` caches stage 1 even then (augmentation applies from stage 2 on, on images); ``false`` never
    caches. ``prefix=false`` keeps stage 2 on images. ``flip`` (exact horizontal-flip augmentation) caches
    the train split a second time from mirrored photos; ``views`` caches it that many more times, each
    photo under its own fixed random augmentation per view (``view_augment``, a random resized crop and
    flip by default, seeded); each epoch draws one of the cached views per sample. ``engine``: what runs
    the frozen backbone (``auto``: ONNX Runtime for float32 on a CPU, several times faster than eager).
    """

    def __init__(
        self,
        enabled: str | bool = "auto",
        cache_dir: str = "data/cache/features",
        prefix: bool = True,
        flip: bool = False,
        views: int = 0,
        view_augment: dict[str, Any] | None = None,
        engine: str = "auto",
        seed: int = 0,
    ):
        super().__init__()
        self.enabled = enabled
        self.flip = flip
        self.views = int(views)
        self.view_augment = dict(view_augment or {"name": "crop", "min_scale": 0.35})
        self.engine = engine
        self.seed = int(seed)
        self._runner: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]] | None = None
        self.cache_dir = Path(cache_dir)
        self.prefix = prefix
        self.mode: str | None = None  # "pooled" or "prefix" while the datamodule serves cached tensors
        self.depth: int | None = None
        self.hits: list[str] = []
        self.builds: list[str] = []
        self._prefix_maps: dict[str, dict[str, TensorDataset]] = {}  # split -> view -> cached maps
        self._reload_setting: int | None = None  # the trainer's own, while a loader reload is pending

    def _finetune(self, trainer: L.Trainer) -> TwoStageFinetuning | None:
        return next((c for c in trainer.callbacks if isinstance(c, TwoStageFinetuning)), None)

    def _prefix_depth(self, trainer: L.Trainer, pl_module: L.LightningModule) -> int | None:
        finetune = self._finetune(trainer)
        if (
            not self.prefix
            or finetune is None
            or not finetune.unfrozen_groups
            or trainer.datamodule.augmented
        ):
            return None
        return pl_module.net.prefix_depth(finetune.unfrozen_groups[0])

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        finetune = self._finetune(trainer)
        datamodule = trainer.datamodule
        if self.enabled in (False, "false") or finetune is None or datamodule is None:
            return
        self.depth = self._prefix_depth(trainer, pl_module)
        stage = finetune.stage_at(finetune.first_epoch(trainer))
        if stage == 1:
            if self.enabled == "auto" and datamodule.augmented:
                log.info(
                    "feature cache off: training images are augmented (callbacks.feature_cache.enabled=true forces it)"
                )
                return
            for split in ("train", "val"):
                datamodule.use_cached(split, self.load_or_build(trainer, pl_module, split, POOLED))
            self.mode = "pooled"
        elif self.depth is not None:  # resumed in stage 2
            self._use_prefix_maps(trainer, pl_module)
        self._runner = None  # the exported backbone snapshot is not needed after the caches are built

    def _use_prefix_maps(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert self.depth is not None
        entry = prefix_entry(self.depth)
        for split in ("train", "val"):
            maps = self._prefix_maps.pop(split, None)  # stored while the pooled features were built
            trainer.datamodule.use_cached(
                split,
                self._assemble(split, entry, maps)
                if maps is not None and set(maps) == set(self._view_names(split, pl_module))
                else self.load_or_build(trainer, pl_module, split, entry),
            )
        self.mode = "prefix"

    def _view_names(self, split: str, pl_module: L.LightningModule) -> list[str]:
        """``plain`` (the photos); for train also ``flip`` (with ``flip``) and ``augmentK`` (``views``); for
        val ``flip`` too when the model averages each photo with its mirror image (test-time flip)."""
        if split == "train":
            return ["plain"] + (["flip"] if self.flip else []) + [f"augment{k}" for k in range(self.views)]
        return ["plain"] + (["flip"] if getattr(pl_module.net, "test_time_flip", False) else [])

    def _assemble(self, split: str, entry: str, sets: dict[str, TensorDataset]) -> CachedInputs:
        if split == "train":  # each epoch draws one view per sample
            return CachedInputs(entry, [sets[v] for v in sets])
        return CachedInputs(entry, [sets["plain"]], mirrored=sets.get("flip"))

    def load_or_build(
        self, trainer: L.Trainer, pl_module: L.LightningModule, split: str, output: str
    ) -> CachedInputs:
        """``output`` is ``pooled`` or ``prefixK`` (the model entry point the cached tensors feed). The
        train split is cached once per view (see :meth:`_view_names`) and each epoch draws one view per
        sample; val gets its mirrored view for test-time flip."""
        views = self._view_names(split, pl_module)
        sets = {view: self._load_or_build_view(trainer, pl_module, split, output, view) for view in views}
        return self._assemble(split, output, sets)

    def _load_or_build_view(
        self, trainer: L.Trainer, pl_module: L.LightningModule, split: str, output: str, view: str
    ) -> TensorDataset:
        """One view; building the pooled features also stores the prefix maps (same pass) when stage 2
        will use them."""
        datamodule = trainer.datamodule
        paths = [path for path, _ in datamodule.discover().splits[split]]
        name = pl_module.hparams.model.get("name", "scratch")
        engine = resolve_engine(self.engine, pl_module.device, str(trainer.precision))
        pre, precision = pl_module.preprocessing.to_dict(), f"{engine}:{trainer.precision}"
        backbone = pl_module.net.backbone
        augment = view.startswith("augment")
        view_spec = f"{view}:{json.dumps(self.view_augment, sort_keys=True)}:{self.seed}" if augment else view

        def cache_path(kind: str, digest: str) -> Path:
            key = feature_cache_key(name, digest, pre, paths, precision, f"{kind}:{view_spec}")
            return self.cache_dir / f"{split}-{kind}-{view}-{key}.pt"

        pooled_path = cache_path("pooled", state_digest(backbone))
        prefix_path = None
        if self.depth is not None:
            prefix_path = cache_path(f"prefix{self.depth}", state_digest(backbone, in_prefix(self.depth)))
        wanted = pooled_path if output == POOLED else prefix_path
        assert wanted is not None
        built: dict[str, TensorDataset] = {}  # this process's fresh tensors: not loaded a second time
        if trainer.is_global_zero and not wanted.is_file():
            dataset = (
                datamodule.image_dataset(
                    split, True, self.view_augment, item_seed=self.seed * 10_007 + int(view[len("augment") :])
                )
                if augment
                else datamodule.image_dataset(split)
            )
            loader = datamodule.loader(dataset, shuffle=False, batch_size=datamodule.eval_batch_size)
            if self._runner is None:
                self._runner = frozen_forward(
                    pl_module,
                    engine,
                    trainer.precision_plugin.forward_context,
                    self.depth,
                    self.engine,
                    str(trainer.precision),
                )
            features, labels, maps = extract_features(
                pl_module,
                loader,
                self._runner,
                f"caching {split} features" + ("" if view == "plain" else f" ({view})"),
                flip=view == "flip",
                # train maps in float16 (half the memory of stage 2's largest tensor); val stays float32 so
                # cached validation equals eval.py on images to 1e-4
                maps_dtype=COMPACT_MAPS_DTYPE if split == "train" else None,
            )
            if output == POOLED:
                self._save(pooled_path, {"features": features, "labels": labels})
                built["pooled"] = TensorDataset(features, labels)
            if maps is not None and prefix_path is not None:
                self._save(prefix_path, {"features": maps, "labels": labels})
                built["prefix"] = TensorDataset(maps, labels)
            del features, maps
        else:
            self.hits.append(str(wanted))
            log.info("feature cache hit: %s", wanted)
        trainer.strategy.barrier("feature-cache")
        if output == POOLED and prefix_path is not None and prefix_path.is_file():
            maps = built.pop("prefix", None)
            self._prefix_maps.setdefault(split, {})[view] = maps if maps is not None else _load(prefix_path)
        fresh = built.get("pooled" if output == POOLED else "prefix")
        return fresh if fresh is not None else _load(wanted)

    def _save(self, path: Path, tensors: dict[str, torch.Tensor]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        torch.save(tensors, temporary)
        temporary.replace(path)  # atomic: an interrupted build never leaves a half-written cache
        self.builds.append(str(path))
        log.info("cached %d feature rows in %s", len(tensors["labels"]), path)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """At the stage switch (decided by the finetune callback at validation end): prefix maps or images."""
        finetune = self._finetune(trainer)
        if self.mode != "pooled" or finetune is None or finetune.stage_at(trainer.current_epoch + 1) == 1:
            return
        for split in ("train", "val"):
            trainer.datamodule.use_cached(split, None)
        self.mode = None
        if self.depth is not None:
            self._use_prefix_maps(trainer, pl_module)
            log.info("stage 2 next: training continues on cached blocks.0-%d feature maps", self.depth - 1)
        else:
            log.info("stage 2 next: training continues on images")
        # Lightning rebuilds loaders only every `reload_dataloaders_every_n_epochs`; the switch happens once,
        # at an epoch known at run time: reload at the next epoch, then restore the trainer's own setting.
        self._reload_setting = trainer.reload_dataloaders_every_n_epochs
        trainer.reload_dataloaders_every_n_epochs = 1

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._reload_setting is not None and not trainer.sanity_checking:  # both loaders were rebuilt
            trainer.reload_dataloaders_every_n_epochs = self._reload_setting
            self._reload_setting = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Testing and prediction run on images again."""
        if trainer.datamodule is not None:
            for split in ("train", "val"):
                trainer.datamodule.use_cached(split, None)
        self._prefix_maps.clear()
        self.mode = None


def _load(path: Path) -> TensorDataset:
    stored = torch.load(path, map_location="cpu", weights_only=True)
    return TensorDataset(stored["features"], stored["labels"])

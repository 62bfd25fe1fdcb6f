"""Cached backbone outputs: the frozen part of the backbone runs once per split, not once per epoch.

While the backbone is frozen and the training images are not augmented, every epoch would compute
the same pooled features again. This callback computes them once (progress bar), stores them on disk
under a key that covers everything they depend on, and hands them to the datamodule, so stage 1
trains the head on them. Stage 2 leaves the stem and lower blocks frozen, so their output
(feature maps) is cached in the same pass and stage 2 trains only the unfrozen top on it; where that is
not possible (augmentation on, a backbone that cannot be cut), stage 2 goes back to images. A second
run, and every trial of a sweep, finds the features on disk.

The features are memory-mapped stores (:mod:`foodvision.data.store`): rows are written as extraction goes
and training reads each batch's rows from the files, so neither holds a split in memory (Food-101's 68k
training photos at 256 px: 3.3 GB of maps that the kernel pages in and out as needed).

Extraction reads the photos as eval does (:mod:`foodvision.inference.batches`): on CUDA, and on a CPU where
training takes the tensor data path (``data.pipeline=tensor``), loader workers only read the files' bytes
and each batch is decoded and transformed on the backbone's device (:func:`batched_extraction`); elsewhere
workers decode with PIL. The cache key does not say which path built an entry: on a CPU the pixels are the
PIL path's (200 food101-mini photos: equal to float rounding; tiny upscaled ones: a few pixels one grey
level apart), and nvJPEG's differ by decoder rounding, a device's numerics as its convolutions' are, which
the key leaves out too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from tqdm.auto import tqdm

from foodvision.atomic import fallback_cache_dir, writable_cache_dir
from foodvision.data.batched import BatchedTransform
from foodvision.data.cached import CachedInputs, StoredView
from foodvision.data.datasets import EncodedFileDataset, RawBatch, record_bad_image, unreadable
from foodvision.data.store import Store, StoreError, StoreWriter, mixed_row_order, open_store, remove_store
from foodvision.data.verify import image_list_digest
from foodvision.inference.batches import decode_eval_batch
from foodvision.inference.engine import ChunkedForward, onnxruntime_or_none, resolve_engine, torch_max_batch
from foodvision.models.classifier import POOLED, prefix_entry
from foodvision.training.callbacks.finetune import TwoStageFinetuning

log = logging.getLogger(__name__)

# 2: prefix maps may be stored in float16 (see extract_features' maps_dtype); 3: the train split's are; 4:
# memory-mapped stores (foodvision.data.store) instead of torch.save files (entries of earlier formats are
# rebuilt; their files are left alone); 5: the train split's rows are written in a fixed shuffled order
# (foodvision.data.store.mixed_row_order), so that the file's chunks mix classes.
CACHE_FORMAT = 5
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


def batched_extraction(device: torch.device, pipeline: str | None) -> bool:
    """Whether extraction decodes batch-wise on the backbone's device: on CUDA (nvJPEG; PIL in CPU workers
    fed the GPU 2.4 % of its bound), and on a CPU where training was told to take the tensor path
    (``pipeline``, the datamodule's resolved ``data.pipeline``, is ``tensor``). On a CPU under ``auto``
    (``decoded``) the PIL workers stay: 200 food101-mini photos, AMD EPYC 2 cores shared, 2 loader
    workers: 506-530 img/s batched against 351-368 with one torch thread, but 98-108 against 341-378 with
    two torch threads on a loaded machine, where the in-process decode loses its cores."""
    return device.type == "cuda" or pipeline == "tensor"


class DecodedEvalBatches:
    """A loader of :class:`~foodvision.data.datasets.RawBatch` (file bytes) as ``(eval images on
    device, targets)`` batches, the shape :func:`extract_to_stores` reads (``None`` for a batch with no
    readable photo). A file that cannot be decoded is named and skipped as on the PIL path: the PIL path's
    error, raised, or with ``skip_bad_images`` logged to ``bad_images_log`` and left out."""

    def __init__(
        self,
        loader: Iterable[RawBatch | None],
        transform: BatchedTransform,
        device: torch.device,
        draft: int | None,
        skip_bad_images: bool = False,
        bad_images_log: str | Path | None = None,
    ):
        self.loader, self.transform, self.device, self.draft = loader, transform, device, draft
        self.skip_bad_images = skip_bad_images
        self.bad_images_log = Path(bad_images_log) if bad_images_log else None

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor] | None]:
        for raw in self.loader:
            if raw is None:
                yield None
                continue
            payloads = raw.payloads
            assert payloads is not None
            images, kept, failed = decode_eval_batch(
                payloads, raw.names, self.transform, self.device, self.draft
            )
            for position, error in failed:
                bad = unreadable(raw.names[position], error)
                if not self.skip_bad_images:
                    if bad is error:
                        raise bad
                    raise bad from error
                record_bad_image(self.bad_images_log, bad)
            yield (images, raw.targets[kept]) if images is not None else None


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
def extract_to_stores(
    pl_module: L.LightningModule,
    loader: Iterable[Any],
    run: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]],
    desc: str,
    pooled_path: str | Path | None,
    maps_path: str | Path | None = None,
    flip: bool = False,
    maps_dtype: torch.dtype | None = None,
) -> tuple[Store | None, Store | None]:
    """Pooled backbone features and (when ``run`` gives them and ``maps_path`` is set) the frozen prefix's
    feature maps of every readable image of ``loader``, in order, with their labels, from one pass of the
    backbone in eval mode (of the mirrored images with ``flip``), written to the stores at ``pooled_path``
    and ``maps_path`` (``None``: not kept).

    Rows are appended to the stores' files batch by batch: the split is never held in memory (3,380 x
    96x16x16 maps are 330 MB in float32; Food-101's 68k photos 6.6 GB). A store appears under its name only
    once complete (:class:`foodvision.data.store.StoreWriter`); an interrupted pass leaves nothing.
    ``maps_dtype``: how float32 prefix maps are stored (``None``: as ``run`` gives them, e.g. bf16 under
    bf16 autocast); :data:`COMPACT_MAPS_DTYPE` halves them (the consumer upcasts each batch:
    :meth:`foodvision.data.cached.CachedInputs.collate`); a map beyond float16's range turns the whole
    split to float32 (the rows written so far are converted on disk)."""
    backbone = pl_module.net.backbone
    was_training = backbone.training
    backbone.eval()
    pooled = StoreWriter(pooled_path) if pooled_path is not None else None
    maps = None
    stored_dtype = torch.float32
    try:
        for batch in tqdm(loader, desc=desc, unit="batch", dynamic_ncols=True):
            if batch is None:
                continue
            images, targets = batch
            if flip:
                images = images.flip(-1)
            features, prefix = run(images)
            del images
            targets = targets.cpu()
            if pooled is not None:
                pooled.append(features=features.float(), labels=targets)
            if prefix is not None and maps_path is not None:
                if maps is None:
                    maps = StoreWriter(maps_path)
                    compact = maps_dtype is not None and prefix.dtype == torch.float32
                    stored_dtype = maps_dtype if compact else prefix.dtype
                if stored_dtype == torch.float16 and float(prefix.abs().max()) > FLOAT16_MAX:
                    log.warning("%s: feature maps beyond float16's range: stored in float32", desc)
                    stored_dtype = torch.float32
                    if maps.rows:
                        maps.widen("features", torch.float32)
                maps.append(features=prefix, labels=targets, dtypes={"features": stored_dtype})
        if (pooled is not None and not pooled.rows) or (pooled is None and (maps is None or not maps.rows)):
            raise RuntimeError(f"{desc}: no readable images")
        stored = (
            pooled.commit() if pooled is not None else None,
            maps.commit() if maps is not None else None,
        )
    except BaseException:
        for writer in (pooled, maps):
            if writer is not None:
                writer.abort()
        raise
    finally:
        backbone.train(was_training)
    return stored


def extract_features(
    pl_module: L.LightningModule,
    loader: Iterable[Any],
    run: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]],
    desc: str,
    flip: bool = False,
    maps_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """:func:`extract_to_stores` into a temporary folder, read back as in-memory tensors
    ``(pooled, labels, maps or None)``: for small sets and checks (training reads the stores)."""
    with tempfile.TemporaryDirectory(prefix="foodvision-features-") as folder:
        pooled, maps = extract_to_stores(
            pl_module, loader, run, desc, Path(folder) / "pooled", Path(folder) / "maps", flip, maps_dtype
        )
        assert pooled is not None
        return (
            pooled.load("features"),
            pooled.load("labels"),
            maps.load("features") if maps is not None else None,
        )


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
        self._prefix_maps: dict[str, dict[str, StoredView]] = {}  # split -> view -> cached maps
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

    def _assemble(self, split: str, entry: str, sets: dict[str, StoredView]) -> CachedInputs:
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
    ) -> StoredView:
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

        def entry_name(kind: str, digest: str) -> str:
            key = feature_cache_key(name, digest, pre, paths, precision, f"{kind}:{view_spec}")
            return f"{split}-{kind}-{view}-{key}"

        pooled_name = entry_name("pooled", state_digest(backbone))
        prefix_name = None
        if self.depth is not None:
            prefix_name = entry_name(f"prefix{self.depth}", state_digest(backbone, in_prefix(self.depth)))
        wanted = pooled_name if output == POOLED else prefix_name
        assert wanted is not None
        found = self._find(wanted) if trainer.is_global_zero else None
        if trainer.is_global_zero and found is None:
            # Training reads its shuffled batches in contiguous chunks of the file (QuasiRandomSampler), and
            # the split lists its photos class by class: its rows are written in a fixed shuffled order, the
            # same for every view, so that a chunk holds many classes (rows keep their labels).
            order = mixed_row_order(len(paths)) if split == "train" else None
            loader = self._loader(trainer, pl_module, split, view, order)
            if self._runner is None:
                self._runner = frozen_forward(
                    pl_module,
                    engine,
                    trainer.precision_plugin.forward_context,
                    self.depth,
                    self.engine,
                    str(trainer.precision),
                )
            folder = self._write_dir()
            pooled, maps = extract_to_stores(
                pl_module,
                loader,
                self._runner,
                f"caching {split} features" + ("" if view == "plain" else f" ({view})"),
                pooled_path=folder / pooled_name if output == POOLED else None,
                maps_path=folder / prefix_name if prefix_name is not None else None,
                flip=view == "flip",
                # train maps in float16 (half the bytes of stage 2's largest input); val stays float32 so
                # cached validation equals eval.py on images to 1e-4
                maps_dtype=COMPACT_MAPS_DTYPE if split == "train" else None,
            )
            for store in (pooled, maps):
                if store is not None:
                    self.builds.append(str(store.path))
                    log.info("cached %d feature rows in %s", len(store), store.path)
        elif found is not None:
            self.hits.append(str(found.path))
            log.info("feature cache hit: %s", found.path)
        trainer.strategy.barrier("feature-cache")
        if output == POOLED and prefix_name is not None:
            maps_store = self._find(prefix_name)
            if maps_store is not None:
                self._prefix_maps.setdefault(split, {})[view] = StoredView(maps_store)
        store = self._find(wanted)
        if store is None:  # another rank's build, not visible here (a cache folder not shared by the nodes)
            raise RuntimeError(
                f"feature cache entry {wanted} is missing after it was built (cache dir {self.cache_dir})"
            )
        return StoredView(store)

    def _loader(
        self, trainer: L.Trainer, pl_module: L.LightningModule, split: str, view: str, order: list[int] | None
    ) -> Iterable[Any]:
        """``(images, targets)`` batches of a view: the augmented views through PIL (their draws are the PIL
        transforms'); the photos (and their mirror) decoded batch-wise on the backbone's device where
        :func:`batched_extraction` says so, else through PIL."""
        datamodule = trainer.datamodule
        batch_size = datamodule.eval_batch_size
        if view.startswith("augment"):
            dataset = datamodule.image_dataset(
                split,
                True,
                self.view_augment,
                item_seed=self.seed * 10_007 + int(view[len("augment") :]),
                order=order,
            )
            return datamodule.loader(dataset, shuffle=False, batch_size=batch_size)
        device = pl_module.device
        if not batched_extraction(device, getattr(datamodule, "resolved_pipeline", None)):
            return datamodule.loader(
                datamodule.image_dataset(split, order=order), shuffle=False, batch_size=batch_size
            )
        samples = datamodule.discover().splits[split]
        encoded = EncodedFileDataset(
            samples if order is None else [samples[i] for i in order],
            skip_bad_images=datamodule.skip_bad_images,
            bad_images_log=datamodule.bad_images_log,
        )
        pre = pl_module.preprocessing
        log.info(
            "%s photos for the feature cache: read by loader workers, decoded in batches on %s", split, device
        )
        return DecodedEvalBatches(
            datamodule.loader(encoded, shuffle=False, batch_size=batch_size),
            BatchedTransform.from_config(pre, None, train=False),
            device,
            pre.resize_size,
            datamodule.skip_bad_images,
            datamodule.bad_images_log,
        )

    def _write_dir(self) -> Path:
        """The cache folder, or (read-only, full, not ours) a temporary one, with one warning."""
        return writable_cache_dir(self.cache_dir, "feature cache")

    def _find(self, name: str) -> Store | None:
        """The complete entry ``name`` in the cache folder (or in its temporary fallback), ``None`` when
        there is none. A damaged one (truncated or half-replaced files) is named in one line, removed and
        counts as missing, so that it is rebuilt."""
        for folder in (self.cache_dir, fallback_cache_dir(self.cache_dir)):
            path = folder / name
            try:
                store = open_store(path)
            except StoreError as error:
                log.warning("feature cache entry %s is damaged (%s): rebuilding it", error.path, error.reason)
                remove_store(path)
                continue
            if store is not None:
                return store
        return None

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

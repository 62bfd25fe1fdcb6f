"""The LightningDataModule: class-per-folder trees or the Food-101 archive, with splits, transforms and loaders."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader, Dataset

from foodvision.atomic import ensure_dir, write_text
from foodvision.data.balance import balance_samples, check_balance_mode, class_counts
from foodvision.data.batched import BatchedTransform, decode_batch
from foodvision.data.cached import CachedInputs
from foodvision.data.datasets import (
    DecodedPhotoDataset,
    EncodedFileDataset,
    ImageListDataset,
    RawBatch,
    collate_skipping_none,
    read_bad_images_log,
    record_bad_image,
)
from foodvision.data.decoded import (
    decoded_bytes,
    load_or_build_decoded,
    photo_side,
)
from foodvision.data.duplicates import (
    DUPLICATES_FILE,
    EXCLUDED_FILE,
    DuplicateCheck,
    apply_duplicates_policy,
    check_duplicates_mode,
    exclude_label_issues,
)
from foodvision.data.fingerprints import content_digests
from foodvision.data.images import BadImageError
from foodvision.data.mixing import mixes_images
from foodvision.data.sampling import EpochShuffleSampler, iterator_seed_generator
from foodvision.data.sources import DataLayoutError, DatasetSplits, discover_food101, discover_image_folder
from foodvision.data.splits import SPLITS, write_split_file
from foodvision.data.store import QuasiRandomSampler
from foodvision.data.transforms import Preprocessing, build_train_transform
from foodvision.data.verify import BadImagesError, describe_bad_images, find_bad_images
from foodvision.hardware import cpu_cores

log = logging.getLogger(__name__)

# data.pipeline: how training images reach the model (see conf/data/food101.yaml).
#   pil:     loader workers decode and transform each photo with PIL (ImageListDataset);
#   tensor:  workers read the files' bytes; decode and transform run batched on the training device;
#   decoded: workers read rows of the decoded-photo cache (each photo decoded once, foodvision.data.decoded);
#            the transform runs batched on the training device;
#   auto:    AUTO_PIPELINE's choice for the training device.
PIPELINES = ("auto", "pil", "tensor", "decoded")
# What auto chooses, by the training device's type; measured in bench/tensor_path.py (README, data path).
AUTO_PIPELINE = {"cuda": "tensor", "cpu": "decoded"}


def default_num_workers() -> int:
    """Half the cores, at least one: on small machines decoding workers compete with the model's threads."""
    cores = cpu_cores()
    return max(1, min(8, cores // 2))


def download_food101(root: str | Path) -> Path:
    """Fetch Food-101 through torchvision (5 GB); fails fast with a clear message when offline."""
    import socket

    from torchvision.datasets import Food101

    try:
        socket.create_connection(("data.vision.ee.ethz.ch", 443), timeout=5).close()
    except OSError as error:
        raise DataLayoutError(
            f"data.download=true but the Food-101 server is unreachable ({error}). Download "
            "food-101.tar.gz on a machine that is online and extract it to data/, or set data.root."
        ) from error
    parent = Path(root).expanduser().parent
    Food101(str(parent), split="train", download=True)
    return parent / "food-101"


class FoodDataModule(L.LightningDataModule):
    """Discovers classes and splits (cheap: lists files) in :meth:`discover`, builds datasets in :meth:`setup`.

    ``preprocessing`` must be set (from the model) before ``setup``; it is what makes the eval
    transform of the data match the model's pretrained statistics.
    """

    def __init__(
        self,
        source: str = "food101",
        root: str | None = None,
        fractions: Sequence[float] = (0.7, 0.15, 0.15),
        val_fraction: float | None = 0.1,
        carve_val_fraction: float | None = None,
        classes: Sequence[str] | None = None,
        max_per_class: Mapping[str, int | None] | None = None,
        seed: int = 42,
        image_size: int | None = 224,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int | None = None,
        persistent_workers: bool = True,
        pin_memory: bool | None = None,
        skip_bad_images: bool = False,
        download: bool = False,
        balance: str | None = "none",
        augment: Mapping[str, Any] | None = None,
        output_dir: str | None = None,
        cache_dir: str | None = None,
        group_duplicates: bool = True,
        duplicates: str = "warn",
        exclude_label_issues: str | None = None,
        pipeline: str = "auto",
    ):
        super().__init__()
        if source not in ("food101", "imagefolder"):
            raise ValueError(f"data.source must be 'food101' or 'imagefolder', got {source!r}")
        if pipeline not in PIPELINES:
            raise ValueError(f"data.pipeline must be one of {', '.join(PIPELINES)}, got {pipeline!r}")
        self.pipeline = pipeline
        self.source = source
        self.root = root
        self.fractions = tuple(fractions)
        self.val_fraction = val_fraction
        self.carve_val_fraction = carve_val_fraction
        self.classes_subset = list(classes) if classes else None
        self.max_per_class = dict(max_per_class or {})
        self.seed = seed
        self.image_size = image_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or 2 * batch_size
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.persistent_workers = persistent_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.skip_bad_images = skip_bad_images
        self.download = download
        self.balance = check_balance_mode(balance)
        self.augment = dict(augment or {"name": "none"})
        self.output_dir = Path(output_dir) if output_dir else None
        self.cache_dir = Path(cache_dir) if cache_dir else None
        # Exact duplicates (foodvision.data.duplicates): kept in one split when foodvision splits; checked
        # across the splits in verify_images; the flagged label errors of an audit.json left out of train.
        self.group_duplicates = bool(group_duplicates)
        self.duplicates = check_duplicates_mode(duplicates)
        self.exclude_label_issues = exclude_label_issues
        self.duplicate_check = DuplicateCheck()
        self.excluded_label_issues: list[dict[str, Any]] = []
        self.skipped: dict[str, str] = {}  # bad files left out by verify_images (path -> reason)
        self._verified = False
        self.preprocessing: Preprocessing | None = None
        self.data: DatasetSplits | None = None
        self._split_record: dict[str, list[tuple[str, int]]] = {}  # what splits.csv records
        self.datasets: dict[str, Dataset] = {}
        # Split name -> cached backbone outputs that replace its images (see use_cached).
        self._cached: dict[str, CachedInputs] = {}
        # The tensor data path (data.pipeline): what setup resolved it to, its datasets (built when a
        # split's loader is first wanted from images), batch transforms, and the decoded-photo cache
        # entries this datamodule built or found (store paths).
        self.resolved_pipeline: str | None = None
        self._tensor_datasets: dict[str, EncodedFileDataset | DecodedPhotoDataset] = {}
        self._batch_transforms: dict[bool, BatchedTransform] = {}
        self.decoded_builds: list[str] = []
        self.decoded_hits: list[str] = []

    # ---- discovery -------------------------------------------------------------------------
    def discover(self, save_splits: bool = True) -> DatasetSplits:
        """List classes and split files; writes ``splits.csv`` to the run dir (``save_splits=False``: not
        yet, :meth:`save_splits` does it: train.py writes nothing into a resumed run before accepting it)."""
        if self.data is not None:
            return self.data
        if self.root is None:
            raise DataLayoutError("data.root is not set")
        root = Path(self.root).expanduser()
        if self.source == "food101":
            if self.download and not (root / "meta" / "classes.txt").is_file():
                root = download_food101(root)
            val_fraction = 0.1 if self.val_fraction is None else self.val_fraction
            self.data = discover_food101(
                root,
                val_fraction,
                self.seed,
                self.classes_subset,
                self.max_per_class,
                group_of=self._group_of,
            )
        else:  # carve_val_fraction null: the val share of `fractions` (see conf/data/imagefolder.yaml)
            self.data = discover_image_folder(
                root, self.fractions, self.seed, self.carve_val_fraction, group_of=self._group_of
            )
        log.info("data: %s; %d classes; %s", self.data.origin, len(self.data.classes), self.data.counts())
        self._split_record = {split: list(samples) for split, samples in self.data.splits.items()}
        if save_splits:
            self.save_splits()
        if self.exclude_label_issues:  # train only, after splits.csv (which records the split itself)
            written = save_splits and self.output_dir is not None and rank_zero_only.rank == 0
            out = self.output_dir / EXCLUDED_FILE if written else None
            self.data.splits["train"], self.excluded_label_issues = exclude_label_issues(
                self.data.splits["train"], self.exclude_label_issues, out, self.data.classes
            )
        if self.balance != "none":  # train only, after splits.csv (which records the split itself)
            before = class_counts(self.data.splits["train"], len(self.data.classes))
            self.data.splits["train"] = balance_samples(self.data.splits["train"], self.balance, self.seed)
            after = class_counts(self.data.splits["train"], len(self.data.classes))
            log.info("data.balance=%s: train class counts %s -> %s", self.balance, before, after)
        return self.data

    def save_splits(self) -> Path | None:
        """Write ``splits.csv`` (``split,class,path``: the splits as discovered, before ``balance``) to the
        run dir, on rank zero; the path, or None when nothing was written."""
        if self.output_dir is None or rank_zero_only.rank != 0:
            return None
        data = self.discover(save_splits=False)
        return write_split_file(self.output_dir / "splits.csv", self._split_record, data.classes)

    def _group_of(self, files: list[str]) -> dict[str, str] | None:
        """Content digests of the files a split is carved from (cached per file): identical files stay in
        one split (``data.group_duplicates``)."""
        if not self.group_duplicates:
            return None

        cache = self.cache_dir / "fingerprints" if self.cache_dir is not None else None
        return content_digests(files, cache, progress=rank_zero_only.rank == 0)

    @property
    def classes(self) -> list[str]:
        return self.discover().classes

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def class_counts(self, split: str = "train") -> list[int]:
        """Samples per class index in ``split`` (for train: after ``balance``)."""
        return class_counts(self.discover().splits[split], self.num_classes)

    @property
    def bad_images_log(self) -> Path | None:
        return self.output_dir / "bad_images.tsv" if self.output_dir else None

    def bad_images(self) -> list[str]:
        """Files left out of this run: found by :meth:`verify_images`, or unreadable later on."""
        later = read_bad_images_log(self.bad_images_log) if self.bad_images_log else []
        return sorted(set(self.skipped) | set(later))

    def verify_images(self, progress: bool = True) -> dict[str, str]:
        """Decode every photo of every split once (parallel, verdicts cached) before any training.

        Bad files are all listed at once in ``bad_images.tsv`` (run dir); without ``skip_bad_images``
        that is an error naming them, with it they leave the splits. Returns ``{path: reason}``.
        """
        data = self.discover()
        if self._verified:
            return self.skipped
        draft = self.preprocessing.resize_size if self.preprocessing is not None else None
        paths = [path for samples in data.splits.values() for path, _ in samples]
        cache = self.cache_dir / "verified" if self.cache_dir is not None else None
        digests: dict[str, str] = {}
        shown = progress and rank_zero_only.rank == 0
        bad = find_bad_images(paths, draft, cache, progress=shown, digests=digests)
        if bad:
            if self.bad_images_log is not None and rank_zero_only.rank == 0:
                ensure_dir(self.bad_images_log.parent)
                lines = [f"{path}\t{reason}\n" for path, reason in sorted(bad.items())]
                write_text(self.bad_images_log, "".join(lines))
            if not self.skip_bad_images:
                raise BadImagesError(describe_bad_images(bad, f"data.root={self.root}", self.bad_images_log))
            for split, samples in data.splits.items():
                data.splits[split] = [s for s in samples if s[0] not in bad]
                before = {label for _, label in samples}
                after = {label for _, label in data.splits[split]}
                emptied = [data.classes[i] for i in sorted(before - after)]
                if emptied:
                    raise BadImagesError(
                        f"after leaving out {len(bad)} bad image(s) (data.skip_bad_images=true), the {split} "
                        f"split has no images of {', '.join(emptied)}; see {self.bad_images_log}"
                    )
            log.warning(
                "left out %d image(s) that cannot be decoded (data.skip_bad_images=true), listed in %s",
                len(bad),
                self.bad_images_log,
            )
        written = self.output_dir is not None and rank_zero_only.rank == 0
        report = self.output_dir / DUPLICATES_FILE if written else None
        self.duplicate_check = apply_duplicates_policy(
            data.splits, data.classes, digests, self.duplicates, report
        )
        self.skipped = bad
        self._verified = True
        return bad

    # ---- datasets --------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.preprocessing is None:
            raise RuntimeError("FoodDataModule.preprocessing must be set from the model before setup()")
        self.verify_images()
        self.datasets = {split: self.image_dataset(split, augmented=split == "train") for split in SPLITS}
        self.resolved_pipeline = self.resolve_pipeline(self._device_type())
        log.info("data.pipeline=%s: %s data path", self.pipeline, self.resolved_pipeline)
        if self.resolved_pipeline != "pil":
            self._batch_transforms = {
                train: BatchedTransform.from_config(self.preprocessing, self.augment, train=train)
                for train in (True, False)
            }

    def _device_type(self) -> str:
        return self.trainer.strategy.root_device.type if self.trainer is not None else "cpu"

    def resolve_pipeline(self, device_type: str) -> str:
        """``data.pipeline`` for a training device of ``device_type``: ``auto`` as :data:`AUTO_PIPELINE`
        says; an augment preset the batched transform cannot do (``BatchedTransform.supports``) keeps the
        PIL path, with a one-line notice."""
        chosen = AUTO_PIPELINE.get(device_type, "tensor") if self.pipeline == "auto" else self.pipeline
        if chosen != "pil" and not BatchedTransform.supports(self.augment):
            log.info(
                "data.pipeline=%s: augment=%s has no batched tensor version; training images take the PIL "
                "path (data.pipeline=pil)",
                self.pipeline,
                self.augment.get("name"),
            )
            return "pil"
        return chosen

    def image_dataset(
        self,
        split: str,
        augmented: bool = False,
        augment: Mapping[str, Any] | None = None,
        item_seed: int | None = None,
        order: Sequence[int] | None = None,
    ) -> ImageListDataset:
        """A split's images with the eval transform, or the train transform when ``augmented`` (of
        ``augment`` when given, else of the datamodule's preset); ``item_seed`` fixes each image's draw;
        ``order``: the split's photos in this order (indices into the split's list)."""
        assert self.preprocessing is not None
        transform = (
            build_train_transform(self.preprocessing, augment or self.augment)
            if augmented
            else self.preprocessing.eval_transform()
        )
        samples = self.discover().splits[split]
        return ImageListDataset(
            samples if order is None else [samples[i] for i in order],
            transform,
            draft_size=self.preprocessing.resize_size,
            skip_bad_images=self.skip_bad_images,
            bad_images_log=self.bad_images_log,
            item_seed=item_seed,
        )

    @property
    def augmented(self) -> bool:
        """Whether training images differ from the eval transform's (a preset, or MixUp/CutMix of images)."""
        return self.augment.get("name", "none") != "none" or mixes_images(self.augment)

    # ---- loaders ---------------------------------------------------------------------------
    def use_cached(self, split: str, inputs: CachedInputs | None) -> None:
        """Serve ``split`` (train or val) from cached backbone outputs from now on (``None``: its images
        again). Loaders built after this call use it; the feature cache asks the trainer to rebuild them."""
        if split not in ("train", "val"):
            raise ValueError(f"only the train and val splits are served from a cache, not {split!r}")
        if inputs is None:
            self._cached.pop(split, None)
        else:
            self._cached[split] = inputs

    def serves_cached(self, split: str) -> bool:
        return split in self._cached

    def loader(self, dataset: Dataset, shuffle: bool, batch_size: int | None = None) -> DataLoader:
        """Shuffled loaders draw each epoch's order from (seed, epoch) (:class:`EpochShuffleSampler`), so a
        resumed run sees the batches the uninterrupted run saw; under DDP Lightning's DistributedSampler
        does the same (seeded, ``set_epoch``)."""
        distributed = self.trainer is not None and self.trainer.world_size > 1
        sampler: EpochShuffleSampler | None = None
        if shuffle and not distributed:
            # Cached outputs are read from memory-mapped files: in shuffled chunks where they exceed one
            # window (QuasiRandomSampler), so that a split larger than free memory is no random-read storm.
            sampler = (
                QuasiRandomSampler(len(dataset), self.seed, dataset.row_bytes)
                if isinstance(dataset, CachedInputs)
                else EpochShuffleSampler(len(dataset), self.seed)
            )
            # The epoch the loader is built for (a resumed run's first): Lightning creates that epoch's
            # iterator before it calls set_epoch (with the same value), and worker loaders fetch their
            # first batches right then: in the order of epoch 0, without this.
            sampler.set_epoch(self.trainer.fit_loop.epoch_progress.current.processed if self.trainer else 0)
        options: dict[str, Any] = {
            "batch_size": batch_size or self.batch_size,
            "shuffle": shuffle if sampler is None else None,
            "sampler": sampler,
        }
        in_process = {"generator": iterator_seed_generator(self.seed)}  # see iterator_seed_generator
        if isinstance(dataset, CachedInputs):  # a batch is one sorted read of its rows: no workers needed
            return DataLoader(dataset, collate_fn=dataset.collate, **options, **in_process)
        if not isinstance(dataset, (ImageListDataset, EncodedFileDataset, DecodedPhotoDataset)):
            return DataLoader(dataset, **options, **in_process)
        workers = self.num_workers
        # The tensor path's workers draw nothing at random (they read bytes or rows), so its loaders take
        # the generator with workers too: their iterators never move torch's global stream (a resumed run
        # draws the uninterrupted run's dropout masks); a PIL worker's seed comes from the global stream.
        raw = isinstance(dataset, (EncodedFileDataset, DecodedPhotoDataset))
        return DataLoader(
            dataset,
            **options,
            **(in_process if workers == 0 or raw else {}),
            num_workers=workers,
            persistent_workers=self.persistent_workers and workers > 0,
            pin_memory=self.pin_memory,
            collate_fn=getattr(dataset, "collate", collate_skipping_none),
        )

    def tensor_dataset(self, split: str) -> EncodedFileDataset | DecodedPhotoDataset:
        """The tensor data path's dataset of ``split`` (train or val): its files' bytes
        (``data.pipeline=tensor``), or rows of its decoded-photo cache, decoded now unless an earlier run
        did (``decoded``). Built on first use, so that splits served from the feature cache cost nothing."""
        if split in self._tensor_datasets:
            return self._tensor_datasets[split]
        assert self.preprocessing is not None
        samples = self.discover().splits[split]
        train = split == "train"
        dataset: EncodedFileDataset | DecodedPhotoDataset
        paths = [path for path, _ in samples]
        side = photo_side(self.preprocessing, self.augment if train else None)
        decoded = None
        if self.resolved_pipeline == "decoded":
            decoded, built = load_or_build_decoded(
                paths,
                side,
                self.preprocessing.interpolation,
                self.cache_dir,
                workers=self.num_workers,
                skip_bad_images=self.skip_bad_images,
                on_bad=lambda error: record_bad_image(self.bad_images_log, error),
                progress=rank_zero_only.rank == 0,
                what=f"{split} photos",
            )
            if decoded is None:
                log.warning(
                    "data.pipeline=%s: a decoded-photo cache of the %s split (%d photos at %d px, %.1f GB) would "
                    "take over half the free disk space of %s: decoding every epoch instead (data.pipeline=tensor)",
                    self.pipeline,
                    split,
                    len(set(paths)),
                    side,
                    decoded_bytes(len(set(paths)), side) / 1e9,
                    self.cache_dir,
                )
            else:
                (self.decoded_builds if built else self.decoded_hits).append(str(decoded.store.path))
        if decoded is None:
            dataset = EncodedFileDataset(samples, train, self.skip_bad_images, self.bad_images_log)
        else:
            dataset = DecodedPhotoDataset(decoded.store, samples, decoded.rows(paths), train)
        self._tensor_datasets[split] = dataset
        return dataset

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """A :class:`RawBatch` of the tensor data path is decoded (nvJPEG on CUDA) and transformed here,
        batch-wise on the training device, into ``(images, targets)``; anything else moves as it is.

        This hook rather than ``on_after_batch_transfer``: Lightning runs only one of the datamodule's and
        the module's ``on_after_batch_transfer`` (the datamodule's), and the module's mixes batches
        (MixUp/CutMix), which must stay on top of this; and the file bytes must stay on the host."""
        if not isinstance(batch, RawBatch):
            return super().transfer_batch_to_device(batch, device, dataloader_idx)
        return self.prepare_batch(batch, device)

    def prepare_batch(self, batch: RawBatch, device: torch.device | str = "cpu") -> tuple[Any, Any] | None:
        """``(normalised float images [B, 3, S, S], targets)`` on ``device`` from a :class:`RawBatch`; the
        augmentation draws are a function of (``data.seed``, the trainer's epoch, each photo's index).
        ``None`` when every file of the batch was bad (``data.skip_bad_images``)."""
        assert self.preprocessing is not None
        device = torch.device(device)
        targets, indices = batch.targets, batch.indices
        if batch.photos is not None:
            images: Any = batch.photos.to(device, non_blocking=True)
        else:
            payloads = batch.payloads
            assert payloads is not None
            side = photo_side(self.preprocessing, self.augment if batch.train else None)
            images, kept = decode_batch(payloads, batch.names, device, side, self.skip_bad_images)
            if len(kept) < len(batch):
                self._record_undecodable(payloads, batch.names, kept)
                if not kept:
                    return None
                targets, indices = targets[kept], indices[kept]
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        transform = self._batch_transforms[batch.train]
        return transform(images, indices, epoch, self.seed), targets.to(device, non_blocking=True)

    def _record_undecodable(self, payloads: list[torch.Tensor], names: list[str], kept: list[int]) -> None:
        """Name the files the batched decode left out (decoded alone once more, for the reason)."""
        for position in sorted(set(range(len(names))) - set(kept)):
            try:
                decode_batch([payloads[position]], [names[position]])
                error = BadImageError(names[position], "could not be decoded in its batch")
            except BadImageError as bad:
                error = bad
            record_bad_image(self.bad_images_log, error)

    def _split_loader(self, split: str) -> DataLoader:
        dataset: Dataset
        if split in self._cached:
            dataset = self._cached[split]
        elif self.resolved_pipeline not in (None, "pil"):
            dataset = self.tensor_dataset(split)
        else:
            dataset = self.datasets[split]
        train = split == "train"
        return self.loader(dataset, shuffle=train, batch_size=None if train else self.eval_batch_size)

    def train_dataloader(self) -> DataLoader:
        return self._split_loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._split_loader("val")

    # No test_dataloader: the test split is evaluated by eval.py's code (foodvision.evaluation.evaluate),
    # never by trainer.test.

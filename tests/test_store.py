"""Memory-mapped feature stores (issue #20): written in chunks, read by batch, never used half-built, and
training memory that does not grow with the number of photos. The memory figures are `make bench`'s (scale)."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from foodvision.data import store as store_module
from foodvision.data.cached import CachedInputs, StoredView
from foodvision.data.datamodule import FoodDataModule
from foodvision.data.sampling import EpochShuffleSampler
from foodvision.data.store import (
    QuasiRandomSampler,
    StoreError,
    StoreWriter,
    mixed_row_order,
    open_store,
    quasi_random_order,
)
from foodvision.models.classifier import POOLED, prefix_entry
from foodvision.training.callbacks.feature_cache import COMPACT_MAPS_DTYPE, FeatureCache, extract_to_stores
from foodvision.training.callbacks.finetune import TwoStageFinetuning
from foodvision.training.module import LitClassifier

from .test_finetune import fit, make_datamodule, make_module


class Loader(list):
    """Batches of (images, labels) with a ``dataset`` length, as extract_to_stores expects of a loader."""

    def __init__(self, images: torch.Tensor, batch: int):
        super().__init__((images[i : i + batch], torch.arange(i, i + len(images[i : i + batch]))) for i in
                         range(0, len(images), batch))  # fmt: skip
        self.dataset = list(range(len(images)))


IDENTITY = SimpleNamespace(net=SimpleNamespace(backbone=nn.Identity()))


def maps_and_pooled(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return batch.mean(dim=(2, 3)), batch * 3


def file_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.npy"))}


# ---- writing -----------------------------------------------------------------------------------------------
def test_a_store_written_in_chunks_equals_one_written_at_once(tmp_path: Path) -> None:
    images = torch.randn(23, 4, 5, 5, generator=torch.Generator().manual_seed(0))
    stores = {}
    for batch in (1, 4, 23):
        pooled, maps = extract_to_stores(
            IDENTITY,
            Loader(images, batch),
            maps_and_pooled,
            "test",
            tmp_path / f"pooled-{batch}",
            tmp_path / f"maps-{batch}",
            maps_dtype=COMPACT_MAPS_DTYPE,
        )
        assert pooled is not None and maps is not None
        stores[batch] = (file_bytes(pooled.path), file_bytes(maps.path))
    assert stores[1] == stores[4] == stores[23]  # bit for bit, headers included
    assert set(stores[1][1]) == {"features.npy", "labels.npy"}
    maps_store = open_store(tmp_path / "maps-4")
    assert maps_store is not None and len(maps_store) == 23
    assert torch.equal(maps_store.load("features"), (images * 3).half())
    assert np.load(tmp_path / "maps-4" / "features.npy").dtype == np.float16  # a plain .npy for any tool
    assert not list(tmp_path.glob(".*.tmp"))


def test_widening_to_float32_keeps_the_rows_already_written(tmp_path: Path) -> None:
    images = torch.randn(9, 2, 3, 3)
    images[7, 0, 0, 0] = 1e6  # beyond float16's range, in the third batch
    _, maps = extract_to_stores(
        IDENTITY, Loader(images, 3), maps_and_pooled, "t", None, tmp_path / "m", maps_dtype=torch.float16
    )
    assert maps is not None
    stored = maps.load("features")
    assert stored.dtype == torch.float32
    torch.testing.assert_close(stored[6:], images[6:] * 3, rtol=0, atol=0)
    torch.testing.assert_close(stored[:6], (images[:6] * 3).half().float(), rtol=0, atol=0)


# ---- reading -----------------------------------------------------------------------------------------------
def test_batches_read_from_the_store_equal_the_in_memory_ones(tmp_path: Path) -> None:
    """``__getitems__`` (one sorted read per view) gives what collating single items gave, view draws
    included, whether the views are memory-mapped or in memory; and it pickles as paths, not arrays."""
    import pickle

    rows = torch.randn(40, 6, generator=torch.Generator().manual_seed(1))
    views = []
    for k in range(2):
        with StoreWriter(tmp_path / f"v{k}") as writer:
            writer.append(features=(rows + k).half(), labels=torch.arange(40))
            views.append(writer.commit())
    mapped = CachedInputs(POOLED, [StoredView(s) for s in views], mirrored=StoredView(views[1]))
    memory = CachedInputs(
        POOLED,
        [TensorDataset((rows + k).half(), torch.arange(40)) for k in range(2)],
        mirrored=TensorDataset((rows + 1).half(), torch.arange(40)),
    )
    indices = [31, 2, 17, 2, 39, 0, 8]
    torch.manual_seed(5)
    got = mapped.collate(mapped.__getitems__(indices))
    torch.manual_seed(5)
    from_memory = memory.collate(memory.__getitems__(indices))
    torch.manual_seed(5)
    one_by_one = memory.collate([memory[i] for i in indices])
    for batch in (from_memory, one_by_one):
        assert batch.keys() == got.keys()
        for key in ("inputs", "targets", "mirrored"):
            assert torch.equal(got[key], batch[key]) and got[key].dtype == batch[key].dtype
    assert got["inputs"].dtype == torch.float32 and got["targets"].tolist() == indices
    assert len(pickle.dumps(mapped)) < 2_000  # a DataLoader worker maps the files itself


def test_quasi_random_order_reads_in_chunks_and_depends_only_on_seed_and_epoch() -> None:
    def order(epoch: int, length: int = 1000) -> list[int]:
        generator = torch.Generator().manual_seed(epoch)
        return quasi_random_order(length, generator, row_bytes=10, chunk_bytes=100, window_bytes=400).tolist()

    first = order(0)
    assert sorted(first) == list(range(1000)) and first == order(0) and first != order(1)
    for start in range(0, 1000, 40):  # each window of 40 rows holds 4 whole chunks of 10 rows
        window = first[start : start + 40]
        assert len({row // 10 for row in window}) == 4
    small = QuasiRandomSampler(30, seed=3, row_bytes=10)
    plain = EpochShuffleSampler(30, seed=3)
    small.set_epoch(2), plain.set_epoch(2)
    assert list(small) == list(plain)  # what fits in one window keeps the plain shuffle


# ---- interrupted and damaged entries ---------------------------------------------------------------------
def _run(image_folder: Path, out: Path, cache: Path) -> FeatureCache:
    dm = make_datamodule(image_folder, out)
    feature_cache = FeatureCache("auto", str(cache))
    fit(make_module(dm), dm, out, [TwoStageFinetuning(5, "none"), feature_cache], epochs=1)
    return feature_cache


def test_interrupted_and_damaged_entries_are_rebuilt_never_read(
    image_folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    # A build that dies mid-way (here an error in its second batch) leaves no entry under its name.
    import foodvision.training.callbacks.feature_cache as feature_cache_module

    real = feature_cache_module.StoreWriter

    class Dying(real):  # type: ignore[misc, valid-type]
        def append(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
            if self.rows:
                raise RuntimeError("killed mid-write")
            super().append(*args, **kwargs)

    monkeypatch.setattr(feature_cache_module, "StoreWriter", Dying)
    with pytest.raises(RuntimeError, match="killed mid-write"):
        _run(image_folder, tmp_path / "0", cache)
    assert not cache.exists() or not list(cache.iterdir())  # nothing left, not even temporaries
    monkeypatch.setattr(feature_cache_module, "StoreWriter", real)

    first = _run(image_folder, tmp_path / "1", cache)
    train, val = sorted(first.builds)
    # The train split's rows are stored in mixed_row_order (chunked reads then mix classes); val's in file order.
    train_labels = open_store(train).load("labels").tolist()
    assert train_labels != sorted(train_labels) and len(set(train_labels[:6])) > 1
    assert open_store(val).load("labels").tolist() == sorted(open_store(val).load("labels").tolist())
    # A SIGKILLed build leaves its temporary folder (of a process that is gone); a finished entry can be
    # truncated later (disk trouble, a partial copy of the cache).
    stale = Path(val).with_name(f".{Path(val).name}.999999999.dead.tmp")
    stale.mkdir()
    (stale / "features.npy").write_bytes(b"half")
    truncated = Path(val) / "features.npy"
    os.truncate(truncated, truncated.stat().st_size - 100)
    with caplog.at_level(logging.WARNING):
        second = _run(image_folder, tmp_path / "2", cache)
    assert second.builds == [val] and second.hits == [train] and not stale.exists()
    damaged = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(damaged) == 1 and str(truncated) in damaged[0] and "rebuilding" in damaged[0]
    assert open_store(val) is not None
    with pytest.raises(StoreError, match="truncated"):
        os.truncate(truncated, 10)
        open_store(val)
    third = _run(image_folder, tmp_path / "3", cache)  # damaged again: rebuilt again
    assert third.builds == [val] and third.hits == [train]


def test_read_only_cache_dir_falls_back_to_a_temporary_one(
    image_folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "ro"
    if os.geteuid() == 0:  # root writes anywhere: make the probe of the cache folder fail instead
        import foodvision.atomic as atomic

        probe = atomic.write_problem
        monkeypatch.setattr(
            atomic,
            "write_problem",
            lambda folder: (
                f"cannot write into {folder}: read-only" if Path(folder) == cache else probe(folder)
            ),
        )
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    cache.mkdir()
    cache.chmod(0o555)
    try:
        with caplog.at_level(logging.WARNING):
            run = _run(image_folder, tmp_path / "1", cache)
    finally:
        cache.chmod(0o755)
    assert len(run.builds) == 2 and all(str(tmp_path / "tmp") in p for p in run.builds)
    assert sum("feature cache" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING) == 1


# ---- training on memory maps -------------------------------------------------------------------------------
def _train_head(dm: FoodDataModule, train: CachedInputs, val: CachedInputs, out: Path) -> dict:
    torch.manual_seed(0)
    module = LitClassifier(
        3,
        ["a", "b", "c"],
        model={"kind": "timm", "name": "mobilenetv2_100", "pretrained": False, "head": {"hidden": 16}},
        optimizer={"name": "adamw", "lr": 1e-2},
        scheduler={"name": "none"},
    )
    dm.preprocessing = module.preprocessing
    dm.use_cached("train", train)
    dm.use_cached("val", val)
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(out),
    )
    L.seed_everything(0)
    trainer.fit(module, train_dataloaders=dm.train_dataloader(), val_dataloaders=dm.val_dataloader())
    return {k: v.clone() for k, v in module.net.head.state_dict().items()}


def test_training_from_memory_maps_gives_the_weights_of_in_memory_training(
    flat_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "CHUNK_BYTES", 5 * 1280 * 4)  # several windows: the chunked order
    monkeypatch.setattr(store_module, "WINDOW_BYTES", 20 * 1280 * 4)
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(80, 1280, generator=generator)
    labels = torch.arange(80) % 3
    with StoreWriter(tmp_path / "train") as writer:
        for start in range(0, 80, 16):
            writer.append(features=features[start : start + 16], labels=labels[start : start + 16])
        train_store = writer.commit()
    dm = FoodDataModule(source="imagefolder", root=str(flat_folder), batch_size=8, num_workers=0)
    mapped = _train_head(
        dm, CachedInputs(POOLED, [StoredView(train_store)]), CachedInputs(POOLED, [StoredView(train_store)]),
        tmp_path,
    )  # fmt: skip
    in_memory = _train_head(
        dm, CachedInputs(POOLED, [TensorDataset(features, labels)]),
        CachedInputs(POOLED, [TensorDataset(features, labels)]), tmp_path,
    )  # fmt: skip
    assert mapped.keys() == in_memory.keys()
    for key, value in mapped.items():
        assert torch.equal(value, in_memory[key]), key


# ---- memory ------------------------------------------------------------------------------------------------
def _rss_anon_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    return 0


class PeakAnon:
    """Peak of this process's anonymous resident memory, sampled every 2 ms by a thread."""

    def __enter__(self) -> PeakAnon:
        self.base = self.peak = _rss_anon_kb()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, _rss_anon_kb())
            time.sleep(0.002)

    def __exit__(self, *args: object) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, _rss_anon_kb())

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.base) / 1024


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads /proc")
def test_peak_anonymous_memory_does_not_grow_with_the_number_of_photos(tmp_path: Path) -> None:
    """Extraction of a split's maps and a shuffled epoch over them: 64 KB a photo (130 MB at 2,000 photos,
    which the in-memory cache held whole); the peak anonymous memory stays that of a few batches."""
    from foodvision.data.datamodule import FoodDataModule

    def pass_over(photos: int) -> float:
        class Photos(list):
            dataset = list(range(photos))

            def __iter__(self):  # noqa: ANN204 - generated batch by batch, as a DataLoader does
                for start in range(0, photos, 50):
                    count = min(50, photos - start)
                    yield torch.ones(count, 64, 16, 16) * start, torch.arange(start, start + count)

        with PeakAnon() as peak:
            pooled, maps = extract_to_stores(
                IDENTITY,
                Photos(),
                maps_and_pooled,
                "memory",
                tmp_path / f"p{photos}",
                tmp_path / f"m{photos}",
            )
            assert maps is not None and len(maps) == photos
            data = CachedInputs(prefix_entry(5), [StoredView(maps)])
            dm = FoodDataModule(source="imagefolder", root=str(tmp_path), batch_size=64, num_workers=0)
            seen = 0
            for batch in dm.loader(data, shuffle=True):
                seen += len(batch["targets"])
                del batch
            assert seen == photos
        return peak.growth_mb

    small, large = pass_over(200), pass_over(2000)
    assert large - small < 40, (small, large)  # the in-memory cache: +118 MB


def test_rows_written_in_the_mixed_order_give_chunked_batches_of_every_class() -> None:
    """Photos are listed class by class; the chunked (quasi-random) training order reads contiguous runs of
    rows, so the train split's rows are stored in mixed_row_order: every batch then holds every class."""
    labels = np.repeat(np.arange(10), 338)  # food101-mini's train split, class by class
    order = quasi_random_order(len(labels), torch.Generator().manual_seed(1), row_bytes=48 * 1024).numpy()

    def classes_per_batch(stored: np.ndarray) -> list[int]:
        return [len(set(stored[order[i : i + 64]].tolist())) for i in range(0, len(order) - 64, 64)]

    assert np.mean(classes_per_batch(labels)) < 8  # rows in file order: class-correlated batches
    assert min(classes_per_batch(labels[mixed_row_order(len(labels))])) == 10
    assert sorted(mixed_row_order(50)) == list(range(50)) and mixed_row_order(50) == mixed_row_order(50)

"""A small on-disk store of row arrays, written as rows come and read back memory-mapped.

Why: a split's cached backbone outputs (and later a decoded-photo cache) can be larger than the memory a
laptop has to spare. Rows are appended to files as they are computed, so a split never sits whole in
memory, and read back through memory maps, so a batch costs only its own rows: the kernel keeps the rest
on disk (file-backed pages, dropped under pressure instead of swapped).

Layout: one folder per entry, holding one NumPy ``.npy`` file per named field (all with the same number of
rows) and ``manifest.json`` (format, row count, each field's dtype, shape and size, ``complete``). The
folder is built under a temporary name beside its final one (:func:`foodvision.atomic.temporary_name`:
unique per process) and renamed when complete, so an interrupted build is never used; a finished entry
whose files were damaged later (truncated, replaced) fails :func:`open_store`'s checks, naming the file.

``.npy`` rather than ``torch.save(mmap=True)`` or safetensors: it is written incrementally (the header is
rewritten in place at the end, NumPy pads it for that), any tool reads it (``np.load(mmap_mode="r")``),
and measured reads of shuffled batches cost the same as ``torch.from_file`` maps (see README, memory).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from foodvision.atomic import temporary_name
from foodvision.data.sampling import EpochShuffleSampler
from foodvision.errors import ToolError

STORE_FORMAT = 1
MANIFEST = "manifest.json"
# bfloat16 rows (bf16 autocast outputs) are kept as their 16 bits under this dtype, and the manifest says so.
BFLOAT16_BITS = np.dtype([("bfloat16", "<u2")])


class StoreError(ToolError):
    """A store entry that is incomplete or damaged (``path`` names the file at fault)."""

    def __init__(self, path: str | os.PathLike[str], reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def _as_numpy(value: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().contiguous()
        if value.dtype == torch.bfloat16:  # NumPy has no bfloat16: its bits, read back as bfloat16
            return value.view(torch.int16).numpy().view(BFLOAT16_BITS)
        return value.numpy()
    return np.ascontiguousarray(value)


def _np_dtype(dtype: Any) -> np.dtype:
    if isinstance(dtype, torch.dtype):
        return BFLOAT16_BITS if dtype == torch.bfloat16 else torch.empty(0, dtype=dtype).numpy().dtype
    return np.dtype(dtype)


def _tensor(array: np.ndarray) -> torch.Tensor:
    if array.dtype == BFLOAT16_BITS:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def _remove_stale_temporaries(path: Path) -> None:
    """Temporary folders of ``path`` left by builds that were killed (their process is gone)."""
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        try:
            pid = int(stale.name[len(path.name) + 2 :].split(".")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(stale, ignore_errors=True)
        except (ValueError, OSError):
            continue


def _header(dtype: np.dtype, shape: tuple[int, ...]) -> dict[str, Any]:
    return {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}


class _FieldWriter:
    """Rows of one field appended to a ``.npy`` file whose header is rewritten with the final row count."""

    def __init__(self, path: Path, dtype: np.dtype, row_shape: tuple[int, ...]):
        self.path, self.dtype, self.row_shape, self.rows = path, np.dtype(dtype), tuple(row_shape), 0
        self.handle = open(path, "wb")  # noqa: SIM115 - closed in close()
        np.lib.format.write_array_header_1_0(self.handle, _header(self.dtype, (0, *self.row_shape)))
        self.offset = self.handle.tell()

    def append(self, rows: np.ndarray) -> None:
        if tuple(rows.shape[1:]) != self.row_shape:
            raise ValueError(f"{self.path.name}: rows of shape {rows.shape[1:]}, expected {self.row_shape}")
        self.handle.write(np.ascontiguousarray(rows, dtype=self.dtype).tobytes())
        self.rows += len(rows)

    def widen(self, dtype: np.dtype) -> None:
        """Store every row (those written included) as ``dtype``: the file is rewritten chunk by chunk."""
        self.handle.flush()
        old = np.memmap(self.path, self.dtype, "r", self.offset, (self.rows, *self.row_shape))
        wide = self.path.with_name(self.path.name + ".wide")
        with open(wide, "wb") as out:
            np.lib.format.write_array_header_1_0(out, _header(np.dtype(dtype), (0, *self.row_shape)))
            step = max(1, (64 << 20) // max(1, old[:1].nbytes))
            for start in range(0, self.rows, step):
                out.write(np.asarray(old[start : start + step], dtype=dtype).tobytes())
        del old
        self.handle.close()
        os.replace(wide, self.path)
        self.dtype = np.dtype(dtype)
        self.handle = open(self.path, "r+b")  # noqa: SIM115
        self.handle.seek(0, os.SEEK_END)

    def close(self) -> dict[str, Any]:
        """Rewrite the header with the row count (same length: NumPy pads the first axis for growth)."""
        self.handle.seek(0)
        np.lib.format.write_array_header_1_0(self.handle, _header(self.dtype, (self.rows, *self.row_shape)))
        if self.handle.tell() != self.offset:
            raise RuntimeError(f"{self.path.name}: the .npy header changed length")
        self.handle.close()
        return {
            "file": self.path.name,
            "dtype": self.dtype.str,
            "shape": [self.rows, *self.row_shape],
            "bytes": self.path.stat().st_size,
        }


class StoreWriter:
    """Append rows of named fields (:meth:`append`), then :meth:`commit` to make the entry appear at
    ``path`` in one rename. As a context manager: commits on success, removes everything on an error."""

    def __init__(self, path: str | os.PathLike[str], meta: Mapping[str, Any] | None = None):
        self.path = Path(path)
        self.meta = dict(meta or {})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(self.path)
        self.temporary = temporary_name(self.path)
        self.temporary.mkdir()
        self.fields: dict[str, _FieldWriter] = {}

    @property
    def rows(self) -> int:
        return min((f.rows for f in self.fields.values()), default=0)

    def dtype(self, name: str) -> np.dtype | None:
        return self.fields[name].dtype if name in self.fields else None

    def append(self, dtypes: Mapping[str, Any] | None = None, **rows: np.ndarray | torch.Tensor) -> None:
        """One batch of rows for every field (the same count each). A field's first batch fixes its dtype
        (``dtypes[name]`` when given, else the batch's) and row shape."""
        arrays = {name: _as_numpy(value) for name, value in rows.items()}
        if len({len(a) for a in arrays.values()}) > 1:
            raise ValueError(f"fields of different lengths: { {k: len(a) for k, a in arrays.items()} }")
        if self.fields and set(arrays) != set(self.fields):
            raise ValueError(f"fields {sorted(arrays)}, expected {sorted(self.fields)}")
        for name, array in arrays.items():
            if name not in self.fields:
                wanted = (dtypes or {}).get(name)
                dtype = _np_dtype(wanted) if wanted is not None else array.dtype
                self.fields[name] = _FieldWriter(self.temporary / f"{name}.npy", dtype, array.shape[1:])
            self.fields[name].append(array)

    def widen(self, name: str, dtype: Any) -> None:
        self.fields[name].widen(_np_dtype(dtype))

    def commit(self) -> Store:
        """Close the files, write the manifest (the completeness marker) and rename the folder into place.
        Where another process committed the same entry first, its entry is kept and this one dropped."""
        if not self.fields:
            raise ValueError(f"{self.path}: nothing was written")
        manifest = {
            "format": STORE_FORMAT,
            "complete": True,
            "rows": self.rows,
            "fields": {name: field.close() for name, field in self.fields.items()},
            "meta": self.meta,
        }
        with open(self.temporary / MANIFEST, "w", encoding="utf-8") as handle:
            json.dump(manifest, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        for field in self.fields.values():
            with contextlib.suppress(OSError):
                fd = os.open(field.path, os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
        try:
            os.rename(self.temporary, self.path)
        except OSError:
            if not self.path.exists():
                raise
            try:  # committed meanwhile by another process: keep a valid one, replace a damaged one
                existing = Store(self.path)
            except StoreError:
                remove_store(self.path)
                os.rename(self.temporary, self.path)
            else:
                shutil.rmtree(self.temporary, ignore_errors=True)
                return existing
        return Store(self.path)

    def abort(self) -> None:
        for field in self.fields.values():
            with contextlib.suppress(OSError):
                field.handle.close()
        shutil.rmtree(self.temporary, ignore_errors=True)

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, kind: Any, value: Any, traceback: Any) -> None:
        if kind is not None:
            self.abort()


def remove_store(path: str | os.PathLike[str]) -> None:
    """Delete an entry (renamed aside first, so that a reader never sees half of it)."""
    path = Path(path)
    aside = temporary_name(path)
    with contextlib.suppress(OSError):  # gone already, or in a read-only folder: left as it is
        os.rename(path, aside)
        shutil.rmtree(aside, ignore_errors=True)


class Store:
    """A committed entry, checked on opening (manifest complete, every file of its recorded size and
    header), its fields memory-mapped read-only on first use. Pickles as its path: a DataLoader worker
    maps the files itself instead of receiving a copy of the arrays."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except FileNotFoundError as error:
            raise StoreError(manifest_path, "missing (an interrupted build?)") from error
        except (OSError, ValueError) as error:
            raise StoreError(manifest_path, f"unreadable ({error})") from error
        if manifest.get("format") != STORE_FORMAT or manifest.get("complete") is not True:
            raise StoreError(manifest_path, f"not a complete store of format {STORE_FORMAT}")
        self.rows = int(manifest["rows"])
        self.meta: dict[str, Any] = manifest.get("meta") or {}
        self.specs: dict[str, dict[str, Any]] = manifest["fields"]
        for spec in self.specs.values():
            self._check(spec)
        self._arrays: dict[str, np.ndarray] = {}

    def _check(self, spec: Mapping[str, Any]) -> None:
        file = self.path / spec["file"]
        try:
            size = file.stat().st_size
            with open(file, "rb") as handle:
                version = np.lib.format.read_magic(handle)
                read_header = (
                    np.lib.format.read_array_header_1_0
                    if version == (1, 0)
                    else np.lib.format.read_array_header_2_0
                )
                shape, fortran, dtype = read_header(handle)
                offset = handle.tell()
        except FileNotFoundError as error:
            raise StoreError(file, "missing") from error
        except (OSError, ValueError) as error:
            raise StoreError(
                file, f"unreadable .npy header, truncated or not a .npy file ({error})"
            ) from error
        expected = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if list(shape) != list(spec["shape"]) or dtype.str != spec["dtype"] or fortran:
            raise StoreError(file, f"header {dtype.str}{list(shape)} differs from the manifest's")
        if size != expected or size != spec["bytes"]:
            raise StoreError(file, f"{size:,} bytes instead of {expected:,} (truncated?)")

    def __getstate__(self) -> dict[str, Any]:
        return {"path": str(self.path)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"])  # type: ignore[misc]

    def __len__(self) -> int:
        return self.rows

    @property
    def fields(self) -> list[str]:
        return list(self.specs)

    @property
    def nbytes(self) -> int:
        return sum(int(spec["bytes"]) for spec in self.specs.values())

    def array(self, name: str) -> np.ndarray:
        """The field as a read-only memory map (no data read until rows are indexed)."""
        if name not in self._arrays:
            self._arrays[name] = np.load(self.path / self.specs[name]["file"], mmap_mode="r")
        return self._arrays[name]

    def read(self, name: str, indices: np.ndarray | list[int] | slice) -> torch.Tensor:
        """Rows ``indices`` of a field as a tensor of their own (a copy of those rows only)."""
        array = self.array(name)
        if isinstance(indices, slice):
            return _tensor(np.array(array[indices]))
        indices = np.asarray(indices, dtype=np.int64)
        if (
            len(indices) > 1
            and indices[-1] - indices[0] == len(indices) - 1
            and np.all(np.diff(indices) == 1)
        ):
            return _tensor(np.array(array[indices[0] : indices[-1] + 1]))  # a contiguous run: one slice
        return _tensor(np.asarray(array[indices]))

    def load(self, name: str) -> torch.Tensor:
        """The whole field in memory (tests and small entries)."""
        return self.read(name, slice(None))

    def chunks(self, name: str, rows: int) -> Iterator[torch.Tensor]:
        for start in range(0, self.rows, rows):
            yield self.read(name, slice(start, start + rows))


def open_store(path: str | os.PathLike[str]) -> Store | None:
    """The entry at ``path``, ``None`` where there is none; :class:`StoreError` where it is damaged."""
    path = Path(path)
    if not path.exists():
        return None
    if not path.is_dir():
        raise StoreError(path, "not a store folder")
    return Store(path)


# ---- reading in shuffled order without a random-read storm ---------------------------------------------
# Measured on this project's machine (README, cached features): shuffled 64-row batches from a memory-mapped
# file four times larger than the memory the reader may use ran at 4 MB/s (0.75 s a batch of 48 KB rows);
# in shuffled 8 MB chunks mixed 8 at a time, at 289 MB/s (11 ms). Wider windows read randomly within
# them: 4 MB x 16 chunks 29 ms, 4 MB x 64 chunks 0.57 s a batch, 16 MB x 4 chunks 16 ms.
CHUNK_BYTES = 8 << 20
WINDOW_BYTES = 64 << 20


def _chunking(
    row_bytes: int, chunk_bytes: int | None = None, window_bytes: int | None = None
) -> tuple[int, int]:
    """(rows per chunk, chunks per window); the sizes default to :data:`CHUNK_BYTES` and :data:`WINDOW_BYTES`."""
    row_bytes = max(1, int(row_bytes))
    chunk_rows = max(1, (chunk_bytes or CHUNK_BYTES) // row_bytes)
    return chunk_rows, max(1, (window_bytes or WINDOW_BYTES) // (chunk_rows * row_bytes))


def mixed_row_order(length: int) -> list[int]:
    """The fixed shuffled order (seed 0) in which a training split's rows are written to a store. Photos
    are listed class by class, so rows written in that order would give every chunk of
    :func:`quasi_random_order` a single class, and each window a handful: class-correlated batches (measured
    on food101-mini's stage 2, 160 MB of maps: val/acc fell from 0.76 to 0.36 in its first epoch)."""
    return torch.randperm(length, generator=torch.Generator().manual_seed(0)).tolist()


def quasi_random_order(
    length: int,
    generator: torch.Generator,
    row_bytes: int,
    chunk_bytes: int | None = None,
    window_bytes: int | None = None,
) -> torch.Tensor:
    """A shuffled order of ``length`` rows that reads a file in contiguous chunks (FFCV's quasi-random
    order): the chunks (``chunk_bytes`` of rows each) in random order, and the rows of each window of
    consecutive chunks (``window_bytes`` in all, what the page cache has to hold at a time) shuffled
    among themselves. Where every row fits in one window, simply ``torch.randperm``."""
    chunk_rows, window_chunks = _chunking(row_bytes, chunk_bytes, window_bytes)
    if length <= chunk_rows * window_chunks:
        return torch.randperm(length, generator=generator)
    chunks = torch.randperm((length + chunk_rows - 1) // chunk_rows, generator=generator)
    parts = []
    for start in range(0, len(chunks), window_chunks):
        rows = torch.cat(
            [
                torch.arange(c * chunk_rows, min((c + 1) * chunk_rows, length))
                for c in chunks[start : start + window_chunks].tolist()
            ]
        )
        parts.append(rows[torch.randperm(len(rows), generator=generator)])
    return torch.cat(parts)


class QuasiRandomSampler(EpochShuffleSampler):
    """:class:`EpochShuffleSampler` (the order a function of (seed, epoch), so resume stays exact) over
    rows of ``row_bytes`` stored in files, read in :func:`quasi_random_order`. Where the rows fit in one
    window it is the very order of :class:`EpochShuffleSampler`."""

    def __init__(self, length: int, seed: int, row_bytes: int):
        super().__init__(length, seed)
        self.row_bytes = int(row_bytes)

    def __iter__(self) -> Iterator[int]:
        chunk_rows, window_chunks = _chunking(self.row_bytes)
        if self.length <= chunk_rows * window_chunks:
            return super().__iter__()
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(quasi_random_order(self.length, generator, self.row_bytes).tolist())

"""The per-file cache + parallel map under the image check and the fingerprints (foodvision.data.filemap)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from foodvision.data.filemap import cached_map

CALLS: list[str] = []


def size_of(path: str) -> int:
    """A stand-in for an expensive per-file function (runs in-process for a few files: CALLS sees it)."""
    CALLS.append(path)
    return os.path.getsize(path)


def _map(paths: list[str], cache: Path) -> dict[str, int]:
    return cached_map(paths, size_of, encode=lambda n: [n], decode=_size, cache_file=cache, progress=False)


def _size(fields: list) -> int:
    (size,) = fields
    if not isinstance(size, int):
        raise TypeError("not a size")
    return size


def _files(folder: Path, count: int) -> list[str]:
    folder.mkdir()
    for i in range(count):
        (folder / f"{i}.bin").write_bytes(b"x" * (i + 1))
    return [str(folder / f"{i}.bin") for i in range(count)]


def test_each_file_is_computed_once_per_change(tmp_path: Path) -> None:
    paths, cache = _files(tmp_path / "files", 4), tmp_path / "cache" / "sizes.json"
    CALLS.clear()
    assert _map(paths, cache) == {p: i + 1 for i, p in enumerate(paths)}
    assert sorted(CALLS) == sorted(paths)
    CALLS.clear()
    assert _map(paths, cache) == {p: i + 1 for i, p in enumerate(paths)} and CALLS == []
    Path(paths[2]).write_bytes(b"changed, longer")
    assert _map(paths, cache)[paths[2]] == len(b"changed, longer") and CALLS == [paths[2]]


def test_an_entry_of_another_layout_is_computed_again_not_misread(tmp_path: Path) -> None:
    paths, cache = _files(tmp_path / "files", 2), tmp_path / "sizes.json"
    _map(paths, cache)
    entries = json.loads(cache.read_text())
    entries[paths[0]] = [*entries[paths[0]][:2], {"size": 99}]  # right stamp, foreign fields
    entries[paths[1]] = entries[paths[1]][:2]  # no fields at all
    cache.write_text(json.dumps(entries))
    CALLS.clear()
    assert _map(paths, cache) == {paths[0]: 1, paths[1]: 2} and sorted(CALLS) == sorted(paths)


def test_a_vanished_file_is_left_out_and_other_files_entries_are_kept(tmp_path: Path) -> None:
    paths, cache = _files(tmp_path / "files", 3), tmp_path / "sizes.json"
    _map(paths[:2], cache)  # one subset of the folder ...
    Path(paths[1]).unlink()
    assert _map(paths[1:], cache) == {paths[2]: 3}  # ... then another, with a file gone
    entries = json.loads(cache.read_text())
    assert set(entries) == {paths[0], paths[1], paths[2]}  # paths[1]'s old entry no longer matches a file
    CALLS.clear()
    assert _map([paths[0], paths[2]], cache) == {paths[0]: 1, paths[2]: 3} and CALLS == []

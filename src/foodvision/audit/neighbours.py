"""Near-duplicate pairs without an N x N matrix, and the groups they join into.

Two searches, each linear in memory:

* perceptual hashes (64-bit pHash of :mod:`foodvision.data.fingerprints`) within ``max_distance`` bits, by
  multi-index hashing: cut into ``max_distance + 1`` pieces, two hashes that close agree exactly on at least
  one piece (pigeonhole), so only hashes sharing a piece are compared. Catches resized and re-encoded copies
  (distance 0-2 on food101-mini) that the backbone's features blur (cosine 0.80-0.90).
* cosine similarity of the backbone's pooled features, top-k neighbours per row, in row chunks of a bounded
  size (``chunk_bytes`` of similarities at a time). Catches crops and bursts (cosine >= 0.93 on food101-mini
  were all the same shot).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)

LARGEST_BUCKET = 4096  # hashes sharing one piece beyond this are compared only to the bucket's first 4096


def phash_pairs(hashes: Sequence[str], max_distance: int) -> list[tuple[int, int, int]]:
    """``(i, j, distance)`` with ``i < j`` for every two hex hashes (``""``: none) at most ``max_distance``
    bits apart."""
    valid = np.array([i for i, h in enumerate(hashes) if h], dtype=np.int64)
    if len(valid) < 2 or max_distance < 0:
        return []
    values = np.array([int(hashes[i], 16) for i in valid], dtype=np.uint64)
    pieces = max_distance + 1
    bounds = np.linspace(0, 64, pieces + 1).astype(int)
    found: set[tuple[int, int]] = set()
    for low, high in zip(bounds[:-1], bounds[1:], strict=True):
        mask = np.uint64((1 << int(high - low)) - 1)
        keys = (values >> np.uint64(low)) & mask
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
        ends = np.r_[starts[1:], len(order)]
        for start, end in zip(starts, ends, strict=True):
            if end - start < 2:
                continue
            members = order[start : min(end, start + LARGEST_BUCKET)]
            if end - start > LARGEST_BUCKET:
                log.info("%d perceptual hashes share one piece: comparing %d", end - start, LARGEST_BUCKET)
            a, b = np.triu_indices(len(members), 1)
            distance = np.bitwise_count(values[members[a]] ^ values[members[b]])
            close = distance <= max_distance
            for x, y in zip(members[a[close]], members[b[close]], strict=True):
                found.add((int(min(x, y)), int(max(x, y))))
    out = []
    for x, y in sorted(found):
        distance = int(np.bitwise_count(values[x] ^ values[y]))
        out.append((int(valid[x]), int(valid[y]), distance))
    return out


def normalise(features: np.ndarray) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    return torch.nn.functional.normalize(tensor, dim=1)


def cosine_pairs(
    features: np.ndarray,
    threshold: float,
    k: int = 5,
    valid: np.ndarray | None = None,
    chunk_bytes: int = 256 << 20,
) -> list[tuple[int, int, float]]:
    """``(i, j, cosine)`` with ``i < j`` where ``j`` is among ``i``'s ``k`` most similar rows (or the other
    way round) and the cosine is at least ``threshold``. Similarities are computed ``chunk_bytes`` at a time
    (rows x N floats), never as one N x N matrix."""
    n = len(features)
    if n < 2:
        return []
    unit = normalise(features)
    if valid is not None:
        unit[~torch.from_numpy(np.asarray(valid, dtype=bool))] = 0.0  # unreadable: no neighbours
    k = min(k, n - 1)
    rows = max(1, min(n, chunk_bytes // (4 * n)))
    found: dict[tuple[int, int], float] = {}
    with torch.inference_mode():
        for start in range(0, n, rows):
            block = unit[start : start + rows] @ unit.T
            index = torch.arange(start, min(start + rows, n))
            block[index - start, index] = -2.0  # not its own neighbour
            values, columns = block.topk(k, dim=1)
            for r, c in zip(*torch.nonzero(values >= threshold, as_tuple=True), strict=True):
                i, j = int(index[r]), int(columns[r, c])
                found[(min(i, j), max(i, j))] = float(values[r, c])
    return sorted((i, j, s) for (i, j), s in found.items())


def join_pairs(n: int, pairs: Iterable[tuple[int, int]]) -> list[list[int]]:
    """Connected components (two or more members) of the pairs over ``0..n-1``, each sorted, in order of
    their first member (union-find)."""
    parent = list(range(n))

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, j in pairs:
        a, b = root(i), root(j)
        if a != b:
            parent[max(a, b)] = min(a, b)
    components: dict[int, list[int]] = {}
    for x in range(n):
        components.setdefault(root(x), []).append(x)
    return sorted((sorted(c) for c in components.values() if len(c) > 1), key=lambda c: c[0])

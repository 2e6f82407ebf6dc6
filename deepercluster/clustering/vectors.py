"""Vectors of a round read shard by shard: the zarr arrays the cluster stage reads, and a streamed k-means source.

Row ``i`` of ``features.zarr`` (and of ``clusters/whitened.zarr``) is image ``i``; image shard ``s`` is zarr shard
``s`` (rows ``[s * S, (s + 1) * S)``). A :class:`ShardedVectors` holds the member rows of one k-means unit (all
rows, or one super-cluster's) as per-shard row lists; it reads shards ahead in a few threads and hands k-means
blocks of at least ``min_rows`` rows, so memory stays bounded by a few shards whatever the number of rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import zarr

from deepercluster.errors import StoreError
from deepercluster.prefetch import read_ahead
from deepercluster.store import RunStore, round_dir

MIN_BLOCK_ROWS = 1 << 14  # rows handed to one assignment call when streaming (more when a shard is larger)


def open_round_features(store: RunStore, r: int) -> zarr.Array:
    """The N x D float16 features of round ``r``. Opened here, not through ``deepercluster.features`` (whose package
    imports torch: ~0.5 GB of resident memory that a streamed clustering under a memory budget cannot spare); the
    layout is that of ``deepercluster.features.array`` (a group ``features.zarr`` holding the array ``features``)."""
    rel = f"{round_dir(r)}/features.zarr"
    opts = store.storage_options or None
    if store.exists(f"{rel}/features/zarr.json"):
        return zarr.open_array(store.url(f"{rel}/features"), mode="r", storage_options=opts)
    if store.exists(f"{rel}/zarr.json"):
        node = zarr.open(store.url(rel), mode="r", storage_options=opts)
        if isinstance(node, zarr.Array):
            return node
    raise StoreError(f"{store.url(rel)} is missing: run the extract stage of round {r} first")


def shard_rows(array: zarr.Array) -> int:
    """Rows per zarr shard (the write unit), i.e. per image shard."""
    return int((array.shards or array.chunks)[0])


def shard_ranges(n: int, rows_per_shard: int) -> list[tuple[int, int]]:
    return [(lo, min(lo + rows_per_shard, n)) for lo in range(0, n, rows_per_shard)]


@dataclass
class ShardMembers:
    """Member rows of one shard: ``rows`` are local row numbers (sorted), None for every row of the shard."""

    shard: int
    lo: int
    hi: int
    rows: np.ndarray | None

    @property
    def count(self) -> int:
        return self.hi - self.lo if self.rows is None else len(self.rows)


def members_by_shard(n: int, rows_per_shard: int, ids: np.ndarray | None = None) -> list[ShardMembers]:
    """Per-shard member lists of the sorted global rows ``ids`` (None: every row), shards without members left out."""
    out = []
    for s, (lo, hi) in enumerate(shard_ranges(n, rows_per_shard)):
        if ids is None:
            out.append(ShardMembers(s, lo, hi, None))
            continue
        a, b = np.searchsorted(ids, [lo, hi])
        if b > a:
            out.append(ShardMembers(s, lo, hi, (ids[a:b] - lo).astype(np.int64)))
    return out


class ShardedVectors:
    """Member rows of a zarr array, read shard by shard (``threads`` shards in flight) as a k-means source."""

    def __init__(self, array: zarr.Array, members: list[ShardMembers], threads: int = 2,
                 min_rows: int | None = None):
        self.array = array
        self.members = members
        self.n = sum(m.count for m in members)
        self.dim = int(array.shape[1])
        self.threads = max(1, threads)
        self.min_rows = MIN_BLOCK_ROWS if min_rows is None else min_rows
        self.starts = np.cumsum([0] + [m.count for m in members])[:-1]

    def read(self, m: ShardMembers) -> np.ndarray:
        block = np.asarray(self.array[m.lo : m.hi], dtype=np.float32)
        return block if m.rows is None else np.ascontiguousarray(block[m.rows])

    def shard_blocks(self) -> Iterator[tuple[ShardMembers, np.ndarray]]:
        """(members, their rows) shard by shard in order, reading up to ``threads`` shards ahead."""
        yield from read_ahead(self.read, self.members, depth=self.threads, threads=self.threads, name="shard-reader")

    def blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        parts: list[np.ndarray] = []
        start = 0
        for _, x in self.shard_blocks():
            parts.append(x)
            if sum(len(p) for p in parts) >= self.min_rows:
                block = parts[0] if len(parts) == 1 else np.concatenate(parts)
                yield start, block
                start += len(block)
                parts = []
        if parts:
            yield start, np.concatenate(parts)

    def take(self, positions: np.ndarray) -> np.ndarray:
        out = np.empty((len(positions), self.dim), dtype=np.float32)
        shard_of = np.searchsorted(self.starts, positions, side="right") - 1
        for i in np.unique(shard_of):
            m = self.members[i]
            sel = np.flatnonzero(shard_of == i)
            local = positions[sel] - self.starts[i]
            rows = local if m.rows is None else m.rows[local]
            out[sel] = np.asarray(self.array.get_orthogonal_selection((m.lo + rows, slice(None))), dtype=np.float32)
        return out

    def gather(self) -> np.ndarray:
        """Every member row in memory (the in-memory path), read ``threads`` shards at a time."""
        out = np.empty((self.n, self.dim), dtype=np.float32)
        for start, (_, x) in zip(self.starts, self.shard_blocks(), strict=True):
            out[start : start + len(x)] = x
        return out

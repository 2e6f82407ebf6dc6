"""Vectors of a round read shard by shard: the zarr arrays the cluster stage reads, and a streamed k-means source.

Row ``i`` of ``features.zarr`` (and of ``clusters/whitened.zarr``) is image ``i``; image shard ``s`` is zarr shard
``s`` (rows ``[s * S, (s + 1) * S)``). A :class:`ShardedVectors` holds the member rows of one k-means unit (all
rows, or one super-cluster's) as per-shard row lists; it reads shards ahead in a few threads and hands k-means
blocks of at least ``min_rows`` rows, so memory stays bounded by a few shards whatever the number of rows.

Reading is checked: :func:`read_rows` turns a library error (a truncated or zeroed zarr shard fails zarr's index
checksum) into a one-line StoreError naming the shard's object, its unit and the command that recomputes it, and
:func:`raise_if_missing` does the same for rows that read as NaN (the fill value) because their shard's object is
gone. A NaN row whose shard is there is a real non-finite value (the caller's DataError).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import zarr

from deepercluster.errors import DataError, DeeperClusterError, StoreError
from deepercluster.paths import zarr_shard_rel
from deepercluster.prefetch import read_ahead
from deepercluster.store import READ_ERRORS, RunStore, round_dir

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


def read_rows(store: RunStore, array: zarr.Array, rel: str, lo: int, hi: int,
              rows: np.ndarray | None = None) -> np.ndarray:
    """Rows ``[lo, hi)`` of the sharded 2-D array at ``rel`` (or, given ``rows``, those global rows, sorted, all in
    ``[lo, hi)``), as stored. A shard that cannot be read is a one-line StoreError naming its object."""
    try:
        if rows is None:
            return array[lo:hi]
        return array.get_orthogonal_selection((rows, slice(None)))
    except DeeperClusterError:
        raise
    except READ_ERRORS as err:
        raise _unreadable_shard(store, array, rel, lo, hi, err) from None


def _unreadable_shard(store: RunStore, array: zarr.Array, rel: str, lo: int, hi: int, err: BaseException) \
        -> StoreError:
    """The error naming the first shard of ``[lo, hi)`` that fails to read on its own."""
    per = shard_rows(array)
    n = int(array.shape[0])
    for s in range(lo // per, (max(hi, lo + 1) - 1) // per + 1):
        try:
            array[s * per : min((s + 1) * per, n)]
        except READ_ERRORS as one:
            return store.unreadable(zarr_shard_rel(rel, s), one)
    return store.unreadable(rel, err)


def raise_if_missing(store: RunStore, rel: str, shards: Iterator[int] | list[int]) -> None:
    """A one-line StoreError naming the first of ``shards`` whose object is missing from the array at ``rel``
    (what rows that read as NaN, the fill value, mean); nothing when they are all there."""
    for s in sorted({int(s) for s in shards}):
        obj = zarr_shard_rel(rel, s)
        if not store.exists(obj):
            raise store._missing(obj)


def read_finite(store: RunStore, array: zarr.Array, rel: str, rows: np.ndarray, what: str) -> np.ndarray:
    """The global ``rows`` (sorted) of the array at ``rel`` as float32, checked: missing shards and unreadable
    ones are StoreErrors naming them, other non-finite rows a DataError naming ``what``."""
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) == 0:
        return np.zeros((0, int(array.shape[1])), dtype=np.float32)
    x = np.asarray(read_rows(store, array, rel, int(rows[0]), int(rows[-1]) + 1, rows), dtype=np.float32)
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise_if_missing(store, rel, rows[bad] // shard_rows(array))
        raise DataError(f"{what} in {store.url(rel)} holds non-finite values (rows {rows[bad][:5].tolist()}): "
                        "recompute the stage that wrote it (--force)")
    return x


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
                 min_rows: int | None = None, store: RunStore | None = None, rel: str | None = None):
        self.array = array
        self.store, self.rel = store, rel  # given: reads are checked (a missing or unreadable shard is an error)
        self.members = members
        self.n = sum(m.count for m in members)
        self.dim = int(array.shape[1])
        self.threads = max(1, threads)
        self.min_rows = MIN_BLOCK_ROWS if min_rows is None else min_rows
        self.starts = np.cumsum([0] + [m.count for m in members])[:-1]

    def read(self, m: ShardMembers) -> np.ndarray:
        if self.store is None or self.rel is None:
            block = np.asarray(self.array[m.lo : m.hi], dtype=np.float32)
        else:
            block = np.asarray(read_rows(self.store, self.array, self.rel, m.lo, m.hi), dtype=np.float32)
            if not np.isfinite(block).all():
                raise_if_missing(self.store, self.rel, [m.shard])
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
            if self.store is None or self.rel is None:
                out[sel] = np.asarray(self.array.get_orthogonal_selection((m.lo + rows, slice(None))), dtype=np.float32)
            else:
                out[sel] = read_rows(self.store, self.array, self.rel, m.lo, m.hi, m.lo + rows)
        return out

    def gather(self) -> np.ndarray:
        """Every member row in memory (the in-memory path), read ``threads`` shards at a time."""
        out = np.empty((self.n, self.dim), dtype=np.float32)
        for start, (_, x) in zip(self.starts, self.shard_blocks(), strict=True):
            out[start : start + len(x)] = x
        return out

"""Where each image of a run is read from, looked up by ``image_id`` without a Python list of every URI.

The train stage draws batches from all N images; a list of N URI strings costs each rank and each loader worker
~100 bytes per image (10 GB at 96M). :class:`ImageLocations` instead reads a node-local copy of one URI column
(see :mod:`deepercluster.local_cache`), made once per node by streaming the store's parquet row groups: the
``n + 1`` int64 end offsets of the URIs' UTF-8 bytes, then the bytes. A lookup is two positioned reads
(``os.pread``), not a memory map: mapped pages (and the kernel's read-around of each fault) would count in every
rank's resident memory, ~30 bytes per image touched, where two reads per image cost nothing next to its decoding.
The object pickles as a few paths.

The column is what :func:`~deepercluster.data.repack.image_uris` reads: the packed index's ``uri`` (a tar member
reference) when the run's images are repacked, the manifest's otherwise. Both files are written in ``image_id``
order, which is checked while streaming: row ``i`` is image ``i``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from deepercluster.errors import StoreError
from deepercluster.local_cache import build_once, cache_path
from deepercluster.paths import MANIFEST, PACKED_INDEX
from deepercluster.store import RunStore

CHECK_ROWS = 1 << 16  # ids compared at a time: bounded temporaries whatever the row group size


def ids_are_range(ids: np.ndarray, start: int) -> bool:
    """Whether ``ids`` are ``start, start + 1, ...``, compared block by block (no temporary of ``len(ids)``)."""
    for lo in range(0, len(ids), CHECK_ROWS):
        block = ids[lo : lo + CHECK_ROWS]
        if not np.array_equal(block, np.arange(start + lo, start + lo + len(block))):
            return False
    return True


def ordered_rows(store: RunStore, rel: str) -> int | None:
    """The rows of parquet ``rel`` when its ``image_id`` column is ``0..rows-1`` in row order, else None; streamed
    one row group at a time."""
    rows = 0
    for table in store.iter_parquet_tables(rel, ["image_id"]):
        for chunk in table.column("image_id").chunks:
            if not ids_are_range(chunk.to_numpy(zero_copy_only=False), rows):
                return None
            rows += len(chunk)
    return rows


def manifest_images(store: RunStore) -> int:
    """N, the number of images, once the manifest's image_ids are checked to be ``0..N-1`` in row order."""
    n = ordered_rows(store, MANIFEST)
    if n is None:
        raise StoreError(f"{store.url(MANIFEST)}: the manifest image_ids are not 0..N-1 in order: rerun the shard "
                         "stage")
    return n


def uri_source(store: RunStore, n: int) -> str:
    """The parquet file whose ``uri`` column row ``i`` is where image ``i`` is read from: the packed index when the
    run's images are repacked (checked to cover images ``0..n-1`` in order), else the manifest."""
    if not store.exists(PACKED_INDEX):
        return MANIFEST
    packed = ordered_rows(store, PACKED_INDEX)
    if packed is None or packed < n:
        raise StoreError(f"{store.url(PACKED_INDEX)} does not cover every image of the manifest: rerun the shard "
                         "stage with --force")
    return PACKED_INDEX


HEADER = 8  # the file starts with n (int64), then n + 1 offsets (int64), then the URIs' bytes


def _write_uris(store: RunStore, rel: str, n: int, path: Path) -> None:
    """The first ``n`` URIs of ``rel``: offsets and bytes, one row group at a time (Arrow's own buffers)."""
    data_at = HEADER + 8 * (n + 1)
    done, written = 0, 0
    with open(path, "wb") as f:
        f.write(np.array([n, 0], dtype=np.int64).tobytes())  # n, and the first offset
        for table in store.iter_parquet_tables(rel, ["uri"]):
            if done >= n:
                break
            col = table.column("uri").slice(0, n - done).cast(pa.large_string()).combine_chunks()
            if col.null_count:
                raise StoreError(f"{store.url(rel)} has images without a URI: rerun the shard stage with --force")
            _, offsets, data = col.buffers()
            ends = np.frombuffer(offsets, dtype=np.int64)[col.offset : col.offset + len(col) + 1]
            f.seek(HEADER + 8 * (done + 1))
            f.write((ends[1:] - ends[0] + written).tobytes())
            f.seek(data_at + written)
            f.write(memoryview(data)[ends[0] : ends[-1]])
            done += len(col)
            written += int(ends[-1] - ends[0])
    if done < n:
        raise StoreError(f"{store.url(rel)} holds fewer than {n} image URIs: rerun the shard stage with --force")


class ImageLocations(Sequence[str]):
    """``locations[image_id]``: the URI image ``image_id`` is read from, exactly as ``image_uris`` gives it.

    Holds paths only; the node-local file is opened on the first lookup in each process (each DataLoader worker
    reads the same file)."""

    def __init__(self, store: RunStore, source: str, n: int, path: str | os.PathLike[str]):
        self.store, self.source, self.n, self.path = store, source, n, os.fspath(path)
        self._fd: int | None = None

    def _file(self) -> int:
        if self._fd is None:
            if not os.path.exists(self.path):  # a node-local file cleaned up since: made again from the store
                build_once(Path(self.path), lambda tmp: _write_uris(self.store, self.source, self.n, tmp))
            self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def __del__(self) -> None:
        if self._fd is not None:
            os.close(self._fd)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, row: int) -> str:  # type: ignore[override]  (no slices: a lookup is of one image)
        row = int(row)
        if not -self.n <= row < self.n:
            raise IndexError(f"image {row} is not in 0..{self.n - 1}")
        fd, row = self._file(), row % self.n
        start, end = np.frombuffer(os.pread(fd, 16, HEADER + 8 * row), dtype=np.int64)
        return os.pread(fd, int(end - start), HEADER + 8 * (self.n + 1) + int(start)).decode()

    def __iter__(self) -> Iterator[str]:
        fd, data_at = self._file(), HEADER + 8 * (self.n + 1)
        for lo in range(0, self.n, CHECK_ROWS):
            hi = min(lo + CHECK_ROWS, self.n)
            ends = np.frombuffer(os.pread(fd, 8 * (hi - lo + 1), HEADER + 8 * lo), dtype=np.int64)
            blob = os.pread(fd, int(ends[-1] - ends[0]), data_at + int(ends[0]))
            rel = ends - ends[0]
            yield from (blob[rel[i] : rel[i + 1]].decode() for i in range(hi - lo))

    def take(self, rows: Sequence[int] | np.ndarray) -> list[str]:
        """The URIs of ``rows`` (one batch's images)."""
        return [self[int(i)] for i in np.asarray(rows)]

    def __getstate__(self) -> dict:
        return {"store": self.store, "source": self.source, "n": self.n, "path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["store"], state["source"], state["n"], state["path"])


def image_locations(store: RunStore, n: int | None = None) -> ImageLocations:
    """The run's image locations (``n``: the manifest's images, checked here when not given). The node-local
    URI column is made on the first call on a node, from the packed index or the manifest as they are now."""
    n = manifest_images(store) if n is None else n
    source = uri_source(store, n)
    path = cache_path(store, source, "uris", ".bin", n)
    build_once(path, lambda tmp: _write_uris(store, source, n, tmp))
    return ImageLocations(store, source, n, path)

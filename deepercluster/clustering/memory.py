"""Keeping a clustering process's resident memory close to what it really holds.

glibc's malloc raises its mmap threshold after large frees, so numpy temporaries of a few MB then come from the
heap and are never given back; pyarrow keeps freed buffers in its pool. A streamed k-means allocates such blocks
at every shard, so its resident size would creep far above its live data. :func:`bound_heap` pins the threshold
(blocks above 1 MiB are mmapped, hence returned on free) and :func:`release` hands free memory back between phases.
Both are no-ops where they do not apply (not glibc, no pyarrow pool)."""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import lru_cache

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
THRESHOLD = 1 << 20


@lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


@lru_cache(maxsize=1)
def bound_heap() -> bool:
    """Pin glibc's mmap and trim thresholds (once per process); True when it applied."""
    libc = _libc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD, THRESHOLD))


def release() -> None:
    """Give free heap pages and pyarrow's pooled buffers back to the system."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
    try:
        import pyarrow as pa

        pa.default_memory_pool().release_unused()
    except (ImportError, AttributeError):
        pass

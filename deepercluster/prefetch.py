"""Ordered read-ahead: apply a function to items in a thread pool, yielding results in order while at most
``depth`` items are in flight (decoding the next image batch, reading the next zarr shard)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def read_ahead(fn: Callable[[T], R], items: Iterable[T], depth: int, threads: int,
               name: str = "read-ahead") -> Iterator[tuple[T, R]]:
    """``(item, fn(item))`` in the order of ``items``; pending work is cancelled if the consumer stops early."""
    todo = iter(items)
    pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix=name)
    pending: deque[tuple[T, Future[R]]] = deque()
    try:
        for item in todo:
            pending.append((item, pool.submit(fn, item)))
            if len(pending) >= max(1, depth):
                break
        while pending:
            item, future = pending.popleft()
            result = future.result()
            nxt = next(todo, _END)
            if nxt is not _END:
                pending.append((nxt, pool.submit(fn, nxt)))
            yield item, result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


_END = object()

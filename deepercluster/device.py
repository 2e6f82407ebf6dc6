"""Choosing the torch device: the same code runs on CPU and CUDA."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def resolve_device(setting: str = "auto") -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        from deepercluster.errors import ConfigError

        raise ConfigError("runtime.device is 'cuda' but no CUDA device is visible: use 'auto' or 'cpu'")
    return torch.device(setting)


def dask_worker_threads() -> int | None:
    """The task threads of the Dask worker running this code (its share of the machine's cores), None outside a
    Dask worker. Dask starts workers with ``OMP_NUM_THREADS=1``, so torch there uses one core unless told."""
    try:
        from distributed import get_worker

        return int(get_worker().state.nthreads)
    except (ImportError, ValueError):
        return None


_CPU_COMPUTE = threading.Lock()


@contextmanager
def cpu_compute(threads: int | None = None) -> Iterator[None]:
    """One CPU-bound torch computation at a time in this process, with ``threads`` torch threads (default: the
    Dask worker's task threads, else torch's own default); the thread count is restored afterwards. Two at once
    would each start a team of OpenMP threads and oversubscribe the cores."""
    threads = threads or dask_worker_threads()
    with _CPU_COMPUTE:
        before = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)

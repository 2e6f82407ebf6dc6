"""One Dask cluster per pipeline run: an existing scheduler by address, or a LocalCluster started here."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

from prefect.client.orchestration import get_client
from prefect_dask import DaskTaskRunner

from deepercluster.config import RuntimeConfig
from deepercluster.errors import ConfigError


@contextmanager
def dask_scheduler(runtime: RuntimeConfig, address: str | None = None, torchrun_agents: bool = False) \
        -> Iterator[str]:
    """Yield a scheduler address: ``address``, else ``runtime.dask_address``, else ``$DEEPERCLUSTER_DASK_ADDRESS``,
    else a new LocalCluster's (stopped on exit)."""
    address = address or runtime.dask_address or os.environ.get("DEEPERCLUSTER_DASK_ADDRESS")
    if address:
        yield address
        return
    from distributed import LocalCluster

    from deepercluster.training.nodes import NODE_RESOURCE

    # Workers must report to this process's Prefect server: without its URL each would start a temporary one.
    logging.getLogger("distributed").setLevel(logging.WARNING)
    env = {"PREFECT_API_URL": prefect_api_url(), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    if runtime.gpu_workers:
        with local_gpu_cluster(runtime.dask_workers, env) as gpu_address:
            yield gpu_address
        return
    # ``torchrun_agents`` (train.nnodes > 1): each worker may hold one torchrun agent (two on one worker would wait
    # for each other). Only then: workers that declare a resource ran the extract stage ~10% slower here
    resources = {NODE_RESOURCE: 1} if torchrun_agents else None
    with full_speed_malloc(), LocalCluster(n_workers=runtime.dask_workers, threads_per_worker=1, processes=True,
                                           dashboard_address=None, silence_logs=logging.WARNING, env=env,
                                           resources=resources) as cluster:
        yield cluster.scheduler_address


@contextmanager
def local_gpu_cluster(n_workers: int, env: dict[str, str]) -> Iterator[str]:
    """One single-threaded worker process per visible GPU, each seeing only its own (``CUDA_VISIBLE_DEVICES``) and
    holding the Dask resource GPU=1, as ``dask worker --resources GPU=1`` would; without a GPU, ``n_workers`` such
    workers on the CPU."""
    import torch
    from distributed import Nanny, Scheduler, SpecCluster

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = (visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())])
    gpus = gpus[: torch.cuda.device_count()]
    devices: list[dict[str, str]] = [{"CUDA_VISIBLE_DEVICES": g} for g in gpus] or [{}] * n_workers
    workers = {f"gpu-{i}": {"cls": Nanny, "options": {"nthreads": 1, "resources": {"GPU": 1}, "env": {**env, **d}}}
               for i, d in enumerate(devices)}
    scheduler = {"cls": Scheduler, "options": {"dashboard_address": None}}
    with full_speed_malloc(), SpecCluster(workers=workers, scheduler=scheduler,
                                          silence_logs=logging.WARNING) as cluster:
        yield cluster.scheduler_address


@contextmanager
def full_speed_malloc() -> Iterator[None]:
    """Workers started inside get no ``MALLOC_TRIM_THRESHOLD_`` (Dask's default sets 65536): setting it turns off
    glibc's adaptive mmap threshold, so every large tensor torch allocates is a fresh mmap whose pages fault in
    again; measured on 2 CPUs, ResNet-18's forward at 64 px ran 30% slower with it (381 vs 541 images/s). A value
    an earlier nanny of this process leaked into ``os.environ`` (Dask sets it there before spawning) is dropped."""
    import dask

    key = "MALLOC_TRIM_THRESHOLD_"
    if os.environ.get(key) == str(dask.config.get(f"distributed.nanny.pre-spawn-environ.{key}", None)):
        del os.environ[key]
    with dask.config.set({f"distributed.nanny.pre-spawn-environ.{key}": None}):
        yield


def scheduler_workers(address: str) -> list[str]:
    """The addresses of the workers of the scheduler at ``address`` now."""
    from distributed import Client

    with Client(address, timeout=30) as client:
        return sorted(client.scheduler_info(n_workers=-1)["workers"])


def require_resources(address: str, resources: dict[str, int], setting: str, workers: int = 1) -> None:
    """Raise a one-line error unless ``workers`` workers of the scheduler at ``address`` advertise ``resources`` (a
    task asking for more than any worker has would wait forever, and so would units that must run at the same time
    on distinct workers, torchrun agents, when fewer workers can take them)."""
    from distributed import Client

    with Client(address, timeout=30) as client:
        have = [w.get("resources") or {} for w in client.scheduler_info(n_workers=-1)["workers"].values()]
    fit = sum(all(h.get(k, 0) >= v for k, v in resources.items()) for h in have)
    wanted = ",".join(f"{k}={v}" for k, v in resources.items())
    if fit >= workers:
        return
    if workers > 1:
        raise ConfigError(f"{setting} = {workers} needs {workers} Dask workers with --resources {wanted} (one torchrun "
                          f"agent each, at the same time), but {fit} of the workers at {address} advertise it: start "
                          f"one per node with `dask worker {address} --resources {wanted}`, or lower {setting}")
    best = max((h.get(k, 0) for h in have for k in resources), default=0)
    raise ConfigError(f"{setting} with runtime.gpu_workers needs a Dask worker with --resources {wanted}, but the "
                      f"workers at {address} advertise at most {best}: lower {setting}, or start one worker per node "
                      f"that sees all its GPUs with `dask worker {address} --resources GPU=<its GPUs>`")


def prefect_api_url() -> str:
    """The API URL of the Prefect server this process talks to (the temporary one, when none is configured)."""
    with get_client(sync_client=True) as client:
        return str(client.api_url)


def dask_runner(address: str) -> DaskTaskRunner:
    return DaskTaskRunner(address=address)

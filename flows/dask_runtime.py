"""One Dask cluster per pipeline run: an existing scheduler by address, or a LocalCluster started here."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

from prefect.client.orchestration import get_client
from prefect_dask import DaskTaskRunner

from deepercluster.config import RuntimeConfig


@contextmanager
def dask_scheduler(runtime: RuntimeConfig, address: str | None = None) -> Iterator[str]:
    """Yield a scheduler address: ``address``, else ``runtime.dask_address``, else ``$DEEPERCLUSTER_DASK_ADDRESS``,
    else a new LocalCluster's (stopped on exit)."""
    address = address or runtime.dask_address or os.environ.get("DEEPERCLUSTER_DASK_ADDRESS")
    if address:
        yield address
        return
    from distributed import LocalCluster

    # Workers must report to this process's Prefect server: without its URL each would start a temporary one.
    logging.getLogger("distributed").setLevel(logging.WARNING)
    env = {"PREFECT_API_URL": prefect_api_url(), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    with LocalCluster(n_workers=runtime.dask_workers, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=logging.WARNING, env=env) as cluster:
        yield cluster.scheduler_address


def prefect_api_url() -> str:
    """The API URL of the Prefect server this process talks to (the temporary one, when none is configured)."""
    with get_client(sync_client=True) as client:
        return str(client.api_url)


def dask_runner(address: str) -> DaskTaskRunner:
    return DaskTaskRunner(address=address)

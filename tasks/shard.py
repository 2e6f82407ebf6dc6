from __future__ import annotations

from prefect import task

from deepercluster.data import shard
from deepercluster.run import open_run


@task(name="list-source")
def list_source(run: str, force: bool = False) -> list[str]:
    store, cfg = open_run(run)
    if force:
        shard.reset_shard_stage(store)
    return shard.list_source(store, cfg.data)


@task(name="scan-part", retries=2, retry_delay_seconds=2)
def scan_part(run: str, part: str) -> dict[str, int]:
    store, cfg = open_run(run)
    return shard.scan_part(store, cfg.data, part)


@task(name="finalize-manifest")
def finalize_manifest(run: str) -> dict[str, int]:
    store, cfg = open_run(run)
    return shard.finalize_manifest(store, cfg.data)

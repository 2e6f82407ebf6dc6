from __future__ import annotations

from prefect import task

from deepercluster.clustering import stage
from deepercluster.run import open_run


@task(name="prepare-cluster")
def prepare_cluster(run: str, r: int, force: bool = False) -> list[int]:
    store, cfg = open_run(run)
    return stage.prepare_cluster(store, cfg, r, force=force)


@task(name="cluster-super", retries=1)
def cluster_super(run: str, r: int, s: int) -> dict:
    store, cfg = open_run(run)
    return stage.cluster_super(store, cfg, r, s)


@task(name="finalize-cluster")
def finalize_cluster(run: str, r: int) -> dict:
    store, cfg = open_run(run)
    return stage.finalize_cluster(store, cfg, r)

"""One flow per stage. Each takes the run URI, the round and ``force``; the Dask stages also take the address
of the pipeline's Dask scheduler (a LocalCluster is started when none is given), and fan their units out on it
through an inner flow whose task runner is a ``DaskTaskRunner`` on that address."""

from __future__ import annotations

from prefect import flow, get_run_logger

from deepercluster.run import open_run
from flows.dask_runtime import dask_runner, dask_scheduler
from tasks import cluster as cluster_tasks
from tasks import evaluate as evaluate_tasks
from tasks import extract as extract_tasks
from tasks import shard as shard_tasks
from tasks import train as train_tasks


@flow(name="shard-parts")
def _scan_parts(run: str, parts: list[str]) -> list[dict]:
    return [f.result() for f in [shard_tasks.scan_part.submit(run, p) for p in parts]]


@flow(name="shard")
def shard_flow(run: str, force: bool = False, dask_address: str | None = None) -> dict:
    """Image source -> manifest + rejects."""
    store, cfg = open_run(run)
    if store.stage_done("shard", None) and not force:
        return store.done_record("shard", None, "_stage")
    parts = shard_tasks.list_source(run, force=force)
    todo = [p for p in parts if not store.is_done("shard", None, p)]
    if todo:
        with dask_scheduler(cfg.runtime, dask_address) as address:
            _scan_parts.with_options(task_runner=dask_runner(address))(run, todo)
    info = shard_tasks.finalize_manifest(run)
    get_run_logger().info("shard: %d images kept, %d rejected, %d shards", info["images"], info["rejects"],
                          info["shards"])
    return info


@flow(name="extract-shards")
def _extract_shards(run: str, r: int, shards: list[int]) -> int:
    return sum(f.result() for f in [extract_tasks.extract_shard.submit(run, r, s) for s in shards])


@flow(name="extract")
def extract_flow(run: str, round: int, force: bool = False, dask_address: str | None = None) -> dict:
    """Round model -> features.zarr, one Dask task per image shard."""
    store, cfg = open_run(run)
    if store.stage_done("extract", round) and not force:
        return store.done_record("extract", round, "_stage")
    todo = extract_tasks.prepare_extract(run, round, force=force)
    if todo:
        with dask_scheduler(cfg.runtime, dask_address) as address:
            rows = _extract_shards.with_options(task_runner=dask_runner(address))(run, round, todo)
        get_run_logger().info("extract round %d: %d shards (%d rows) computed", round, len(todo), rows)
    return extract_tasks.finalize_extract(run, round)


@flow(name="cluster-supers")
def _cluster_supers(run: str, r: int, supers: list[int]) -> list[dict]:
    return [f.result() for f in [cluster_tasks.cluster_super.submit(run, r, s) for s in supers]]


@flow(name="cluster")
def cluster_flow(run: str, round: int, force: bool = False, dask_address: str | None = None) -> dict:
    """Features -> PCA-whitening -> level-1 k-means -> level-2 k-means per super-cluster -> assignments."""
    store, cfg = open_run(run)
    if store.stage_done("cluster", round) and not force:
        return store.read_json(f"rounds/{round}/clusters/stats.json")
    todo = cluster_tasks.prepare_cluster(run, round, force=force)
    if len(todo) > 1:
        with dask_scheduler(cfg.runtime, dask_address) as address:
            _cluster_supers.with_options(task_runner=dask_runner(address))(run, round, todo)
    else:
        for s in todo:
            cluster_tasks.cluster_super(run, round, s)
    stats = cluster_tasks.finalize_cluster(run, round)
    get_run_logger().info("cluster round %d: %d/%d non-empty targets", round, stats["non_empty"], stats["targets"])
    return stats


@flow(name="train")
def train_flow(run: str, round: int, force: bool = False, dask_address: str | None = None) -> dict:
    """Pseudo-labels -> torchrun training epochs -> the next round's model."""
    return train_tasks.train_round(run, round, force=force)


@flow(name="evaluate")
def evaluate_flow(run: str, round: int, force: bool = False, dask_address: str | None = None) -> dict:
    """Assignments -> NMI/ARI, cluster statistics, a history row and a Prefect table artifact."""
    return evaluate_tasks.evaluate(run, round, force=force)


ROUND_FLOWS = {"extract": extract_flow, "cluster": cluster_flow, "train": train_flow, "evaluate": evaluate_flow}
STAGE_FLOWS = {"shard": shard_flow, **ROUND_FLOWS}

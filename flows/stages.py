"""One flow per stage. Each takes the run URI, the round and ``force``; the Dask stages also take the address
of the pipeline's Dask scheduler (a LocalCluster is started when none is given), and fan their units out on it
through an inner flow whose task runner is a ``DaskTaskRunner`` on that address."""

from __future__ import annotations

from contextlib import nullcontext

import dask
from prefect import flow, get_run_logger
from prefect.futures import as_completed

from deepercluster.run import open_run
from flows.dask_runtime import dask_runner, dask_scheduler
from tasks import cluster as cluster_tasks
from tasks import evaluate as evaluate_tasks
from tasks import extract as extract_tasks
from tasks import inspection as inspect_tasks
from tasks import shard as shard_tasks
from tasks import train as train_tasks


@flow(name="shard-parts")
def _scan_parts(run: str, parts: list[str], total: int) -> list[dict]:
    futures = [shard_tasks.scan_part.submit(run, p) for p in parts]
    progress = shard_tasks.ScanProgress(total, done=total - len(parts))
    results = []
    for f in as_completed(futures):
        results.append(f.result())
        progress.step(results[-1])
    return results


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
            _scan_parts.with_options(task_runner=dask_runner(address))(run, todo, len(parts))
    info = shard_tasks.finalize_manifest(run)
    get_run_logger().info("shard: %d images kept, %d rejected, %d shards", info["images"], info["rejects"],
                          info["shards"])
    return info


@flow(name="extract-shards")
def _extract_shards(run: str, r: int, shards: list[int], gpu: bool = False) -> int:
    """One task per shard; with ``gpu`` only workers holding the Dask resource GPU=1 take them (prefect-dask does
    not pass ``resources=``: the annotation reaches the scheduler instead)."""
    with dask.annotate(resources={"GPU": 1}) if gpu else nullcontext():
        futures = [extract_tasks.extract_shard.submit(run, r, s) for s in shards]
    return sum(f.result() for f in futures)


@flow(name="extract")
def extract_flow(run: str, round: int, force: bool = False, dask_address: str | None = None) -> dict:
    """Round model -> features.zarr, one Dask task per image shard."""
    store, cfg = open_run(run)
    if store.stage_done("extract", round) and not force:
        return store.done_record("extract", round, "_stage")
    todo = extract_tasks.prepare_extract(run, round, force=force)
    if todo:
        with dask_scheduler(cfg.runtime, dask_address) as address:
            rows = _extract_shards.with_options(task_runner=dask_runner(address))(run, round, todo,
                                                                                  gpu=cfg.runtime.gpu_workers)
        get_run_logger().info("extract round %d: %d shards (%d rows) computed", round, len(todo), rows)
    return extract_tasks.finalize_extract(run, round)


@flow(name="cluster-supers")
def _cluster_supers(run: str, r: int, supers: list[int], gpu: bool = False) -> list[dict]:
    """One task per super-cluster; with ``gpu`` only workers holding the Dask resource GPU=1 take them."""
    with dask.annotate(resources={"GPU": 1}) if gpu else nullcontext():
        futures = [cluster_tasks.cluster_super.submit(run, r, s) for s in supers]
    return [f.result() for f in futures]


@flow(name="cluster")
def cluster_flow(run: str, round: int, force: bool = False, dask_address: str | None = None) -> dict:
    """Features -> PCA-whitening -> level-1 k-means -> level-2 k-means per super-cluster -> assignments."""
    store, cfg = open_run(run)
    if store.stage_done("cluster", round) and not force:
        return store.read_json(f"rounds/{round}/clusters/stats.json")
    todo = cluster_tasks.prepare_cluster(run, round, force=force)
    if len(todo) > 1:
        with dask_scheduler(cfg.runtime, dask_address) as address:
            _cluster_supers.with_options(task_runner=dask_runner(address))(run, round, todo,
                                                                           gpu=cfg.runtime.gpu_workers)
    else:
        for s in todo:
            cluster_tasks.cluster_super(run, round, s)
    stats = cluster_tasks.finalize_cluster(run, round)
    get_run_logger().info("cluster round %d: %d/%d non-empty targets", round, stats["non_empty"], stats["targets"])
    return stats


@flow(name="train")
def train_flow(run: str, round: int, force: bool = False, dask_address: str | None = None) -> dict:
    """Pseudo-labels -> torchrun training epochs -> the next round's model (progress: the task's log and its
    ``train-round-<r>`` progress artifact)."""
    info = train_tasks.train_round(run, round, force=force)
    get_run_logger().info("train round %d: %d steps on %d ranks (%d head groups), final loss %s, %s images/s", round,
                          info["steps"], info["world_size"], info.get("groups", 1), info.get("final_loss"),
                          info.get("images_per_s"))
    return info


@flow(name="evaluate")
def evaluate_flow(run: str, round: int, force: bool = False, dask_address: str | None = None) -> dict:
    """Features + assignments -> NMI/ARI, linear probe, kNN, cluster statistics, a history row and a Prefect
    table artifact. With ``eval.final_round``, the last round also evaluates the model its training produced."""
    metrics = evaluate_tasks.evaluate(run, round, force=force)
    _, cfg = open_run(run)
    if cfg.eval.final_round and round == cfg.rounds - 1:
        final_evaluate_flow(run, force=force, dask_address=dask_address)
    inspect_tasks.publish_inspection(run, round)  # galleries, cluster sizes, metrics plot: store + artifacts
    return metrics


@flow(name="final-evaluate")
def final_evaluate_flow(run: str, force: bool = False, dask_address: str | None = None) -> dict:
    """The model the last training produced (``rounds/<rounds>/model.pt``): extract its features, evaluate them."""
    _, cfg = open_run(run)
    extract_flow(run, cfg.rounds, force=force, dask_address=dask_address)
    return evaluate_tasks.evaluate(run, cfg.rounds, force=force)


ROUND_FLOWS = {"extract": extract_flow, "cluster": cluster_flow, "train": train_flow, "evaluate": evaluate_flow}
STAGE_FLOWS = {"shard": shard_flow, **ROUND_FLOWS}

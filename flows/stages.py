"""One flow per stage, and ``stage``, which runs one of them by name: the single-stage rerun behind both
``deepercluster stage NAME`` and the ``stage/<NAME>`` deployments. Each stage flow takes the run URI, the round and
``force``; the Dask stages also take the address of the pipeline's Dask scheduler (a LocalCluster is started when
none is given), and fan their units out on it through an inner flow whose task runner is a ``DaskTaskRunner`` on
that address."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Literal

import dask
from prefect import flow, get_run_logger
from prefect.futures import as_completed
from prefect.runtime import deployment as runtime_deployment

from deepercluster.data.repack import unit_name as repack_unit
from deepercluster.errors import ConfigError
from deepercluster.features import shard_groups
from deepercluster.run import check_stage, open_run
from flows.dask_runtime import dask_runner, dask_scheduler, require_resources
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
    if cfg.data.repack:  # one Dask task per image shard copies its files into one tar
        todo = [s for s in range(info["shards"]) if not store.is_done("shard", None, repack_unit(s))]
        if todo:
            with dask_scheduler(cfg.runtime, dask_address) as address:
                _repack_shards.with_options(task_runner=dask_runner(address))(run, todo)
        info = shard_tasks.finalize_shard_stage(run)
    get_run_logger().info("shard: %d images kept, %d rejected, %d shards", info["images"], info["rejects"],
                          info["shards"])
    return info


@flow(name="repack-shards")
def _repack_shards(run: str, shards: list[int]) -> int:
    return sum(f.result() for f in [shard_tasks.repack_shard.submit(run, s) for s in shards])


@flow(name="extract-shards")
def _extract_shards(run: str, r: int, shards: list[int], gpu: bool = False) -> int:
    """One task per group of ``extract.shards_per_task`` consecutive shards (each shard still written and recorded
    on its own); with ``gpu`` only workers holding the Dask resource GPU=1 take them (prefect-dask does not pass
    ``resources=``: the annotation reaches the scheduler instead)."""
    _, cfg = open_run(run)
    with dask.annotate(resources={"GPU": 1}) if gpu else nullcontext():
        futures = [extract_tasks.extract_shards.submit(run, r, g)
                   for g in shard_groups(shards, cfg.extract.shards_per_task)]
    return sum(f.result() for f in futures)


@flow(name="extract")
def extract_flow(run: str, round: int, force: bool = False, dask_address: str | None = None) -> dict:
    """Round model -> features.zarr, one Dask task per group of image shards."""
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


@flow(name="train-launch")
def _launch_training(run: str, r: int, force: bool, resources: dict[str, int] | None) -> dict:
    """One Dask task runs this node's torchrun agent and holds ``resources`` (GPU=nproc) until it ends."""
    with dask.annotate(resources=resources) if resources else nullcontext():
        future = train_tasks.train_round.submit(run, r, force=force)
    return future.result()


@flow(name="train")
def train_flow(run: str, round: int, force: bool = False, dask_address: str | None = None) -> dict:
    """Pseudo-labels -> torchrun training epochs -> the next round's model (progress: the task's log and its
    ``train-round-<r>`` progress artifact). torchrun runs under a task on a Dask worker, never in the flow's
    process: with ``runtime.gpu_workers`` on a worker advertising at least GPU=``train.nproc``, else on any."""
    store, cfg = open_run(run)
    if store.stage_done("train", round) and not force:
        return store.done_record("train", round, "_stage")
    resources = {"GPU": cfg.train.nproc} if cfg.runtime.gpu_workers else None
    with dask_scheduler(cfg.runtime, dask_address) as address:
        if resources:
            require_resources(address, resources, "train.nproc")
        info = _launch_training.with_options(task_runner=dask_runner(address))(run, round, force, resources)
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
StageName = Literal["shard", "extract", "cluster", "train", "evaluate"]


@flow(name="stage")
def stage_flow(run: str, stage: StageName, round: int = 0, force: bool = False,
               dask_address: str | None = None) -> dict:
    """One stage of an existing run, by name (``round`` is ignored by shard; ``force`` recomputes its done units).

    What ``deepercluster stage NAME --run RUN --round R [--force]`` runs, and what the deployments ``stage/<NAME>``
    of deployments/prefect.yaml run (each fixes ``stage`` by its default parameters)."""
    _, cfg = open_run(run)
    check_stage(cfg, stage, round)
    fixed = (runtime_deployment.name or "").removesuffix("-docker")  # the stage a stage/<NAME> deployment runs
    if fixed in STAGE_FLOWS and fixed != stage:
        raise ConfigError(f"deployment stage/{runtime_deployment.name} runs the {fixed} stage, not {stage}: run "
                          f"the deployment stage/{stage} instead")
    get_run_logger().info("stage %s of %s%s%s", stage, run, "" if stage == "shard" else f", round {round}",
                          " (force)" if force else "")
    if stage == "shard":
        return shard_flow(run, force=force, dask_address=dask_address)
    return ROUND_FLOWS[stage](run, round, force=force, dask_address=dask_address)

"""ClusterFit as a flow: the source network's features -> k-means once -> a new network trained from scratch on
those labels -> both evaluated with the same probes. Every step is one of the pipeline's stage flows, so a rerun
resumes from the run store (see :mod:`deepercluster.clusterfit` for the layout)."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from deepercluster.config import build_config
from deepercluster.run import init_run, open_run
from deepercluster.store import RunStore, export_storage_options
from flows.dask_runtime import dask_scheduler
from flows.stages import cluster_flow, evaluate_flow, extract_flow, final_evaluate_flow, shard_flow, train_flow
from tasks import clusterfit as clusterfit_tasks


@flow(name="clusterfit")
def clusterfit_flow(run: str, config: dict[str, Any] | None = None, dask_address: str | None = None) -> dict:
    """Run (or resume) ClusterFit at ``run``; ``config`` (merged over the clusterfit preset) starts a new run."""
    if config is not None:
        cfg = build_config(config, method="clusterfit")
        export_storage_options(cfg.runtime.storage_options)  # every store opened from here on (and by workers)
        init_run(RunStore(run), cfg)
    store, cfg = open_run(run)
    logger = get_run_logger()
    source = clusterfit_tasks.prepare_source(run)
    logger.info("clusterfit %s: source %s (%s) -> k-means k=%d -> new %s", store.uri, cfg.clusterfit.checkpoint,
                cfg.clusterfit.model.arch, cfg.cluster.k, cfg.model.arch)
    with dask_scheduler(cfg.runtime, dask_address) as address:
        shard_flow(source, dask_address=address)
        extract_flow(source, 0, dask_address=address)
        cluster_flow(source, 0, dask_address=address)
        source_metrics = evaluate_flow(source, 0, dask_address=address)
        clusterfit_tasks.import_labels(run)
        train_flow(run, 0, dask_address=address)
        target_metrics = final_evaluate_flow(run, dask_address=address)
    summary = clusterfit_tasks.summarise(run, source_metrics, target_metrics)
    logger.info("clusterfit: source %s, new network %s", summary["source"], summary["target"])
    return summary

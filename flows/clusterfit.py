"""ClusterFit as a flow: the source network's features -> k-means once -> a new network trained from scratch on
those labels -> both evaluated with the same probes. Every step is a run of the ``stage`` flow, so a rerun resumes
from the run store (see :mod:`deepercluster.clusterfit` for the layout). ``deepercluster run`` and the loop
deployment dispatch here for a run whose method is clusterfit."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from deepercluster.config import build_config
from deepercluster.lease import run_lease
from deepercluster.run import init_run, open_run
from deepercluster.store import RunStore, export_storage_options
from flows.dask_runtime import dask_scheduler
from flows.stages import stage_flow
from tasks import clusterfit as clusterfit_tasks


@flow(name="clusterfit")
def clusterfit_flow(run: str, config: dict[str, Any] | None = None, dask_address: str | None = None) -> dict:
    """Run (or resume) ClusterFit at ``run``; ``config`` (merged over the clusterfit preset) starts a new run."""
    with run_lease(RunStore(run), "clusterfit run"):
        if config is not None:
            cfg = build_config(config, method="clusterfit")
            export_storage_options(cfg.runtime.storage_options)  # every store opened from here on (and by workers)
            init_run(RunStore(run), cfg)
        store, cfg = open_run(run)
        logger = get_run_logger()
        source = clusterfit_tasks.prepare_source(run)
        logger.info("clusterfit %s: source %s (%s) -> k-means k=%d -> new %s", store.uri, cfg.clusterfit.checkpoint,
                    cfg.clusterfit.model.arch, cfg.cluster.k, cfg.model.arch)
        with dask_scheduler(cfg.runtime, dask_address, torchrun_agents=cfg.train.nnodes > 1) as address:
            for name in ("shard", "extract", "cluster"):
                stage_flow(source, name, 0, dask_address=address)
            source_metrics = stage_flow(source, "evaluate", 0, dask_address=address)
            clusterfit_tasks.import_labels(run)
            stage_flow(run, "train", 0, dask_address=address)
            stage_flow(run, "extract", cfg.rounds, dask_address=address)
            target_metrics = stage_flow(run, "evaluate", cfg.rounds, dask_address=address)
        summary = clusterfit_tasks.summarise(run, source_metrics, target_metrics)
        logger.info("clusterfit: source %s, new network %s", summary["source"], summary["target"])
        return summary

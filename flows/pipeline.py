"""The round loop: shard once, then for each round extract -> cluster -> train -> evaluate, then the model the
last training produced (``eval.final_round``). ClusterFit runs dispatch to :mod:`flows.clusterfit`.

Every stage checks its fingerprint against the run store, so rerunning this flow with the same run URI resumes a
killed or failed run, recomputes exactly the stages a changed config or a forced stage made stale, and continues a
run whose ``rounds`` was raised, whatever Prefect's own database remembers."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from deepercluster.config import build_config
from deepercluster.lease import run_lease
from deepercluster.run import init_run, open_run
from deepercluster.stages import run_plan, run_sequence
from deepercluster.store import RunStore, export_storage_options
from flows.dask_runtime import dask_scheduler
from flows.stages import stage_flow


@flow(name="deepercluster")
def pipeline_flow(run: str, config: dict[str, Any] | None = None, dask_address: str | None = None) -> list[dict]:
    """Run (or resume, or extend) every round of the run at ``run``; ``config`` starts a new run or changes the
    config of an existing one (its fingerprinted fields then recompute the stages that read them)."""
    with run_lease(RunStore(run), "deepercluster run"):
        if config is not None:
            cfg = build_config(config)
            export_storage_options(cfg.runtime.storage_options)  # every store opened from here on (and by workers)
            init_run(RunStore(run), cfg)
        store, cfg = open_run(run)
        logger = get_run_logger()
        if cfg.method == "clusterfit":
            from flows.clusterfit import clusterfit_flow

            return [clusterfit_flow(run, dask_address=dask_address)]
        logger.info("run %s (%s, %d rounds)", store.uri, cfg.method, cfg.rounds)
        for state in run_plan(store, cfg):
            if state.status == "stale":
                logger.info("recomputed: %s", state.describe())
        metrics = []
        with dask_scheduler(cfg.runtime, dask_address) as address:
            for stage, r in run_sequence(cfg):
                result = stage_flow(run, stage.name, 0 if r is None else r, dask_address=address)
                if stage.name == "evaluate":
                    metrics.append(result)
                    logger.info("round %d: %s", r, {k: round(v, 4) if isinstance(v, float) else v
                                                     for k, v in result.items()})
        return metrics

"""The round loop: shard once, then for each round extract -> cluster -> train -> evaluate.

Every stage skips what the run store says is done, so rerunning this flow with the same run URI resumes a killed
or failed run, whatever Prefect's own database remembers."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from deepercluster.config import build_config
from deepercluster.run import init_run, open_run
from deepercluster.store import RunStore, export_storage_options
from flows.dask_runtime import dask_scheduler
from flows.stages import ROUND_FLOWS, shard_flow


@flow(name="deepercluster")
def pipeline_flow(run: str, config: dict[str, Any] | None = None, dask_address: str | None = None) -> list[dict]:
    """Run (or resume) every round of the run at ``run``; ``config`` starts a new run (ignored fields: none)."""
    if config is not None:
        cfg = build_config(config)
        export_storage_options(cfg.runtime.storage_options)  # every store opened from here on (and by workers)
        init_run(RunStore(run), cfg)
    store, cfg = open_run(run)
    logger = get_run_logger()
    logger.info("run %s (config %s, %s, %d rounds)", store.uri, cfg.hash, cfg.method, cfg.rounds)
    metrics = []
    with dask_scheduler(cfg.runtime, dask_address) as address:
        shard_flow(run, dask_address=address)
        for r in range(cfg.rounds):
            for stage_flow in ROUND_FLOWS.values():
                result = stage_flow(run, r, dask_address=address)
            metrics.append(result)
            logger.info("round %d: %s", r, {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()})
    return metrics

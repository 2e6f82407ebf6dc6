"""The round loop: shard once, then for each round extract -> cluster -> train -> evaluate, then the model the
last training produced (``eval.final_round``). ClusterFit runs dispatch to :mod:`flows.clusterfit`.

Every stage checks its fingerprint against the run store, so rerunning this flow with the same run URI resumes a
killed or failed run, recomputes exactly the stages a changed config or a forced stage made stale, and continues a
run whose ``rounds`` was raised, whatever Prefect's own database remembers."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, tags

from deepercluster.config import build_config
from deepercluster.lease import run_lease
from deepercluster.progress import emit
from deepercluster.run import init_run, open_run
from deepercluster.stages import run_plan, run_sequence
from deepercluster.store import RunStore, export_storage_options
from flows.dask_runtime import dask_runner, dask_scheduler
from flows.stages import run_name, stage_flow
from tasks.publish import publish_summary


def history_row(store: RunStore, r: int) -> dict:
    """Round ``r``'s row of ``history.parquet`` (metrics and stage times)."""
    from deepercluster.evaluation.stage import load_history

    history = load_history(store)
    rows = history[history["round"] == r].to_dict("records")
    return rows[0] if rows else {"round": r}


def tag_this_flow_run(*new: str) -> None:
    """Add ``new`` to the tags of the current flow run (started by a deployment, the CLI or a notebook alike)."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    with get_client(sync_client=True) as client:
        client.update_flow_run(flow_run.id, tags=sorted({*flow_run.tags, *new}))


def _pipeline_run_name() -> str:
    from prefect.runtime import flow_run

    return f"run · {run_name(flow_run.parameters['run'])}"


@flow(name="deepercluster", flow_run_name=_pipeline_run_name)
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
        run_tags = (f"run:{run_name(run)}", f"method:{cfg.method}")
        tag_this_flow_run(*run_tags)
        nodes = cfg.train.nnodes > 1
        with dask_scheduler(cfg.runtime, dask_address, torchrun_agents=nodes) as address, tags(*run_tags):
            on_dask = stage_flow.with_options(task_runner=dask_runner(address))  # one flow run per stage run
            for stage, r in run_sequence(cfg):
                publish_summary(run, f"{stage.name}" if r is None else f"round {r} of {cfg.rounds}: {stage.name}")
                with tags(*(() if r is None else (f"round:{r}",))):
                    result = on_dask(run, stage.name, 0 if r is None else r, dask_address=address)
                if stage.name == "evaluate":
                    metrics.append(result)
                    emit("metrics", row=history_row(store, r))
                    logger.info("round %d: %s", r, {k: round(v, 4) if isinstance(v, float) else v
                                                     for k, v in result.items()})
        publish_summary(run, "done")
        return metrics

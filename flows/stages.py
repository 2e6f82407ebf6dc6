"""``stage``: the one flow that runs any stage of a run by name, the single-stage rerun behind
``deepercluster stage NAME``, the ``stage/<NAME>`` deployments and every stage of the pipeline flows.

It checks the stage's fingerprint first (:func:`deepercluster.stages.begin`: done -> nothing to do; a changed
field or input -> the stage is discarded and recomputed), then runs the stage's steps in order, each unit a Dask
task on the pipeline's scheduler (a LocalCluster is started when none is given), then publishes what the stage
shows in the Prefect UI. A lease on the run keeps a second run or stage off it meanwhile."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import dask
from prefect import flow, get_run_logger
from prefect.context import FlowRunContext
from prefect.futures import as_completed
from prefect.runtime import deployment as runtime_deployment
from prefect.runtime import flow_run as runtime_flow_run
from prefect_dask import DaskTaskRunner

from deepercluster.config import PipelineConfig
from deepercluster.errors import ConfigError
from deepercluster.lease import run_lease
from deepercluster.progress import emit
from deepercluster.run import open_run
from deepercluster.stages import get_stage, stage_names
from deepercluster.stages.base import Round, Step, pin_workers
from deepercluster.stages.lineage import round_label
from deepercluster.stages.runner import run_framed
from flows.dask_runtime import dask_runner, dask_scheduler, require_resources, scheduler_workers
from tasks.publish import publish
from tasks.units import run_unit, transient


def _stage_run_name() -> str:
    """``r2 cluster · <run name>``: what the flow run is, on the Prefect UI's list and timeline."""
    p = runtime_flow_run.parameters
    label = p["stage"] if p["stage"] == "shard" else f"r{p.get('round', 0)} {p['stage']}"
    return f"{label} · {run_name(p['run'])}" + (" (force)" if p.get("force") else "")


def run_name(run: str) -> str:
    return run.rstrip("/").rsplit("/", 1)[-1]


def _on_dask() -> bool:
    """Whether this flow run's task runner is a Dask one (the pipeline gives each stage its scheduler's)."""
    ctx = FlowRunContext.get()
    return ctx is not None and isinstance(ctx.task_runner, DaskTaskRunner)


@flow(name="stage", flow_run_name=_stage_run_name)
def stage_flow(run: str, stage: str, round: int = 0, force: bool = False,
               dask_address: str | None = None) -> dict[str, Any]:
    """One stage of an existing run, by name (``round`` is ignored by shard; ``force`` recomputes it even when its
    fingerprint matches). Each deployment ``stage/<NAME>`` fixes ``stage`` by its default parameters."""
    store, cfg = open_run(run)
    st = get_stage(stage)
    st.check_round(cfg, round)
    fixed = (runtime_deployment.name or "").removesuffix("-docker")  # the stage a stage/<NAME> deployment runs
    if fixed in stage_names() and fixed != stage:
        raise ConfigError(f"deployment stage/{runtime_deployment.name} runs the {fixed} stage, not {stage}: run "
                          f"the deployment stage/{stage} instead")
    r: Round = None if st.scope == "data" else round
    label = round_label(stage, r)
    logger = get_run_logger()

    def run_units() -> tuple[int, float]:
        logger.info("%s of %s%s", label, store.uri, " (force)" if force else "")
        if _on_dask() and dask_address:  # one flow run per stage: its units are this flow's own tasks
            return run_steps(run, stage, r, dask_address)
        with dask_scheduler(cfg.runtime, dask_address, torchrun_agents=cfg.train.nnodes > 1) as address:
            units = _stage_units.with_options(task_runner=dask_runner(address), flow_run_name=f"{label} units")
            return units(run, stage, r, address)

    with run_lease(store, f"stage {label}"):
        if run_framed(store, cfg, st, r, force, run_units):
            publish(run, stage, r)
        else:
            logger.info("%s of %s: done (its fingerprint matches)", label, store.uri)
        return st.result(store, cfg, r)


@flow(name="stage-units")
def _stage_units(run: str, stage: str, r: Round, address: str) -> tuple[int, float]:
    """A stage run on its own (``deepercluster stage``, the stage deployments): its units on a Dask task runner."""
    return run_steps(run, stage, r, address)


def run_steps(run: str, stage: str, r: Round, address: str) -> tuple[int, float]:
    """Every step of the stage in order, each unit a task of the current flow run (whose task runner is the Dask
    scheduler at ``address``); a step's units are listed once the previous step is done (an iterative step's next
    batch once its last one is). Returns the units run and their CPU seconds."""
    store, cfg = open_run(run)
    done_units, cpu_s = 0, 0.0
    for step in get_stage(stage).steps():
        for todo in step.batches(store, cfg, r):
            cpu_s += _run_batch(run, stage, r, step, todo, address, cfg)
            done_units += len(todo)
    return done_units, cpu_s


def _run_batch(run: str, stage: str, r: Round, step: Step, todo: list, address: str, cfg: PipelineConfig) -> float:
    """One batch of a step's units as Dask tasks, waited for; logs progress every 10% of them. Returns their CPU
    seconds."""
    logger = get_run_logger()
    resources = step.resources(cfg) if step.resources else ({"GPU": 1} if step.gpu else None)
    resources = resources if cfg.runtime.gpu_workers or step.together else None  # together: one worker each
    if resources and (max(resources.values()) > 1 or (step.together and len(todo) > 1)):
        require_resources(address, resources, "train.nnodes" if len(todo) > 1 else "train.nproc",
                          workers=len(todo) if step.together else 1)
    task = run_unit.with_options(retries=step.retries, retry_delay_seconds=2,
                                 retry_condition_fn=None if step.retry_user_errors else transient)
    pinned = step.affinity is not None and any(step.affinity(u) is not None for u in todo)
    pins = pin_workers(todo, step.affinity, scheduler_workers(address)) if pinned else [None] * len(todo)
    futures = []
    with dask.annotate(resources=resources) if resources else nullcontext():  # prefect-dask passes no resources=
        for u, worker in zip(todo, pins, strict=True):
            with dask.annotate(workers=[worker], allow_other_workers=True) if worker else nullcontext():
                futures.append(task.submit(run, stage, r, step.name, u, step.label(u)))
    logged, cpu_s = 0, 0.0
    emit("units", label=round_label(stage, r), step=step.name, done=0, total=len(todo))
    for i, future in enumerate(as_completed(futures), start=1):
        cpu_s += future.result()["cpu_s"]
        emit("units", label=round_label(stage, r), step=step.name, done=i, total=len(todo))
        if len(todo) > 1 and (i * 10 // len(todo) > logged or i == len(todo)):
            logged = i * 10 // len(todo)
            logger.info("%s %s: %d/%d units done", round_label(stage, r), step.name, i, len(todo))
    return cpu_s

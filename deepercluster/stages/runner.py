"""Running stages: the fingerprint check every runner makes first (:func:`begin`), one stage in this process
(:func:`run_stage`), and the order of a whole run (:func:`run_sequence`).

The Prefect flow (``flows/stages.py``) does the same as :func:`run_stage`, with every unit a Dask task.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from deepercluster.config import PipelineConfig
from deepercluster.errors import StoreError
from deepercluster.progress import emit
from deepercluster.stages.base import LogReporter, Reporter, Round, Stage, Step, get_stage
from deepercluster.stages.lineage import (
    StageState,
    differences,
    expected_lineage,
    plan,
    read_lineage,
    round_label,
    write_lineage,
)
from deepercluster.stages.timing import record_timing, timed
from deepercluster.store import RunStore

log = logging.getLogger("deepercluster")


def run_sequence(cfg: PipelineConfig) -> list[tuple[Stage, Round]]:
    """Every stage of a run in order: shard, then extract -> cluster -> train -> evaluate per round, then (with
    ``eval.final_round``) the extract and evaluate of the model the last training produced (round ``rounds``)."""
    out: list[tuple[Stage, Round]] = [(get_stage("shard"), None)]
    for r in range(cfg.rounds):
        out += [(get_stage(name), r) for name in ("extract", "cluster", "train", "evaluate")]
    if cfg.eval.final_round:
        out += [(get_stage("extract"), cfg.rounds), (get_stage("evaluate"), cfg.rounds)]
    return out


def run_plan(store: RunStore, cfg: PipelineConfig) -> list[StageState]:
    """What the next run of the whole pipeline will find, stage by stage (see :func:`lineage.plan`)."""
    return plan(store, cfg, run_sequence(cfg))


def begin(store: RunStore, cfg: PipelineConfig, stage: Stage, r: Round, force: bool = False) -> bool:
    """Bring a stage's records in line with the current config before it runs; True when it is done already.

    A stage whose lineage differs from the current one (a field it reads changed, an input was recomputed, its
    format version moved) is discarded whole; ``force`` discards it anyway. A stage with the same lineage keeps its
    completed units (resume). A stage completed before fingerprints existed is adopted as it is."""
    expected = expected_lineage(store, cfg, stage, r)
    missing = [name for name, ident in expected["inputs"].items() if ident is None]
    if missing:
        raise StoreError(f"{round_label(stage.name, r)} reads {missing[0]}, which is not done: run that stage first")
    record = read_lineage(store, stage.name, r)
    done = store.stage_done(stage.name, r)
    if force:
        stage.discard(store, cfg, r)
    elif record is None:
        if done:  # made before fingerprints: adopt it
            write_lineage(store, stage.name, r, expected)
            return True
    else:
        reasons = differences(record["lineage"], expected)
        if not reasons:
            return done
        log.info("%s is recomputed: %s", round_label(stage.name, r), "; ".join(reasons))
        stage.discard(store, cfg, r)
    write_lineage(store, stage.name, r, expected)
    return False


def finish(store: RunStore, stage: Stage, r: Round) -> None:
    """Check that the stage's last step recorded it done."""
    if not store.stage_done(stage.name, r):
        raise StoreError(f"{round_label(stage.name, r)}: every unit ran but the stage was not recorded done: rerun it")


def run_framed(store: RunStore, cfg: PipelineConfig, stage: Stage, r: Round, force: bool,
               run_units: Callable[[], tuple[int, float]]) -> bool:
    """The frame of every stage run, in process or on Dask: the fingerprint check (:func:`begin`), then
    ``run_units()`` (every step's units; returns how many ran and their CPU seconds), the check that the stage was
    recorded done, its timing, and the progress events around it. Returns whether the stage ran."""
    label = round_label(stage.name, r)
    if begin(store, cfg, stage, r, force=force):
        emit("stage", label=label, status="done")
        return False
    emit("stage", label=label, status="running")
    start = time.perf_counter()
    units, cpu = run_units()
    finish(store, stage, r)
    record_timing(store, stage.name, r, time.perf_counter() - start, cpu, units)
    emit("stage_end", label=label, seconds=time.perf_counter() - start, units=units)
    return True


def run_stage(store: RunStore, cfg: PipelineConfig, name: str, r: Round = None, force: bool = False,
              report: Reporter | None = None) -> dict[str, Any]:
    """One stage, every unit in this process (tests, notebooks, benches); returns its summary."""
    stage = get_stage(name)
    stage.check_round(cfg, r)
    r = None if stage.scope == "data" else r
    report = report or LogReporter()

    def run_units() -> tuple[int, float]:
        units, cpu = 0, 0.0
        for step in stage.steps():
            for todo in step.batches(store, cfg, r):
                if step.together and len(todo) > 1:  # units that wait for each other: one thread each
                    cpu += timed(lambda: _run_together(store, cfg, r, step, todo, report))[1]  # noqa: B023
                    emit("units", label=round_label(name, r), step=step.name, done=len(todo), total=len(todo))
                    units += len(todo)
                    continue
                for i, unit in enumerate(todo, start=1):
                    cpu += timed(lambda: step.run(store, cfg, r, unit, report))[1]  # noqa: B023
                    emit("units", label=round_label(name, r), step=step.name, done=i, total=len(todo))
                units += len(todo)
        return units, cpu

    run_framed(store, cfg, stage, r, force, run_units)
    return stage.result(store, cfg, r)


def _run_together(store: RunStore, cfg: PipelineConfig, r: Round, step: Step, todo: list, report: Reporter) -> None:
    """A ``together`` step's batch in this process: every unit at once on its own thread; the first error raised."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(todo), thread_name_prefix=step.name) as pool:
        futures = [pool.submit(step.run, store, cfg, r, unit, report) for unit in todo]
        for future in futures:
            future.result()


def run_all(store: RunStore, cfg: PipelineConfig) -> list[dict[str, Any]]:
    """The whole run in this process; returns the evaluate stages' metrics in round order."""
    out = []
    for stage, r in run_sequence(cfg):
        result = run_stage(store, cfg, stage.name, r)
        if stage.name == "evaluate":
            out.append(result)
    return out

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any
from uuid import UUID

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from deepercluster.run import open_run
from deepercluster.training.launch import run_train_stage
from deepercluster.training.progress import parse_progress


class TrainProgress:
    """Turns the workers' output into Prefect: rank 0's per-iteration progress lines become the task's log and a
    progress artifact (``train-round-<r>``), at most one every ``min_interval_s`` (and always the last); any other
    line (warnings, a rank's error) is logged as it comes. Called from the launcher's reader threads: it never
    raises, so the workers' pipes keep being drained whatever the Prefect server does."""

    def __init__(self, logger: logging.Logger | logging.LoggerAdapter, r: int, min_interval_s: float = 2.0):
        self.logger, self.min_interval_s = logger, min_interval_s
        self._last = float("-inf")
        self._artifact: UUID | None = create_progress_artifact(
            0.0, key=f"train-round-{r}", description=f"train stage of round {r}: steps done")
        self._failed = False

    def __call__(self, line: str) -> None:
        try:
            self._line(line)
        except Exception as err:  # reporting must never stop the training
            if not self._failed:
                self._failed = True
                self.logger.warning("train progress reporting failed (%s); training goes on", err)

    def _line(self, line: str) -> None:
        p: dict[str, Any] | None = parse_progress(line)
        if p is None:
            if line.strip():
                self.logger.info(line)
            return
        now = time.monotonic()
        if p["step"] < p["steps"] and now - self._last < self.min_interval_s:
            return
        self._last = now
        self.logger.info(line)
        if self._artifact is not None:
            update_progress_artifact(self._artifact, round(100.0 * p["step"] / p["steps"], 1))


def released_by_dask() -> Callable[[], bool] | None:
    """On a Dask worker: a check that says when the task running in this thread is no longer wanted (its future
    cancelled or released, e.g. because the flow that submitted it died); None elsewhere."""
    try:
        from distributed import get_worker

        worker = get_worker()
        key = worker.get_current_task()
    except (ImportError, ValueError, KeyError):  # not a Dask worker's task thread
        return None

    def released() -> bool:
        ts = worker.state.tasks.get(key)
        return ts is None or ts.state not in ("executing", "long-running")

    return released


@task(name="train-round", retries=1, retry_delay_seconds=5)
def train_round(run: str, r: int, force: bool = False) -> dict:
    """Launches torchrun (on the Dask worker the task was sent to, stopped if the task is cancelled there); a
    retry resumes from the last checkpoint in the store."""
    store, cfg = open_run(run)
    if store.stage_done("train", r) and not force:
        return run_train_stage(store, cfg, r)
    return run_train_stage(store, cfg, r, force=force, on_line=TrainProgress(get_run_logger(), r),
                           should_stop=released_by_dask())

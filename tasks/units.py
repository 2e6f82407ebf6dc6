"""The one Prefect task every stage's units run as: it opens the run from its URI, runs one unit of one step of a
stage (see :mod:`deepercluster.stages`) on the Dask worker it was sent to, and reports to Prefect."""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Callable
from typing import Any
from uuid import UUID

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from deepercluster.errors import DeeperClusterError
from deepercluster.run import open_run
from deepercluster.stages import get_stage
from deepercluster.stages.base import Unit
from deepercluster.stages.timing import timed
from tasks.publish import artifact_key


class PrefectReporter:
    """A unit's reports as Prefect sees them: lines in the task run's log, the fraction done as a progress artifact
    (``key``, made at the first report), a stop when the task is no longer wanted on its Dask worker. Reporting
    never raises: the work goes on whatever the Prefect server does."""

    def __init__(self, key: str, description: str, min_interval_s: float = 2.0,
                 logger: logging.Logger | logging.LoggerAdapter | None = None):
        self.key, self.description, self.min_interval_s = key, description, min_interval_s
        self.logger = logger or get_run_logger()
        self._artifact: UUID | None = None
        self._last = float("-inf")
        self._failed = False
        self._released = released_by_dask()
        # the task run's context, for the artifact made later from another thread (the training's output readers)
        self._context = contextvars.copy_context()
        self._lock = threading.Lock()

    def _guard(self, fn: Callable[[], Any]) -> None:
        try:
            fn()
        except Exception as err:  # reporting must never stop the work
            if not self._failed:
                self._failed = True
                self.logger.warning("progress reporting failed (%s); the work goes on", err)

    def line(self, text: str) -> None:
        if text.strip():
            self._guard(lambda: self.logger.info(text))

    def progress(self, fraction: float) -> None:
        now = time.monotonic()
        if fraction < 1 and now - self._last < self.min_interval_s:
            return
        self._last = now
        self._guard(lambda: self._update(round(100.0 * fraction, 1)))

    def _update(self, percent: float) -> None:
        with self._lock:
            if self._artifact is None:
                self._artifact = self._context.run(create_progress_artifact, percent, key=self.key,
                                                   description=self.description)
            else:
                update_progress_artifact(self._artifact, percent)

    def should_stop(self) -> bool:
        return self._released is not None and self._released()


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


def transient(task, task_run, state) -> bool:
    """Retry what may pass on a second try (storage, memory), not a user's error (an unreadable image)."""
    return not isinstance(state.data, DeeperClusterError)


@task(name="unit", task_run_name="{stage}-{step}-{label}")
def run_unit(run: str, stage: str, r: int | None, step: str, unit: Unit, label: str) -> Any:
    """One unit of ``step`` of ``stage`` in round ``r`` of the run at ``run``; returns its small result and the CPU
    seconds it took."""
    store, cfg = open_run(run)
    where = stage if r is None else f"{stage}-r{r}"
    reporter = PrefectReporter(artifact_key(store, where, "progress"), f"{where} of {store.uri}: {label}")
    result, cpu_s = timed(lambda: get_stage(stage).step(step).run(store, cfg, r, unit, reporter))
    return {"result": result, "cpu_s": cpu_s}

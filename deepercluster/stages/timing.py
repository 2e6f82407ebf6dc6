"""Where the time went: each stage run's wall time, the CPU time of its units (with their child processes, e.g.
torchrun) and units/s, kept per round in ``rounds/<r>/timings.json`` (``data/timings.json`` for the shard stage)
and copied into the round's row of ``history.parquet`` (``<stage>_s``, ``<stage>_cpu_s``, ``wall_s``)."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from typing import Any, TypeVar

from deepercluster.paths import HISTORY, round_dir
from deepercluster.store import RunStore

T = TypeVar("T")


def timings_rel(r: int | None) -> str:
    return "data/timings.json" if r is None else f"{round_dir(r)}/timings.json"


def cpu_seconds() -> float:
    """CPU time of this process and of its waited-for children (a unit's torchrun and its ranks)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    """``fn()`` and the CPU seconds it took."""
    start = cpu_seconds()
    return fn(), cpu_seconds() - start


def record_timing(store: RunStore, name: str, r: int | None, wall_s: float, cpu_s: float, units: int) -> None:
    """Keep one stage run's figures, and copy the round's into its history row when there is one."""
    rel = timings_rel(r)
    timings: dict[str, Any] = store.read_json(rel) if store.exists(rel) else {}
    timings[name] = {"wall_s": round(wall_s, 3), "cpu_s": round(cpu_s, 3), "units": units,
                     "units_per_s": round(units / wall_s, 3) if wall_s > 0 else None}
    store.write_json(rel, timings)
    if r is not None and store.exists(HISTORY):
        import pandas as pd

        history = store.read_parquet(HISTORY)
        at = history["round"] == r
        if at.any():
            for stage, t in timings.items():
                history.loc[at, f"{stage}_s"] = t["wall_s"]
                history.loc[at, f"{stage}_cpu_s"] = t["cpu_s"]
            history.loc[at, "wall_s"] = sum(t["wall_s"] for t in timings.values())
            store.write_parquet(HISTORY, pd.DataFrame(history))

"""What a stage is: a name, the config fields it reads, the stages whose outputs it reads, and its steps.

A stage's work is a list of :class:`Step`: each step lists the units still to do (cheap: it reads completion
records) and runs one unit (the heavy work: a Dask task under Prefect, a plain call in-process). The steps run in
order; a step lists its units only once the previous step's are all done. An iterative step (``again``: sharded
Lloyd's iterations) lists its next batch once the last one ran, until it lists none (:meth:`Step.batches`). The
last step writes the stage's completion record. Whoever runs a stage (:mod:`deepercluster.stages.runner`
in-process, the Prefect flow ``flows/stages.py`` on Dask) checks its fingerprint first
(:mod:`deepercluster.stages.lineage`).

Adding a stage is one module: subclass :class:`Stage`, give it steps, and :func:`register` an instance (see
``tests/test_stages.py`` for a toy stage).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol

from deepercluster.config import PipelineConfig
from deepercluster.errors import ConfigError, StoreError
from deepercluster.store import RunStore

log = logging.getLogger("deepercluster")


class Reporter(Protocol):
    """Where a unit reports while it runs: log lines, a fraction done, and whether it should stop early."""

    def line(self, text: str) -> None: ...

    def progress(self, fraction: float) -> None: ...

    def should_stop(self) -> bool: ...


class LogReporter:
    """The in-process reporter: lines to the ``deepercluster`` logger, progress ignored, never stops."""

    def line(self, text: str) -> None:
        if text.strip():
            log.info(text)

    def progress(self, fraction: float) -> None:
        pass

    def should_stop(self) -> bool:
        return False


RECORD_KEYS = ("unit", "id", "finished_at", "pid", "fingerprint")  # what every completion record holds
Unit = Hashable  # a small picklable value naming one unit of a step (a shard id, a list of shard ids, a name)
Round = int | None  # None for the data stages


@dataclass(frozen=True)
class Step:
    """One phase of a stage: ``todo`` lists its units not done yet (light, runs where the stage is driven);
    ``run`` does one unit (heavy, runs on a worker) and returns a small, JSON-able value."""

    name: str
    todo: Callable[[RunStore, PipelineConfig, Round], Sequence[Unit]]
    run: Callable[[RunStore, PipelineConfig, Round, Unit, Reporter], Any]
    label: Callable[[Unit], str] = str
    gpu: bool = False  # with runtime.gpu_workers: one GPU per unit
    resources: Callable[[PipelineConfig], dict[str, int] | None] | None = None  # overrides ``gpu``
    retries: int = 0
    retry_user_errors: bool = False  # retry even a DeeperClusterError (training: a retry resumes a checkpoint)
    again: bool = False  # list the units again once a batch ran, until none is left (an iterative step)
    together: bool = False  # a batch's units run at the same time (each waits for the others: torchrun agents)
    # units with the same key run on the same worker at every batch (sharded Lloyd: a block's rows stay in its
    # worker's memory between iterations); None: anywhere
    affinity: Callable[[Unit], Hashable | None] | None = None

    def batches(self, store: RunStore, cfg: PipelineConfig, r: Round) -> Iterator[list[Unit]]:
        """The step's units, batch by batch: one batch, or (``again``) a batch after each until ``todo`` lists
        none. A batch listed twice in a row made no progress: a StoreError, not a loop."""
        last: list[Unit] | None = None
        while todo := list(self.todo(store, cfg, r)):
            if todo == last:
                raise StoreError(f"step {self.name} still lists {', '.join(map(self.label, todo[:3]))} after "
                                 "running them: its units record nothing (a bug, or a store that drops writes)")
            yield todo
            if not self.again:
                return
            last = todo


def pin_workers(units: Sequence[Unit], key: Callable[[Unit], Hashable | None], workers: Sequence[str]) \
        -> list[str | None]:
    """The worker each unit should run on: the units' keys in sorted order dealt round-robin over the sorted
    ``workers`` (balanced, and the same at every batch listing the same keys); None for a unit without a key."""
    keys = [key(u) for u in units]
    order = {k: i for i, k in enumerate(sorted({k for k in keys if k is not None}, key=repr))}
    pool = sorted(workers)
    return [pool[order[k] % len(pool)] if k is not None and pool else None for k in keys]


def until_done(stage: str, unit: str = "finalize") -> Callable[[RunStore, PipelineConfig, Round], list[str]]:
    """The ``todo`` of a stage's last step: its one unit (which records the stage done) until the stage is done."""

    def todo(store: RunStore, cfg: PipelineConfig, r: Round) -> list[str]:
        return [] if store.stage_done(stage, r) else [unit]

    return todo


@dataclass
class Stage:
    """A stage of the pipeline. Subclasses set the class attributes and implement :meth:`steps`, :meth:`inputs`,
    :meth:`discard` and :meth:`result`.

    ``fields`` are the dotted config fields whose values make the stage's outputs (a section name stands for every
    field of that section); fields in ``config.RESULT_NEUTRAL`` are left out wherever they are named. ``version``
    is the stage's output format: bump it when the same fields would now produce different outputs."""

    name: ClassVar[str]
    section: ClassVar[str]  # the config section of this stage's own settings
    scope: ClassVar[Literal["data", "round"]] = "round"
    version: ClassVar[int] = 1
    fields: ClassVar[tuple[str, ...]] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    def field_names(self, cfg: PipelineConfig, r: Round) -> tuple[str, ...]:
        return self.fields

    def inputs(self, cfg: PipelineConfig, r: Round) -> list[tuple[str, Round]]:
        """The (stage, round) pairs whose outputs this stage reads."""
        return []

    def steps(self) -> list[Step]:
        raise NotImplementedError

    def discard(self, store: RunStore, cfg: PipelineConfig, r: Round) -> None:
        """Remove every output and record of the stage (``--force``, or a changed fingerprint)."""
        raise NotImplementedError

    def result(self, store: RunStore, cfg: PipelineConfig, r: Round) -> dict[str, Any]:
        """The summary of the done stage (what its flow returns): its stage record less the bookkeeping."""
        record = store.done_record(self.name, r, "_stage") or {}
        return {k: v for k, v in record.items() if k not in RECORD_KEYS}

    def step(self, name: str) -> Step:
        for s in self.steps():
            if s.name == name:
                return s
        raise ConfigError(f"stage {self.name} has no step {name!r}")

    def check_round(self, cfg: PipelineConfig, r: Round) -> None:
        """Raise a one-line error unless ``r`` is a round this stage runs in (data stages: ignored)."""
        if self.scope == "round" and (r is None or not 0 <= r < cfg.rounds):
            raise ConfigError(f"round {r} is outside this run's rounds 0..{cfg.rounds - 1}")


_REGISTRY: dict[str, Stage] = {}


def register(stage: Stage) -> Stage:
    """Make ``stage`` runnable by name (``deepercluster stage NAME``, the flow ``stage``)."""
    _REGISTRY[stage.name] = stage
    return stage


BUILTIN = ("shard", "extract", "cluster", "train", "evaluate")  # modules of deepercluster.stages, in run order


def get_stage(name: str) -> Stage:
    """The stage called ``name``. A built-in stage's module is imported alone: a process running the cluster stage
    does not import the extract or train stage's torch (a streamed clustering under a memory budget cannot spare
    its ~0.5 GB)."""
    if name not in _REGISTRY and name in BUILTIN:
        importlib.import_module(f"deepercluster.stages.{name}")
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown stage {name!r}; stages are {', '.join(stage_names())}") from None


def stage_names() -> list[str]:
    """Every stage: the built-in ones in run order, then those registered since (a toy stage in a test)."""
    for name in BUILTIN:
        importlib.import_module(f"deepercluster.stages.{name}")
    return [*BUILTIN, *(n for n in _REGISTRY if n not in BUILTIN)]

"""Checking a run's artifacts against their completion records, and recomputing only the bad units.

Every completion record lists what its unit wrote with the size and SHA-256 of the bytes (``outputs``, see
:meth:`RunStore.mark_done`). :func:`verify_run` reads every listed file back and reports one :class:`Problem` per
unit whose files are missing, resized or changed; :func:`repair_run` recomputes exactly those units (their bad files
and records removed, the stage's steps run again: they redo what has no record) and compares the new outputs with
the recorded checksums. Identical outputs keep the stage's identity (its record ``id``), so the stages that read it
stay done; outputs that differ (a recomputation that is not bit-reproducible) give the stage a new identity, and
stages that read it become stale (``deepercluster run`` recomputes them). Units whose outputs depend on each other
(cluster, shard) are then recomputed whole; extract's image shards are independent, so only the stage record is
renewed. This is ``deepercluster verify RUN [--round R] [--repair]``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from deepercluster.config import PipelineConfig
from deepercluster.errors import StoreError
from deepercluster.store import CHECKSUM, READ_ERRORS, ROUND_STAGES, STAGE_DONE, RunStore, unit_label

log = logging.getLogger("deepercluster")
STAGE_ORDER = ("shard", *ROUND_STAGES)
INDEPENDENT_UNITS = ("extract",)  # stages whose units never read each other's outputs


@dataclass(frozen=True)
class Problem:
    """One bad unit: its first bad file (``rel``), what is wrong with it, how many more of its files are bad, and
    the command that recomputes the unit."""

    stage: str
    round: int | None
    unit: str
    rel: str
    what: str
    bad: tuple[str, ...]  # every bad file of the unit (rel first)
    command: str

    @property
    def label(self) -> str:
        return unit_label(self.stage, self.round, self.unit)

    def line(self, store: RunStore) -> str:
        more = f" (and {len(self.bad) - 1} more of its files)" if len(self.bad) > 1 else ""
        return f"{store.url(self.rel)} {self.what}{more} (unit {self.label}): recompute it with `{self.command}`"


def _targets(store: RunStore, round_: int | None) -> list[tuple[str, int | None]]:
    """(stage, round) pairs to check: the data stage (all rounds only) and each round's stages, in run order."""
    out: list[tuple[str, int | None]] = [] if round_ is not None else [("shard", None)]
    rounds = [round_] if round_ is not None else sorted(int(n) for n in store.listdir("rounds") if n.isdigit())
    return out + [(stage, r) for r in rounds for stage in ROUND_STAGES]


def _check(store: RunStore, rel: str, recorded: dict[str, Any]) -> str | None:
    """What is wrong with ``rel`` against its recorded size and checksum (None: nothing)."""
    try:
        size = store.fs.size(store.path(rel))
    except FileNotFoundError:
        return "is missing"
    if size != recorded.get("size"):
        return f"has {size} bytes, its record {recorded.get('size')}"
    try:
        info = store.output_info(rel)
    except StoreError:
        return "is missing"
    except READ_ERRORS as err:
        return f"cannot be read ({type(err).__name__})"
    if CHECKSUM in recorded and info[CHECKSUM] != recorded[CHECKSUM]:
        return f"does not match its {CHECKSUM} checksum (same size: overwritten or damaged)"
    return None


def verify_run(store: RunStore, round_: int | None = None, summary: dict[str, int] | None = None,
               threads: int = 4) -> list[Problem]:
    """Every completion record's outputs (size and checksum, files read in ``threads`` threads): one Problem per
    bad unit, in run order. ``summary`` (when given) is filled with ``units``, ``files``, ``bytes`` checked and
    ``unlisted`` (done units, stage records aside, whose record lists no file: training's, or made before records
    listed files)."""
    jobs: list[tuple[str, int | None, str, str, dict[str, Any]]] = []
    units = unlisted = 0
    for stage, r in _targets(store, round_):
        names = store.done_units(stage, r) + ([STAGE_DONE] if store.stage_done(stage, r) else [])
        for unit, record in sorted(store.done_records(stage, r, names).items()):
            outputs = record.get("outputs") or {}
            units += 1
            unlisted += not outputs and unit != STAGE_DONE
            jobs += [(stage, r, unit, rel, recorded) for rel, recorded in sorted(outputs.items())]
    with ThreadPoolExecutor(max(1, threads)) as pool:
        results = list(pool.map(lambda job: _check(store, job[3], job[4]), jobs))
    bad: dict[tuple[str, int | None, str], list[tuple[str, str]]] = {}
    for (stage, r, unit, rel, _), what in zip(jobs, results, strict=True):
        if what is not None:
            bad.setdefault((stage, r, unit), []).append((rel, what))
    if summary is not None:
        summary.update(units=units, files=len(jobs), unlisted=unlisted,
                       bytes=int(sum(int(job[4].get("size") or 0) for job in jobs)))
    return [Problem(stage, r, unit, files[0][0], files[0][1], tuple(rel for rel, _ in files),
                    store.recompute_command(stage, r))
            for (stage, r, unit), files in bad.items()]


def _run_steps(store: RunStore, cfg: PipelineConfig, stage: Any, r: int | None) -> None:
    """Every unit the stage's steps still list, in order, in this process (what ``run_stage`` does once the
    stage's fingerprint is checked)."""
    from deepercluster.stages.base import LogReporter

    for step in stage.steps():
        for todo in step.batches(store, cfg, r):
            for unit in todo:
                step.run(store, cfg, r, unit, LogReporter())


def _sums(record: dict[str, Any] | None) -> dict[str, Any]:
    return {rel: (o.get("size"), o.get(CHECKSUM)) for rel, o in ((record or {}).get("outputs") or {}).items()}


def repair_run(store: RunStore, cfg: PipelineConfig, problems: Iterable[Problem]) -> list[str]:
    """Recompute the units of ``problems`` (only them, stage by stage in run order); returns one line per stage
    saying what was recomputed and whether its outputs are the recorded bytes again."""
    from deepercluster.stages import get_stage, run_stage
    from deepercluster.stages.lineage import round_label, stage_state

    groups: dict[tuple[str, int | None], list[Problem]] = {}
    for p in problems:
        groups.setdefault((p.stage, p.round), []).append(p)
    lines = []
    for (name, r), probs in sorted(groups.items(), key=lambda g: (-1 if g[0][1] is None else g[0][1],
                                                                  STAGE_ORDER.index(g[0][0]))):
        stage, label = get_stage(name), round_label(name, r)
        state = stage_state(store, cfg, stage, r)
        if state.status in ("stale", "waiting"):
            lines.append(f"{label}: {state.describe()}: not repaired, `deepercluster run` recomputes it")
            continue
        units = {p.unit for p in probs}
        old = store.done_records(name, r, units)
        for p in probs:
            for rel in p.bad:
                store.remove(rel)
        for unit in units:
            store.forget(name, r, unit)
        _run_steps(store, cfg, stage, r)
        new = store.done_records(name, r, units)
        changed = sorted(u for u in units if _sums(new.get(u)) != _sums(old.get(u)))
        done = ", ".join("the stage record" if u == STAGE_DONE else u for u in sorted(units))
        if not changed:
            if STAGE_DONE in old:
                store.keep_identity(name, r, STAGE_DONE, old[STAGE_DONE]["id"])
            lines.append(f"{label}: recomputed {done}: the same bytes as recorded")
            continue
        if name in INDEPENDENT_UNITS and STAGE_DONE not in units:
            store.forget(name, r, STAGE_DONE)  # the stage record is made again: a new identity
            _run_steps(store, cfg, stage, r)
        elif changed != [STAGE_DONE]:
            run_stage(store, cfg, name, r, force=True)
            done = "the whole stage"
        lines.append(f"{label}: recomputed {done}; {', '.join(changed)} differ from the recorded bytes (not "
                     f"reproducible here): {label} has a new identity and the stages that read it are stale "
                     "(`deepercluster run` recomputes them)")
    return lines

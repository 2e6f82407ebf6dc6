"""Fingerprints: what made each stage's outputs, so that exactly the stages whose inputs changed are recomputed.

The lineage of a stage in a round is
  * its format ``version``,
  * the values of the config fields it reads (``Stage.fields``, minus the result-neutral ones),
  * the identity of each input: the ``id`` of the completion record of each (stage, round) it reads.
It is written to ``<scope>/_lineage/<stage>.json`` before the stage's first unit runs; every completion record of
the stage written afterwards carries its fingerprint (a hash of the lineage). The stage counts as done when its
stage record exists and its lineage matches the one the current config and the current inputs give.

Matching is by field, not by hash: a field the record does not know (added to the config after the run was
written) matches when it holds its default, so upgrades that add fields recompute nothing. A recomputed stage
writes a new completion record, with a new ``id``: every stage that read the old one no longer matches.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

from deepercluster.config import RESULT_NEUTRAL, PipelineConfig
from deepercluster.stages.base import Round, Stage
from deepercluster.store import STAGE_DONE, RunStore

Status = Literal["done", "stale", "partial", "todo", "waiting"]


def round_label(name: str, r: Round) -> str:
    return name if r is None else f"{name} r{r}"


def _lookup(tree: dict[str, Any], dotted: str) -> Any:
    value: Any = tree
    for key in dotted.split("."):
        value = value[key]
    return value


@lru_cache(maxsize=1)
def _defaults() -> dict[str, Any]:
    return PipelineConfig().model_dump(mode="json")


def expand_fields(names: tuple[str, ...]) -> list[str]:
    """Dotted leaf fields of ``names`` (a section stands for its fields), result-neutral ones left out."""
    out = []
    for name in names:
        value = _lookup(_defaults(), name)
        leaves = [f"{name}.{k}" for k in value] if isinstance(value, dict) and "." not in name else [name]
        out += [f for f in leaves if f not in RESULT_NEUTRAL]
    return sorted(set(out))


def output_id(store: RunStore, name: str, r: Round) -> str | None:
    """Identity of a stage's current outputs: the id of its completion record (None while it is not done)."""
    record = store.done_record(name, r, STAGE_DONE)
    if record is None:
        return None
    return str(record.get("id") or record.get("finished_at"))


def expected_lineage(store: RunStore, cfg: PipelineConfig, stage: Stage, r: Round) -> dict[str, Any]:
    """The lineage the current config and the current inputs give ``stage`` in round ``r``."""
    tree = cfg.model_dump(mode="json")
    return {
        "stage": stage.name,
        "round": r,
        "version": stage.version,
        "fields": {f: _lookup(tree, f) for f in expand_fields(stage.field_names(cfg, r))},
        "inputs": {round_label(s, rr): output_id(store, s, rr) for s, rr in stage.inputs(cfg, r)},
    }


def fingerprint(lineage: dict[str, Any]) -> str:
    blob = json.dumps(lineage, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_lineage(store: RunStore, name: str, r: Round) -> dict[str, Any] | None:
    rel = store.lineage_rel(name, r)
    return store.read_json(rel) if store.exists(rel) else None


def write_lineage(store: RunStore, name: str, r: Round, lineage: dict[str, Any]) -> None:
    store.write_json(store.lineage_rel(name, r), {"lineage": lineage, "fingerprint": fingerprint(lineage)})


def differences(recorded: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """Why ``recorded`` does not match ``expected``: one short phrase per difference (empty: they match)."""
    out = []
    if recorded.get("version") != expected["version"]:
        out.append(f"format v{recorded.get('version')} -> v{expected['version']}")
    old_fields = recorded.get("fields", {})
    for f, value in expected["fields"].items():
        if f in old_fields:
            if old_fields[f] != value:
                out.append(f"{f} {_short(old_fields[f])} -> {_short(value)}")
        elif value != _lookup(_defaults(), f):  # a field added since the record: only its default matches
            out.append(f"{f} (new field) = {_short(value)}")
    old_inputs = recorded.get("inputs", {})
    for name, ident in expected["inputs"].items():
        if old_inputs.get(name) != ident:
            out.append(f"input {name} was recomputed" if ident else f"input {name} is not done")
    return out


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass(frozen=True)
class StageState:
    name: str
    round: Round
    status: Status
    reasons: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return round_label(self.name, self.round)

    def describe(self) -> str:
        return f"{self.label}: {self.status}" + (f" ({'; '.join(self.reasons)})" if self.reasons else "")


def stage_state(store: RunStore, cfg: PipelineConfig, stage: Stage, r: Round) -> StageState:
    """Where the stage stands against the current config and inputs (reads two small records)."""
    expected = expected_lineage(store, cfg, stage, r)
    waiting = [name for name, ident in expected["inputs"].items() if ident is None]
    record = read_lineage(store, stage.name, r)
    done = store.stage_done(stage.name, r)
    if record is None:  # never started, or made before fingerprints (adopted as it is)
        if done:
            return StageState(stage.name, r, "done", ("made before fingerprints: adopted",))
        if waiting:
            return StageState(stage.name, r, "waiting", tuple(f"{w} not done" for w in waiting))
        partial = bool(store.done_units(stage.name, r))
        return StageState(stage.name, r, "partial" if partial else "todo")
    reasons = differences(record["lineage"], expected)
    if reasons:
        return StageState(stage.name, r, "waiting" if waiting else "stale", tuple(reasons))
    return StageState(stage.name, r, "done" if done else "partial")


def plan(store: RunStore, cfg: PipelineConfig, sequence: list[tuple[Stage, Round]]) -> list[StageState]:
    """The state of every stage of ``sequence`` (in run order) as the next run will find it: a stage downstream of
    one that will be recomputed is stale too, with the reason."""
    redo: set[str] = set()
    out = []
    for stage, r in sequence:
        state = stage_state(store, cfg, stage, r)
        upstream = [round_label(s, rr) for s, rr in stage.inputs(cfg, r) if round_label(s, rr) in redo]
        if upstream and state.status == "done":
            state = StageState(stage.name, r, "stale", tuple(f"input {u} is recomputed first" for u in upstream))
        elif upstream and state.status == "waiting":
            state = StageState(stage.name, r, "todo", ())
        if state.status != "done":
            redo.add(state.label)
        out.append(state)
    return out

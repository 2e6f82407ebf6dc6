"""The stage abstraction: each built-in stage is found by its name (module, config section, tests), and a newcomer
adds a stage in one module: here a toy stage (per-shard feature norms of a round) defined in this file, run with
the same runner, fingerprints and staleness as the built-in ones."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from conftest import tiny_overrides

import deepercluster
from deepercluster.config import PipelineConfig, build_config
from deepercluster.errors import StoreError
from deepercluster.features import open_features
from deepercluster.stages import Stage, Step, get_stage, register, run_stage, stage_names
from deepercluster.stages.lineage import stage_state
from deepercluster.store import RunStore

ROOT = Path(deepercluster.__file__).parent


def test_every_stage_is_found_by_its_name():
    assert set(stage_names()) == {"shard", "extract", "cluster", "train", "evaluate"}
    for name in stage_names():
        stage = get_stage(name)
        assert (ROOT / "stages" / f"{name}.py").is_file(), name
        assert stage.section in PipelineConfig.model_fields, name
        assert list((ROOT.parent / "tests").glob(f"test_{name}*.py")), name


# ---- a toy stage, as a newcomer would write it in deepercluster/stages/norms.py ------------------------------------
def _todo(store: RunStore, cfg: PipelineConfig, r: int | None) -> list[int]:
    shards = store.done_record("shard", None, "_stage")["shards"]
    return [s for s in range(shards) if not store.is_done("norms", r, f"shard-{s:05d}")]


def _norm(store: RunStore, cfg: PipelineConfig, r: int | None, shard: int, report: Any) -> float:
    rows = open_features(store, r)[shard * cfg.data.shard_size:(shard + 1) * cfg.data.shard_size]
    value = float(np.linalg.norm(rows.astype(np.float32), axis=1).mean()) * cfg.eval.knn_k
    store.mark_done("norms", r, f"shard-{shard:05d}", {"norm": value})
    return value


def _finish(store: RunStore, cfg: PipelineConfig, r: int | None, unit: Any, report: Any) -> None:
    values = [store.done_record("norms", r, f"shard-{s:05d}")["norm"] for s in range(len(store.done_units("norms", r)))]
    store.mark_stage_done("norms", r, {"mean": float(np.mean(values))})


@dataclass
class NormsStage(Stage):
    name: ClassVar[str] = "norms"
    section: ClassVar[str] = "eval"
    fields: ClassVar[tuple[str, ...]] = ("eval.knn_k",)  # what its outputs depend on (a stand-in here)

    def inputs(self, cfg: PipelineConfig, r: int | None) -> list[tuple[str, int | None]]:
        return [("extract", r)]

    def steps(self) -> list[Step]:
        return [Step("shards", _todo, _norm), Step("finish", lambda store, cfg, r: [] if store.stage_done(
            "norms", r) else ["finish"], _finish)]

    def discard(self, store: RunStore, cfg: PipelineConfig, r: int | None) -> None:
        store.reset_stage("norms", r)


def test_a_toy_stage_in_one_module_runs_with_fingerprints(tmp_path: Path, digits_dir: Path):
    stage = register(NormsStage())
    try:
        store, cfg = RunStore(tmp_path / "run"), build_config(tiny_overrides(digits_dir))
        with pytest.raises(StoreError, match="norms r0 reads extract r0, which is not done: run that stage first"):
            run_stage(store, cfg, "norms", 0)
        run_stage(store, cfg, "shard")
        run_stage(store, cfg, "extract", 0)
        first = run_stage(store, cfg, "norms", 0)
        assert first["mean"] > 0 and len(store.done_units("norms", 0)) == 6
        record = store.done_record("norms", 0, "_stage")
        assert record["fingerprint"] == store.fingerprint("norms", 0)
        assert run_stage(store, cfg, "norms", 0) == first and store.done_record("norms", 0, "_stage") == record

        changed = build_config(tiny_overrides(digits_dir, eval={"knn_k": 40}))
        state = stage_state(store, changed, stage, 0)
        assert state.status == "stale" and state.reasons == ("eval.knn_k 20 -> 40",)
        assert run_stage(store, changed, "norms", 0)["mean"] == pytest.approx(2 * first["mean"])

        run_stage(store, changed, "extract", 0, force=True)  # its input recomputed: the toy stage is stale
        assert stage_state(store, changed, stage, 0).reasons == ("input extract r0 was recomputed",)
        assert run_stage(store, changed, "norms", 0)["mean"] == pytest.approx(2 * first["mean"], rel=1e-3)
    finally:
        from deepercluster.stages import base

        base._REGISTRY.pop("norms", None)


def test_pinned_units_keep_their_worker_from_batch_to_batch():
    """A sharded Lloyd block's share goes to the same worker at every iteration (its rows stay in that worker's
    memory), the blocks dealt evenly; units without a key go anywhere."""
    from deepercluster.stages.base import pin_workers

    def key(u):
        return None if u[1] != "part" else (u[0], u[2])

    workers = ["tcp://b:2", "tcp://a:1"]
    batch = [("level1", "part", s, s + 1) for s in (6, 0, 4, 2)] + [("level1", "reduce", -1, -1)]
    pins = pin_workers(batch, key, workers)
    assert pins[-1] is None
    assert sorted(pins[:4]) == ["tcp://a:1", "tcp://a:1", "tcp://b:2", "tcp://b:2"]  # balanced
    again = pin_workers(list(reversed(batch)), key, list(reversed(workers)))  # another order, same answer
    assert dict(zip(batch, pins, strict=True)) == dict(zip(reversed(batch), again, strict=True))

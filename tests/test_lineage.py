"""Fingerprints in a real run (in-process runner): a changed field recomputes exactly the stages that read it and
those downstream, result-neutral fields recompute nothing, ``rounds`` can be raised, and a run written before a
config field existed resumes without recomputing anything."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from conftest import tiny_overrides

from deepercluster.config import build_config, config_from_yaml_text
from deepercluster.evaluation.stage import load_history
from deepercluster.run import init_run, open_run
from deepercluster.stages import run_all, run_plan, run_stage
from deepercluster.store import RunStore

FIXTURE = Path(__file__).parent / "fixtures" / "default-run-config.yaml"  # the default run's config.yaml, v1
STAGES = ("extract", "cluster", "train", "evaluate")


def records(store: RunStore) -> dict[tuple[str, int | None], dict]:
    """Every done stage's completion records (units and stage) and lineage, by (stage, round)."""
    out = {}
    rounds = sorted(int(n) for n in store.listdir("rounds"))
    for stage, r in [("shard", None), *[(s, r) for r in rounds for s in STAGES]]:
        if store.stage_done(stage, r):
            units = {u: store.done_record(stage, r, u) for u in [*store.done_units(stage, r), "_stage"]}
            out[stage, r] = {"units": units, "lineage": store.read_json(store.lineage_rel(stage, r))}
    return out


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, digits_dir: Path) -> tuple[Path, dict]:
    """A finished 3-round run (and the final model's extract + evaluate, round 3)."""
    root = tmp_path_factory.mktemp("lineage") / "run"
    store, cfg = RunStore(root), build_config(tiny_overrides(digits_dir, rounds=3))
    init_run(store, cfg)
    run_all(store, cfg)
    return root, records(store)


def _copy(finished: tuple[Path, dict], dest: Path) -> RunStore:
    shutil.copytree(finished[0], dest)
    return RunStore(dest)


def _rerun(store: RunStore, overrides: dict) -> list[str]:
    """What `deepercluster run` does on an existing run with a changed config: save it, then run every stage."""
    changes = init_run(store, build_config(overrides))
    _, cfg = open_run(store.uri)
    run_all(store, cfg)
    return changes


def test_raising_rounds_continues_the_run(finished, tmp_path: Path, digits_dir: Path):
    store = _copy(finished, tmp_path / "run")
    before = finished[1]
    _rerun(store, tiny_overrides(digits_dir, rounds=4))
    after = records(store)
    for key, value in before.items():
        if key[1] is not None and key[1] == 3 and key[0] == "evaluate":
            continue  # round 3 was the final model's evaluation: now a full round, evaluated with its clusters
        assert after[key] == value, key  # rounds 0-2 and round 3's features: untouched
    assert after["evaluate", 3] != before["evaluate", 3]
    assert {("cluster", 3), ("train", 3), ("extract", 4), ("evaluate", 4)} <= after.keys()
    assert load_history(store)["round"].tolist() == [0, 1, 2, 3, 4]
    assert "nmi_labels" in store.read_json("rounds/3/eval/metrics.json")  # clustered now


def test_a_changed_field_recomputes_its_stage_and_everything_downstream(finished, tmp_path: Path, digits_dir: Path):
    store = _copy(finished, tmp_path / "run")
    before = finished[1]
    overrides = tiny_overrides(digits_dir, rounds=3, cluster={"k": 6})
    _, cfg = open_run(store.uri)
    states = {st.label: st for st in run_plan(store, build_config(overrides))}
    assert states["cluster r0"].status == "stale" and states["cluster r0"].reasons == ("cluster.k 5 -> 6",)
    assert states["extract r1"].reasons == ("input train r0 is recomputed first",)
    assert states["extract r0"].status == states["shard"].status == "done"
    assert _rerun(store, overrides) == ["cluster.k 5 -> 6"]
    after = records(store)
    assert after["shard", None] == before["shard", None] and after["extract", 0] == before["extract", 0]
    for key in before:
        if key not in (("shard", None), ("extract", 0)):
            assert after[key]["units"]["_stage"]["id"] != before[key]["units"]["_stage"]["id"], key
    assert store.read_json("rounds/2/clusters/stats.json")["targets"] == 2 * 6


def test_result_neutral_fields_recompute_nothing(finished, tmp_path: Path, digits_dir: Path):
    store = _copy(finished, tmp_path / "run")
    overrides = tiny_overrides(digits_dir, rounds=3, extract={"decode_threads": 1, "prefetch_batches": 3,
                                                             "shards_per_task": 1},
                               data={"part_size": 7}, runtime={"dask_workers": 1, "stream_threads": 1})
    changes = _rerun(store, overrides)
    assert len(changes) == 6 and "extract.decode_threads 2 -> 1" in changes
    assert records(store) == finished[1]
    assert open_run(store.uri)[1].extract.decode_threads == 1  # saved: the next units use it


def test_a_run_made_before_a_field_existed_resumes_from_the_fixture_config(tmp_path: Path):
    """The checked-in config.yaml of the default run (schema 1), shard and round-0 extract done; then, as if both
    had been written by a version without ``model.bn_calibration``, the field is taken out of the saved config and
    of the lineage records: the current version resumes with nothing recomputed, because the field holds its
    default. With another value, the stages that read it are stale."""
    store = RunStore(tmp_path / "run")
    store.write_text("config.yaml", FIXTURE.read_text())
    _, cfg = open_run(store.uri)
    assert cfg.model_dump() == build_config({}).model_dump()  # the fixture is the default run
    for name, r in (("shard", None), ("extract", 0)):
        run_stage(store, cfg, name, r)
    done = records(store)

    saved = yaml.safe_load(FIXTURE.read_text())
    del saved["model"]["bn_calibration"]
    store.write_text("config.yaml", yaml.safe_dump(saved, sort_keys=False))
    for name, r in (("shard", None), ("extract", 0)):
        rel = store.lineage_rel(name, r)
        record = store.read_json(rel)
        record["lineage"]["fields"].pop("model.bn_calibration", None)
        store.write_json(rel, record)
    older = records(store)
    assert all("model.bn_calibration" not in rec["lineage"]["lineage"]["fields"] for rec in older.values())

    _, cfg = open_run(store.uri)
    assert cfg.model.bn_calibration == 4096  # the field's default
    assert [st.status for st in run_plan(store, cfg)[:2]] == ["done", "done"]
    for name, r in (("shard", None), ("extract", 0)):
        run_stage(store, cfg, name, r)
    assert records(store) == older and older["extract", 0]["units"] == done["extract", 0]["units"]

    changed = config_from_yaml_text(yaml.safe_dump({**saved, "model": {**saved["model"], "bn_calibration": 64}}))
    extract = run_plan(store, changed)[1]
    assert extract.status == "stale" and extract.reasons == ("model.bn_calibration (new field) = 64",)

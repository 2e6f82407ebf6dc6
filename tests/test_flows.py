"""The Prefect flows against a real Prefect test server and a real Dask LocalCluster."""

from pathlib import Path

import pytest
from conftest import tiny_overrides

from deepercluster.clustering.stage import load_assignments
from deepercluster.config import build_config
from deepercluster.evaluation.stage import load_history
from deepercluster.run import init_run, open_run
from deepercluster.stages import run_plan
from deepercluster.store import ROUND_STAGES, RunStore
from tasks.publish import artifact_key

pytestmark = pytest.mark.slow


def _records(store: RunStore, stage: str, r: int) -> dict:
    return {u: store.done_record(stage, r, u) for u in [*store.done_units(stage, r), "_stage"]}


def test_pipeline_flow_runs_every_round_and_stage_reruns_alone(tmp_path: Path, digits_dir: Path, dask_address):
    from prefect.client.orchestration import get_client

    from flows.pipeline import pipeline_flow
    from flows.stages import stage_flow

    run = str(tmp_path / "run")
    metrics = pipeline_flow(run, config=tiny_overrides(digits_dir), dask_address=dask_address)
    store = RunStore(run)
    assert [m["round"] for m in metrics] == [0, 1, 2]  # round 2: the model the last training made
    for r in (0, 1):
        for stage in ROUND_STAGES:
            assert store.stage_done(stage, r), (stage, r)
        for rel in ("model.pt", "features.zarr/zarr.json", "clusters/assignments.parquet", "clusters/stats.json",
                    "clusters/pca.npz", "train/final.pt", "eval/metrics.json"):
            assert store.exists(f"rounds/{r}/{rel}"), rel
    assert store.exists("rounds/2/model.pt")  # what a third round would start from
    history = load_history(store)
    # eval.final_round (default): the model the last training made is extracted and evaluated too (no clusters)
    assert history["round"].tolist() == [0, 1, 2] and store.exists("rounds/2/features.zarr/zarr.json")
    clustered = history[history["round"] < 2]
    assert clustered["nmi_labels"].between(0, 1).all() and clustered["nmi_prev"].notna().tolist() == [False, True]
    assert history["knn_acc"].between(0, 1).all() and history["knn_whitened_acc"].between(0, 1).all()
    # the heavy work ran on the Dask workers, none of it in this (the flow's) process: every unit of the PCA, the
    # whitening, the k-means (iterations, labels, level 2) and the evaluation records its process
    import os

    for stage, r in (("cluster", 0), ("cluster", 1), ("evaluate", 0), ("evaluate", 2)):
        pids = {u: rec["pid"] for u, rec in store.done_records(stage, r, store.done_units(stage, r)).items()}
        assert pids and os.getpid() not in pids.values(), (stage, r, pids)
    units = set(store.done_units("cluster", 0))
    assert {"pca", "whitened", "kmeans-level1", "super-0000", "whiten-00000", "assign-00000"} <= units
    assert {"cluster-metrics", "probes"} <= set(store.done_units("evaluate", 0))

    with get_client(sync_client=True) as client:
        artifact = client.read_latest_artifacts()
        assert any(a.key == artifact_key(store, "history") for a in artifact)

    # rerunning one stage (the flow behind `deepercluster stage` and the stage/<name> deployments) recomputes only
    # it; the stages that read its outputs become stale, and the next run recomputes exactly those
    downstream = {("train", 1), ("evaluate", 1), ("extract", 2), ("evaluate", 2)}
    untouched = {(s, r): _records(store, s, r) for s in ROUND_STAGES for r in (0, 1, 2)
                 if (s, r) != ("cluster", 1) and (s, r) not in downstream and store.stage_done(s, r)}
    before = store.done_record("cluster", 1, "_stage")
    assignments = load_assignments(store, 1)
    # rerun with blocks of 80 rows and a budget below every super-cluster: level 1 and level 2 as sharded Lloyd, each
    # iteration a batch of Dask tasks pinned to workers by block; where to compute is no change of what: the same
    # assignments, and the stages downstream stay as they are
    _, saved = open_run(run)
    init_run(store, saved.model_copy(update={"runtime": saved.runtime.model_copy(
        update={"block_rows": 80, "memory_budget_mb": 0.001})}))
    stage_flow(run, "cluster", 1, force=True, dask_address=dask_address)
    assert store.done_record("cluster", 1, "_stage")["finished_at"] > before["finished_at"]
    assert load_assignments(store, 1).equals(assignments)
    assert {"part-level1-00000", "part-super-0001-00002", "kmeans-super-0000"} <= set(store.done_units("cluster", 1))
    assert {k: _records(store, *k) for k in untouched} == untouched
    assert load_assignments(store, 1)["target"].between(0, 9).all()
    _, cfg = open_run(run)
    stale = {(st.name, st.round) for st in run_plan(store, cfg) if st.status == "stale"}
    assert stale == downstream
    trained = store.done_record("train", 1, "_stage")["id"]
    again = pipeline_flow(run, dask_address=dask_address)
    assert [m["round"] for m in again] == [0, 1, 2]
    assert store.done_record("train", 1, "_stage")["id"] != trained
    assert all(st.status == "done" for st in run_plan(store, cfg))
    assert {k: _records(store, *k) for k in untouched} == untouched

    # a rerun of the whole flow finds everything done and changes nothing
    done = {(s, r): _records(store, s, r) for s in ROUND_STAGES for r in (0, 1, 2) if store.stage_done(s, r)}
    pipeline_flow(run, dask_address=dask_address)
    assert {k: _records(store, *k) for k in done} == done


def test_stage_flow_checks_its_stage_round_and_deployment(tmp_path: Path, digits_dir: Path, monkeypatch):
    """One-line errors before any work: a round the run does not have, and a stage/<name> deployment asked to run
    another stage (its `stage` parameter overridden)."""
    from deepercluster.errors import ConfigError
    from flows.stages import stage_flow

    run = tmp_path / "run"
    init_run(RunStore(run), build_config(tiny_overrides(digits_dir)))
    with pytest.raises(ConfigError, match=r"round 2 is outside this run's rounds 0\.\.1"):
        stage_flow.fn(str(run), "cluster", 2)
    monkeypatch.setenv("PREFECT__RUNTIME__DEPLOYMENT__NAME", "cluster-docker")
    with pytest.raises(ConfigError, match="deployment stage/cluster-docker runs the cluster stage, not train"):
        stage_flow.fn(str(run), "train", 0)
    assert not RunStore(run).done_units("train", 0)


def test_prefect_ui_reads_one_named_tagged_flow_run_per_stage_and_runs_share_no_artifact(tmp_path: Path,
                                                                                          digits_dir: Path,
                                                                                          dask_address):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    from flows.pipeline import pipeline_flow

    keys = []
    for name in ("ui-a", "ui-b"):
        run = str(tmp_path / name)
        pipeline_flow(run, config=tiny_overrides(digits_dir, rounds=1), dask_address=dask_address)
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"run:{name}"])))
            assert len(runs) <= 2 + 4 * (1 + 1)  # the pipeline, then one flow run per stage run
            names = sorted(fr.name for fr in runs)
            assert names == sorted([f"run · {name}", f"shard · {name}", *(f"r0 {s} · {name}" for s in ROUND_STAGES),
                                    f"r1 extract · {name}", f"r1 evaluate · {name}"])
            for fr in runs:
                assert "method:deepercluster" in fr.tags
                if fr.name.startswith("r1 "):
                    assert "round:1" in fr.tags
            top = next(fr for fr in runs if fr.name.startswith("run · "))
            artifacts = client.read_artifacts()
            mine = {a.key for a in artifacts if a.key and a.key.startswith(artifact_key(RunStore(run)))}
            summary = [a for a in artifacts if a.key == artifact_key(RunStore(run), "summary")]
            assert summary and any(a.flow_run_id == top.id for a in summary)
            assert "now: done" in summary[0].data or any("now: done" in a.data for a in summary)
        keys.append(mine)
    assert keys[0] and keys[1] and not keys[0] & keys[1]

"""The cluster flow on a real Dask LocalCluster (2 worker processes) and a real Prefect test server: the
super-cluster units spread over the workers give the assignments of an in-process run, bit for bit, and the
cluster-size histogram shows up as a Prefect artifact."""

from pathlib import Path

import pytest
from conftest import tiny_overrides

from deepercluster.clustering.stage import load_assignments
from deepercluster.config import build_config
from deepercluster.run import init_run
from deepercluster.stages import run_stage
from deepercluster.store import RunStore
from tasks.publish import artifact_key

pytestmark = pytest.mark.slow


def test_cluster_flow_on_dask_matches_one_process(tmp_path: Path, digits_dir: Path, dask_address):
    from prefect.client.orchestration import get_client

    from flows.stages import stage_flow

    cfg = build_config(tiny_overrides(digits_dir, cluster={"super_clusters": 4, "k": 5},
                                      runtime={"stream_threads": 3}))
    flow_store, local_store = RunStore(tmp_path / "flow"), RunStore(tmp_path / "local")
    for store in (flow_store, local_store):
        init_run(store, cfg)
        run_stage(store, cfg, "shard")
        run_stage(store, cfg, "extract", 0)

    stats = stage_flow(flow_store.uri, "cluster", 0, dask_address=dask_address)
    assert stats["targets"] == 20 and stats["level2"]["streamed"] == []
    # one process, one reading thread, every unit streamed out of core: the same assignments
    one = cfg.runtime.model_copy(update={"stream_threads": 1, "memory_budget_mb": 0.001})
    local = run_stage(local_store, cfg.model_copy(update={"runtime": one}), "cluster", 0)
    assert local["level2"]["streamed"] == [0, 1, 2, 3]
    assert load_assignments(flow_store, 0).equals(load_assignments(local_store, 0))

    with get_client(sync_client=True) as client:
        keys = {a.key for a in client.read_latest_artifacts()}
    assert artifact_key(flow_store, "r0", "cluster-histogram") in keys

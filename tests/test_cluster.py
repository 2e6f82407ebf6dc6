from pathlib import Path

import faiss
import numpy as np
import pytest
import zarr
from conftest import tiny_overrides

from deepercluster.clustering import fit_pca, kmeans
from deepercluster.clustering.kmeans import repair_empty
from deepercluster.clustering.stage import assignments_rel, load_assignments, run_cluster_stage
from deepercluster.config import build_config
from deepercluster.data.shard import run_shard_stage
from deepercluster.errors import ConfigError, DataError
from deepercluster.features import features_rel, run_extract_stage
from deepercluster.store import RunStore


def _blobs(n=2000, d=16, centers=20, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centers, d)) * 4
    return (c[rng.integers(0, centers, n)] + rng.normal(size=(n, d))).astype(np.float32)


def test_kmeans_objective_matches_faiss():
    x = _blobs()
    ours = kmeans(x, 32, niter=20, seed=3)
    ref = faiss.Kmeans(x.shape[1], 32, niter=20, seed=3, max_points_per_centroid=100000)
    ref.train(x)
    ref_obj = float(ref.index.search(x, 1)[0].sum())
    assert ours.inertia <= ref_obj * 1.01
    assert ours.history[-1] <= ours.history[0]
    again = kmeans(x, 32, niter=20, seed=3)
    assert np.array_equal(again.assign, ours.assign)  # deterministic


def test_kmeans_repairs_empty_clusters_and_clamps_k():
    x = np.repeat(_blobs(n=6, d=4), 20, axis=0)  # 6 distinct points, 120 rows
    res = kmeans(x, 10, niter=5, seed=0)
    assert res.repairs > 0 and len(np.unique(res.assign)) == 6
    small = kmeans(_blobs(n=7, d=4), 50, niter=3, seed=0)
    assert small.k == 7 and small.k_requested == 50 and sorted(small.assign) == list(range(7))


def test_repair_splits_a_non_empty_cluster_deterministically():
    cents = np.arange(12, dtype=np.float64).reshape(4, 3)
    counts = np.array([0, 10, 0, 1])
    a, b = cents.copy(), cents.copy()
    repair_empty(a, counts.copy(), np.random.default_rng(1))
    repair_empty(b, counts.copy(), np.random.default_rng(1))
    assert np.array_equal(a, b)
    assert np.allclose(a[0], cents[1], rtol=1e-6) and np.allclose(a[2], cents[1], rtol=1e-6)


def test_pca_whitening_decorrelates_and_normalises():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 8)) @ rng.normal(size=(8, 8))
    pca = fit_pca(x, 4)
    y = (x - pca.mean) @ pca.components.T * pca.scale
    assert np.allclose(np.cov(y, rowvar=False, bias=True), np.eye(4), atol=1e-3)
    assert np.allclose(np.linalg.norm(pca.transform(x), axis=1), 1, atol=1e-5)


@pytest.fixture
def extracted(tmp_path: Path, digits_dir: Path):
    def make(**cluster):
        cfg = build_config(tiny_overrides(digits_dir, cluster=cluster))
        store = RunStore(tmp_path / "run")
        run_shard_stage(store, cfg.data)
        run_extract_stage(store, cfg, 0)
        return store, cfg

    return make


def test_hierarchical_cluster_stage(extracted):
    store, cfg = extracted(super_clusters=3, k=4)
    stats = run_cluster_stage(store, cfg, 0)
    a = load_assignments(store, 0)
    assert list(a.columns) == ["image_id", "super", "sub", "target", "distance"]
    assert a["image_id"].tolist() == list(range(240))
    assert a["super"].between(0, 2).all() and a["sub"].between(0, 3).all()
    assert (a["target"] == a["super"] * 4 + a["sub"]).all()
    assert stats["targets"] == 12 and stats["images"] == 240 and sum(stats["super_sizes"]) == 240
    assert store.done_units("cluster", 0) == ["level1", "super-0000", "super-0001", "super-0002"]
    assert store.exists("rounds/0/clusters/pca.npz")

    # a rerun reuses everything; --force recomputes to the same (deterministic) answer
    record = store.done_record("cluster", 0, "super-0001")
    run_cluster_stage(store, cfg, 0)
    assert store.done_record("cluster", 0, "super-0001") == record
    run_cluster_stage(store, cfg, 0, force=True)
    assert store.done_record("cluster", 0, "super-0001")["finished_at"] > record["finished_at"]
    assert load_assignments(store, 0).equals(a)


def test_non_finite_features_name_the_shard_and_write_nothing(extracted):
    store, cfg = extracted(super_clusters=1, k=5)
    array = zarr.open_array(store.url(features_rel(0)), mode="r+")
    array[130, 3] = np.nan
    with pytest.raises(DataError, match="feature shard 3 of round 0"):
        run_cluster_stage(store, cfg, 0)
    assert not store.exists(assignments_rel(0)) and not store.stage_done("cluster", 0)


def test_too_many_clusters_for_the_run(extracted):
    store, cfg = extracted(super_clusters=1, k=5)
    big = cfg.model_copy(update={"cluster": cfg.cluster.model_copy(update={"k": 500})})
    with pytest.raises(ConfigError, match="exceeds the 240 images"):
        run_cluster_stage(store, big, 0)

import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest
import zarr
from conftest import tiny_overrides

from deepercluster.clustering import fit_pca, kmeans
from deepercluster.clustering import vectors as vectors_module
from deepercluster.clustering.assign import NearestCentroid, exact_sq_distances
from deepercluster.clustering.kernels import nearest_by_column, signed_row_sums
from deepercluster.clustering.kmeans import ArrayVectors, lloyd, repair_empty, snap_to_grid
from deepercluster.clustering.pca import Moments, pca_from_moments
from deepercluster.clustering.stage import (
    assignments_rel,
    clusters_rel,
    load_assignments,
    whitened_features,
)
from deepercluster.clustering.whitening import pca_rel
from deepercluster.config import build_config
from deepercluster.errors import ConfigError, DataError
from deepercluster.evaluation.metrics import nmi
from deepercluster.features import features_rel
from deepercluster.stages import run_stage
from deepercluster.store import RunStore


def _blobs(n=2000, d=16, centers=20, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centers, d)) * 4
    return (c[rng.integers(0, centers, n)] + rng.normal(size=(n, d))).astype(np.float32)


# ---- k-means ------------------------------------------------------------------------------------------------------
def test_kmeans_objective_matches_faiss_with_the_same_init():
    x = _blobs()
    init = snap_to_grid(x)[np.sort(np.random.default_rng(3).choice(len(x), 32, replace=False))]
    ours = kmeans(x, 32, niter=20, seed=3, init=init)
    ref = faiss.Kmeans(x.shape[1], 32, niter=20, seed=3, max_points_per_centroid=100000)
    ref.train(x, init_centroids=init)
    ref_obj = float(ref.index.search(x, 1)[0].sum())
    assert abs(ours.inertia - ref_obj) <= 0.01 * ref_obj
    assert ours.history[-1] <= ours.history[0]
    seeded = kmeans(x, 32, niter=20, seed=3)
    assert np.array_equal(kmeans(x, 32, niter=20, seed=3).assign, seeded.assign)  # deterministic
    assert abs(seeded.inertia - ref_obj) <= 0.05 * ref_obj


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


@pytest.mark.parametrize("k", [1, 2, 7, 128])
def test_nearest_kernel_matches_numpy(k):
    rng = np.random.default_rng(k)
    m = 300
    scores = rng.integers(-50, 50, size=(k, m)).astype(np.float32) / 8  # small grid: many equal values
    bias = rng.normal(size=k).astype(np.float32)
    bias[1::2] = bias[::2][: k // 2]  # equal pairs of rows in the first half of the columns: their maximum twice
    scores[1::2, : m // 2] = scores[::2, : m // 2][: k // 2]
    x_sq = rng.uniform(0, 20, size=m).astype(np.float32)
    best, dist, near = np.empty(m, np.int64), np.empty(m, np.float32), np.empty(m, np.int64)
    count = nearest_by_column(scores, bias, x_sq, 0.25, best, dist, near)
    full = scores + bias[:, None]  # float32, as the kernel adds
    ordered = np.sort(full, axis=0)
    np.testing.assert_array_equal(best, full.argmax(0))  # numpy's argmax: lowest index among equals
    np.testing.assert_array_equal(dist, np.maximum(x_sq - 2 * ordered[-1], 0))
    expected_near = np.flatnonzero(2 * (ordered[-1] - ordered[-2]) <= 0.25) if k > 1 else []
    np.testing.assert_array_equal(near[:count], expected_near)
    if k > 1:  # the data exercises ties, near ties and clear winners
        assert 0 < count < m and np.isin(np.arange(m // 2), near[:count]).any()


def test_signed_row_sums_match_a_dense_reference():
    rng = np.random.default_rng(0)
    x = rng.integers(-8, 8, size=(50, 5)).astype(np.float32)
    rows = rng.choice(50, size=30, replace=False)
    plus, minus = rng.integers(0, 4, size=30), rng.integers(-1, 4, size=30)
    out = np.zeros((4, 5))
    signed_row_sums(x, rows, plus, minus, out)
    expected = np.zeros((4, 5))
    for r, p, q in zip(rows, plus, minus, strict=True):
        expected[p] += x[r]
        if q >= 0:
            expected[q] -= x[r]
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("dim", [1, 5, 128])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exact_distances_sum_in_the_fixed_pairwise_order(dim, dtype):
    rng = np.random.default_rng(dim)
    x, c = rng.normal(size=(257, dim)).astype(np.float32), rng.normal(size=(9, dim)).astype(np.float32)
    labels = rng.integers(0, 9, size=257)
    width = 1 << max(0, (dim - 1).bit_length())
    terms = np.zeros((257, width), dtype=dtype)  # (x - c) in dtype, squared, zero-padded, halved pairwise
    terms[:, :dim] = x.astype(dtype) - c[labels]
    terms *= terms
    while width > 1:
        width //= 2
        terms[:, :width] += terms[:, width : 2 * width]
    got = exact_sq_distances(x, c, labels, dtype)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, terms[:, 0])
    np.testing.assert_array_equal(exact_sq_distances(x[100:], c, labels[100:], dtype), got[100:])  # batch-free


def test_assignment_does_not_depend_on_batching_and_breaks_ties_low():
    rng = np.random.default_rng(0)
    x = snap_to_grid(rng.normal(size=(3000, 24)).astype(np.float32))
    x[0] = 0
    c = rng.normal(size=(300, 24)).astype(np.float32)
    c[3] = c[7] = x[1]  # an exact duplicate centroid: its rows must go to 3, never 7
    c[10], c[11] = 1e-3, -1e-3  # row 0 (the origin) is exactly as far from both: it goes to 10
    nc = NearestCentroid(c)
    whole, _ = nc.assign(x)
    one_by_one = np.concatenate([nc.assign(x[i : i + 1])[0] for i in range(0, 3000, 1)])  # faiss's non-BLAS path
    assert np.array_equal(whole, one_by_one) and whole[0] == 10 and whole[1] == 3 and not (whole == 7).any()
    for threads in (1, 2, 3):  # score blocks shared out among search threads
        assert np.array_equal(NearestCentroid(c, threads=threads).assign(x)[0], whole)
    exact = ((x[:, None, :].astype(np.float64) - c[None].astype(np.float64)) ** 2).sum(-1)
    assert np.array_equal(whole, exact.argmin(1))
    # blocks of 7 rows in Lloyd give bit-identical centroids and assignments
    a, b = lloyd(ArrayVectors(x, block_rows=7), 40, 8, 1), lloyd(ArrayVectors(x), 40, 8, 1)
    assert np.array_equal(a.assign, b.assign) and np.array_equal(a.centroids, b.centroids) and a.inertia == b.inertia


@pytest.mark.parametrize("k", [40, 1000])  # fewer / more clusters than rows moved per thread (dense / compact sums)
def test_lloyd_does_not_depend_on_search_threads(monkeypatch, k):
    """Cluster sums are updated by the search threads, concurrently, each on its own rows: any thread count gives
    bit-identical centroids."""
    from deepercluster.clustering import assign

    x = snap_to_grid(np.random.default_rng(1).normal(size=(3000, 24)).astype(np.float32))
    runs = []
    for threads in (1, 3):
        monkeypatch.setattr(assign, "search_threads", lambda threads=threads: threads)
        runs.append(lloyd(ArrayVectors(x), k, 6, 2))
    a, b = runs
    assert np.array_equal(a.assign, b.assign) and np.array_equal(a.centroids, b.centroids) and a.inertia == b.inertia


def test_level1_fitted_on_a_sample_assigns_every_row():
    from deepercluster.clustering.kmeans import assign_to_centroids, lloyd_on_sample

    rng = np.random.default_rng(4)
    centers = rng.normal(size=(4, 16)).astype(np.float32) * 4
    truth = rng.integers(0, 4, 5000)
    x = snap_to_grid(centers[truth] + rng.normal(size=(5000, 16)).astype(np.float32))
    src = ArrayVectors(x)
    whole = lloyd_on_sample(src, 4, 10, 1, max_rows=5000)  # no fewer rows than asked: plain k-means
    plain = lloyd(src, 4, 10, 1)
    assert np.array_equal(whole.assign, plain.assign) and np.array_equal(whole.centroids, plain.centroids)
    fit = lloyd_on_sample(src, 4, 10, 1, max_rows=400)
    again = lloyd_on_sample(src, 4, 10, 1, max_rows=400)
    assert np.array_equal(fit.assign, again.assign) and np.array_equal(fit.centroids, again.centroids)
    assert len(fit.assign) == 5000 and np.array_equal(fit.assign, assign_to_centroids(x, fit.centroids)[0])
    # the centroids were fitted on 400 rows only, not re-estimated on all: they are not the means of their members
    means = np.stack([x[fit.assign == j].mean(0) for j in range(4)])
    assert not np.allclose(means, fit.centroids, atol=1e-6)
    # a sample of 100 per cluster finds the four groups the rows were drawn from
    assert nmi(fit.assign, truth) > 0.95 and nmi(plain.assign, truth) > 0.95  # (seed 1: no local minimum)


def test_concurrent_moves_keep_the_exact_cluster_sums():
    """Moves run in 3 search threads at once, from no cluster and then between clusters (few rows moved: the
    compact path): sums and counts equal those recomputed from the final labels, bit for bit."""
    from functools import partial

    from deepercluster.clustering.kmeans import Membership, _move_rows, cluster_sums

    rng = np.random.default_rng(3)
    x = snap_to_grid(rng.normal(size=(3000, 24)).astype(np.float32))
    k = 500
    membership = Membership.empty(len(x), k, x.shape[1])
    c = x[:k].copy()
    for step in range(3):
        labels, _ = NearestCentroid(c, threads=3).assign(x, rows_done=partial(_move_rows, membership, 0, x))
        assert np.array_equal(membership.labels, labels)
        sums, counts = cluster_sums(x, labels, k)
        assert np.array_equal(membership.counts, counts) and np.array_equal(membership.sums, sums)
        c = c + rng.normal(scale=0.05 / (step + 1), size=c.shape).astype(np.float32)


def test_pca_whitening_decorrelates_and_normalises():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 8)) @ rng.normal(size=(8, 8)) + 100  # a large offset
    pca = fit_pca(x, 4)
    y = (x - pca.mean) @ pca.components.T * pca.scale
    assert np.allclose(np.cov(y, rowvar=False, bias=True), np.eye(4), atol=1e-3)
    assert np.allclose(np.linalg.norm(pca.transform(x), axis=1), 1, atol=1e-5)
    streamed = Moments(8)
    for lo in range(0, 500, 64):
        streamed.add(x[lo : lo + 64])
    assert np.allclose(pca_from_moments(streamed, 4).components, pca.components, atol=1e-8)


# ---- the stage ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def extracted_once(tmp_path_factory: pytest.TempPathFactory, digits_dir: Path) -> Path:
    """240 digits sharded (40 per shard) and extracted once for the module; each test clusters a copy."""
    root = tmp_path_factory.mktemp("cluster-run") / "run"
    cfg = build_config(tiny_overrides(digits_dir))
    store = RunStore(root)
    run_stage(store, cfg, "shard")
    run_stage(store, cfg, "extract", 0)
    return root


@pytest.fixture
def extracted(tmp_path: Path, digits_dir: Path, extracted_once: Path):
    def make(name: str = "run", **cluster):
        shutil.copytree(extracted_once, tmp_path / name)
        return RunStore(tmp_path / name), build_config(tiny_overrides(digits_dir, cluster=cluster))

    return make


def _cluster_units(store: RunStore) -> list[str]:
    """The stage's units but the per-shard ones and the checkpoints."""
    return [u for u in store.done_units("cluster", 0) if not u.startswith(("whiten-", "assign-", "ckpt-"))]


def test_hierarchical_cluster_stage(extracted):
    store, cfg = extracted(super_clusters=3, k=4)
    before = whitened_features(store, cfg, 0)  # what the evaluate stage reads; fits and saves the PCA
    stats = run_stage(store, cfg, "cluster", 0)
    assert np.array_equal(whitened_features(store, cfg, 0), before)  # now read back from whitened.zarr
    a = load_assignments(store, 0)
    assert list(a.columns) == ["image_id", "super", "sub", "target", "distance"]
    assert a["image_id"].tolist() == list(range(240))
    assert a["super"].between(0, 2).all() and a["sub"].between(0, 3).all()
    assert (a["target"] == a["super"] * 4 + a["sub"]).all()
    assert stats["targets"] == 12 and stats["images"] == 240 and sum(stats["super_sizes"]) == 240
    # the sizes counted while assignments.parquet is written are the written file's
    assert stats["super_sizes"] == np.bincount(a["super"], minlength=3).tolist()
    sizes = np.bincount(a["target"], minlength=12)
    assert stats["non_empty"] == (sizes > 0).sum() and stats["size_max"] == sizes.max()
    assert stats["size_min"] == sizes[sizes > 0].min()
    assert _cluster_units(store) == ["kmeans-level1", "pca", "super-0000", "super-0001", "super-0002", "whitened"]
    for rel in ("pca.npz", "level1_centroids.npy", "sub-0002_centroids.npy", "whitened.zarr/zarr.json"):
        assert store.exists(clusters_rel(0, rel)), rel
    assert store.read_bytes(clusters_rel(0, stats["histogram"]))[:8] == b"\x89PNG\r\n\x1a\n"
    assert not stats["level1"]["streamed"] and stats["level2"]["streamed"] == []
    whitened = zarr.open_array(store.url(clusters_rel(0, "whitened.zarr")))
    assert whitened.shape == (240, 16) and np.allclose(np.linalg.norm(whitened[:], axis=1), 1, atol=1e-5)

    # a rerun reuses everything (the PCA included); --force recomputes to the same (deterministic) answer
    record, pca_sig = store.done_record("cluster", 0, "super-0001"), store.signature(pca_rel(0))
    store.reset_stage("cluster", 0)
    run_stage(store, cfg, "cluster", 0)
    assert store.signature(pca_rel(0)) == pca_sig and load_assignments(store, 0).equals(a)
    run_stage(store, cfg, "cluster", 0, force=True)
    assert store.done_record("cluster", 0, "super-0001")["finished_at"] > record["finished_at"]
    assert load_assignments(store, 0).equals(a)


@pytest.mark.parametrize("duplicates", [False, True])
def test_out_of_core_gives_the_in_memory_assignments(extracted, monkeypatch, duplicates):
    """A budget below every unit's size streams level 1 and level 2 shard by shard (one shard per block):
    same assignments, distances and inertia, bit for bit. With duplicate vectors, clusters go empty and are
    repaired the same way on both paths."""
    cluster = {"super_clusters": 1, "k": 10} if duplicates else {"super_clusters": 3, "k": 6}
    in_memory, cfg = extracted("in-memory", **cluster)
    streamed, _ = extracted("streamed", **cluster)
    if duplicates:
        for store in (in_memory, streamed):
            array = zarr.open_array(store.url(features_rel(0)), mode="r+")
            array[:] = np.repeat(array[:6], 40, axis=0)  # 6 distinct vectors
    small = cfg.model_copy(update={"runtime": cfg.runtime.model_copy(update={"memory_budget_mb": 0.001})})
    assert small.hash == cfg.hash  # where to compute, not what: the budget is not hashed
    monkeypatch.setattr(vectors_module, "MIN_BLOCK_ROWS", 1)
    ref = run_stage(in_memory, cfg, "cluster", 0)
    out = run_stage(streamed, small, "cluster", 0)
    assert not ref["level1"]["streamed"] and ref["level2"]["streamed"] == []
    assert out["level2"]["streamed"] == list(range(cfg.cluster.super_clusters))
    assert out["level1"]["streamed"] == (cfg.cluster.super_clusters > 1)
    assert load_assignments(streamed, 0).equals(load_assignments(in_memory, 0))
    assert out["level2"]["inertia"] == ref["level2"]["inertia"]
    if duplicates:
        assert out["non_empty"] == 6 and out["level2"]["repairs"] > 0


def test_k_larger_than_a_super_cluster(extracted):
    store, cfg = extracted(super_clusters=3, k=80)  # 240 images: unless all three hold exactly 80, one is smaller
    stats = run_stage(store, cfg, "cluster", 0)
    a = load_assignments(store, 0)
    assert stats["level2"]["clamped"]
    for s in stats["level2"]["clamped"]:
        members = a[a["super"] == s]
        assert len(members) < 80 and members["sub"].is_unique  # each member its own sub-cluster
        assert store.done_record("cluster", 0, f"super-{s:04d}")["k"] == len(members)


@pytest.mark.parametrize("pca_sample,bad", [(240, np.nan), (2, np.inf)])
def test_non_finite_features_name_the_shard_and_write_nothing(extracted, pca_sample, bad):
    """Caught while fitting the PCA (the sample holds the bad row) or while whitening (it does not)."""
    store, cfg = extracted(super_clusters=1, k=5, pca_sample=pca_sample)
    array = zarr.open_array(store.url(features_rel(0)), mode="r+")
    array[130, 3] = bad
    with pytest.raises(DataError, match=r"feature shard 3 of round 0 holds non-finite values \(rows \[130\]\)") as err:
        run_stage(store, cfg, "cluster", 0)
    assert "extract --force" not in str(err.value)  # re-extracting a diverged model gives the same values
    assert not store.exists(clusters_rel(0)) and not store.done_units("cluster", 0)
    assert not store.exists(assignments_rel(0)) and not store.stage_done("cluster", 0)


def test_too_many_clusters_for_the_run(extracted):
    store, cfg = extracted(super_clusters=1, k=5)
    big = cfg.model_copy(update={"cluster": cfg.cluster.model_copy(update={"k": 500})})
    with pytest.raises(ConfigError, match="exceeds the 240 images"):
        run_stage(store, big, "cluster", 0)


def test_budget_and_reader_threads_are_runtime_settings():
    """They never change results, so they live in the unhashed runtime section; the old cluster.* keys still work,
    with a warning, and an explicit runtime value wins."""
    ref = build_config({"cluster": {"k": 5}})
    with pytest.warns(FutureWarning, match=r"cluster.memory_budget_mb, cluster.stream_threads moved to runtime"):
        old = build_config({"cluster": {"k": 5, "memory_budget_mb": 1.5, "stream_threads": 3},
                            "runtime": {"stream_threads": 4}})
    assert old.runtime.memory_budget_mb == 1.5 and old.runtime.stream_threads == 4
    assert old.hash == ref.hash and "memory_budget_mb" not in old.hashed_dict()["cluster"]


# ---- level 1 as sharded Lloyd ---------------------------------------------------------------------------------------
def _with_runtime(cfg, **runtime):
    return cfg.model_copy(update={"runtime": cfg.runtime.model_copy(update=runtime)})


@pytest.mark.parametrize("cluster", [{"super_clusters": 1, "k": 6}, {"super_clusters": 3, "k": 4, "super_sample": 0},
                                     {"super_clusters": 3, "k": 4, "super_sample": 20}])
def test_sharded_level1_gives_the_one_unit_assignments(extracted, cluster):
    """Level 1 split over blocks of 80 rows (3 blocks: sharded Lloyd, an iteration = 3 block units + a reduce) gives
    the bits of the one-unit k-means: exact sums are the same in any split. Fitted on a sample, only the assignment
    is split. With a memory budget below every super-cluster, level 2 is sharded Lloyd too: the same bits."""
    one, cfg = extracted("one", **cluster)
    split, _ = extracted("split", **cluster)
    ref = run_stage(one, cfg, "cluster", 0)
    out = run_stage(split, _with_runtime(cfg, block_rows=80, memory_budget_mb=0.001), "cluster", 0)
    if cluster["super_clusters"] > 1:
        assert out["level2"]["streamed"] == [0, 1, 2] and ref["level2"]["streamed"] == []
        assert {"kmeans-super-0000", "part-super-0002-00004", "assign-super-0001-00005"} <= \
            set(split.done_units("cluster", 0))
    assert load_assignments(split, 0).equals(load_assignments(one, 0))
    same = {key: v for key, v in out["level2"].items() if key != "streamed"}  # sharded: the flat k-means "streamed"
    assert same == {key: v for key, v in ref["level2"].items() if key != "streamed"}
    assert out["super_sizes"] == ref["super_sizes"]
    assert np.array_equal(split.read_npy(clusters_rel(0, "level1_centroids.npy")),
                          one.read_npy(clusters_rel(0, "level1_centroids.npy")))
    parts = sorted(u for u in split.done_units("cluster", 0) if u.startswith("part-level1-"))
    sampled = cluster.get("super_sample", 1) > 0 and cluster["super_clusters"] > 1
    assert parts == ([] if sampled else ["part-level1-00000", "part-level1-00002", "part-level1-00004"])
    assert sorted(u for u in split.done_units("cluster", 0) if u.startswith("assign-0")) == \
        [f"assign-{s:05d}" for s in range(6)]
    assert not [u for u in one.done_units("cluster", 0) if u.startswith("part-")]


_KILLED_CHILD = """
import sys, time
from deepercluster.clustering import sharded
from deepercluster.config import PipelineConfig
from deepercluster.stages import run_stage
from deepercluster.store import RunStore

save = sharded.save_checkpoint
def slow_save(store, r, name, state):  # time for the parent to kill it after a checkpoint
    save(store, r, name, state)
    time.sleep(0.5)
sharded.save_checkpoint = slow_save
cfg = PipelineConfig.model_validate_json(open(sys.argv[2]).read())
run_stage(RunStore(sys.argv[1]), cfg, "cluster", 0)
"""


@pytest.mark.parametrize("block_rows", [80, 1 << 18], ids=["sharded", "one-unit"])
def test_killed_kmeans_resumes_at_its_last_checkpoint(extracted, tmp_path, monkeypatch, block_rows):
    """SIGKILL the cluster stage once level 1 has saved iteration 2 or later: the rerun computes only the
    iterations after the saved one (counted) and ends with the uninterrupted run's assignments."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from deepercluster.clustering import sharded

    kmeans_module = sys.modules["deepercluster.clustering.kmeans"]  # the package's ``kmeans`` is the function

    cluster = {"super_clusters": 1, "k": 6, "niter": 12}
    ref_store, cfg = extracted("ref", **cluster)
    cfg = _with_runtime(cfg, block_rows=block_rows)
    run_stage(ref_store, cfg, "cluster", 0)
    store, _ = extracted("killed", **cluster)
    (tmp_path / "cfg.json").write_text(cfg.model_dump_json())
    child = subprocess.Popen([sys.executable, "-c", _KILLED_CHILD, store.path(""), str(tmp_path / "cfg.json")])
    deadline = time.monotonic() + 120
    while True:
        record = store.done_record("cluster", 0, "ckpt-level1") if store.is_done("cluster", 0, "ckpt-level1") \
            else None
        if record and record["iteration"] >= 2:
            os.kill(child.pid, signal.SIGKILL)
            break
        assert child.poll() is None and time.monotonic() < deadline, "the child ended before its k-means iterated"
        time.sleep(0.02)
    child.wait()
    saved = sharded.load_checkpoint(store, 0, "level1").iteration  # the file counts (its record may lag it)
    assert 2 <= saved < 12 and not store.stage_done("cluster", 0)

    updates = []
    real_update = kmeans_module.update

    def counted(*args, **kwargs):
        updates.append(1)
        return real_update(*args, **kwargs)

    monkeypatch.setattr(kmeans_module, "update", counted)
    monkeypatch.setattr(sharded, "update", counted)
    run_stage(store, cfg, "cluster", 0)
    assert len(updates) == 12 - saved  # resumed at the saved iteration, not at 0
    assert load_assignments(store, 0).equals(load_assignments(ref_store, 0))
    if block_rows != 80:
        assert store.done_record("cluster", 0, "kmeans-level1")["resumed_at"] == saved


def test_moments_of_shard_groups_merge_into_the_whole_samples():
    """The PCA's moments computed per shard group (each centred on its own first row) and merged give the mean and
    covariance of all the rows at once; groups follow the sample's size, at most PCA_GROUPS."""
    from deepercluster.clustering.whitening import PCA_GROUPS, pca_groups

    x = np.random.default_rng(0).normal(size=(3000, 8)) * [1, 2, 3, 4, 5, 6, 7, 8] + 1000.0
    whole = Moments(8)
    whole.add(x)
    merged = Moments(8)
    for part in np.array_split(x, 5):
        group = Moments(8)
        group.add(part)
        merged.merge(Moments.from_bytes(group.to_bytes()))  # as the pca unit reads the groups' files
    for a, b in zip(merged.mean_cov(), whole.mean_cov(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-8)
    assert pca_groups(240, 40, 100_000) == [(0, 5)]  # 240 sampled rows: one group
    many = pca_groups(10_000_000, 65536, 1_000_000)
    assert len(many) == PCA_GROUPS and many[0][0] == 0 and many[-1][1] == 152
    assert all(b[0] == a[1] + 1 for a, b in zip(many[:-1], many[1:], strict=True))  # consecutive, every shard once

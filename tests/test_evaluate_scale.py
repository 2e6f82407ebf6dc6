"""The evaluate stage at scale: cluster metrics streamed over the assignments and the manifest equal the whole-array
ones, its memory does not grow with the number of images (a seeded labelled sample), and a killed stage resumes
from its recorded units."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import tiny_overrides

from deepercluster.clustering.stage import assignments_rel, clusters_rel
from deepercluster.clustering.whitening import ensure_pca
from deepercluster.config import PipelineConfig, build_config
from deepercluster.evaluation import stage as lib
from deepercluster.evaluation.contingency import PairCounts
from deepercluster.evaluation.metrics import ari, nmi
from deepercluster.evaluation.sample import labelled_sample
from deepercluster.features.array import create_features, seal_features
from deepercluster.paths import MANIFEST
from deepercluster.stages import get_stage, run_stage
from deepercluster.store import RunStore

TOLERANCE = 1e-12


def write_parts(store: RunStore, rel: str, columns: dict[str, np.ndarray | pd.array], sizes: list[int]) -> None:
    """``columns`` as a parquet file of row groups of ``sizes`` rows (cycled): unlike the other files' groups."""
    n = len(next(iter(columns.values())))
    bounds, lo, i = [], 0, 0
    while lo < n:
        bounds.append((lo, min(lo + sizes[i % len(sizes)], n)))
        lo, i = bounds[-1][1], i + 1
    store.write_parquet_parts(rel, (pd.DataFrame({k: v[a:b] for k, v in columns.items()}) for a, b in bounds))


def labels_with_gaps(rng: np.random.Generator, n: int, classes: int, unlabelled: float) -> pd.array:
    y = pd.array(rng.integers(0, classes, n), dtype="Int64")
    y[rng.random(n) < unlabelled] = pd.NA
    return y


def write_round_files(store: RunStore, n: int, targets: int, classes: int, seed: int, part_rows: int,
                      unlabelled: float = 0.2) -> dict[str, np.ndarray]:
    """A manifest and the assignments of rounds 0 and 1 (targets correlated with the labels and each other), each
    file with its own row-group sizes, and round 1's stats.json; returns the whole arrays."""
    rng = np.random.default_rng(seed)
    labels = labels_with_gaps(rng, n, classes, unlabelled)
    base = np.asarray(labels.fillna(0), dtype=np.int64) * (targets // classes)
    prev = np.where(rng.random(n) < 0.6, base + rng.integers(0, targets // classes, n), rng.integers(0, targets, n))
    target = np.where(rng.random(n) < 0.7, prev, rng.integers(0, targets, n))
    ids = np.arange(n)
    write_parts(store, MANIFEST, {"image_id": ids, "uri": np.array([f"img-{i}.png" for i in ids]),
                                  "shard": ids // 1000, "label_id": labels}, [part_rows, part_rows // 3 + 7])
    write_parts(store, assignments_rel(0), {"image_id": ids, "target": prev}, [part_rows * 2 + 1])
    write_parts(store, assignments_rel(1), {"image_id": ids, "target": target}, [part_rows // 2 + 3, part_rows])
    sizes = np.bincount(target, minlength=targets)
    store.write_json(clusters_rel(1, "stats.json"), {"targets": targets, "non_empty": int((sizes > 0).sum()),
                                                     "size_min": int(sizes[sizes > 0].min()),
                                                     "size_max": int(sizes.max()), "balance": 1.0})
    return {"labels": labels, "prev": prev, "target": target}


# ---- streamed cluster metrics == whole arrays --------------------------------------------------------------------
def test_streamed_cluster_metrics_equal_the_whole_array_ones(tmp_path: Path):
    store = RunStore(tmp_path / "run")
    whole = write_round_files(store, n=30_011, targets=60, classes=7, seed=3, part_rows=4096)
    got = lib.cluster_metrics(store, 1)
    known = ~np.asarray(whole["labels"].isna())
    y = whole["labels"][known].to_numpy(dtype=np.int64)
    expected = {"nmi_prev": nmi(whole["target"], whole["prev"]), "nmi_labels": nmi(whole["target"][known], y),
                "ari_labels": ari(whole["target"][known], y)}
    for key, value in expected.items():
        assert abs(got[key] - value) < TOLERANCE, (key, got[key], value)
    assert 0.05 < expected["nmi_labels"] < 0.95 and 0.01 < expected["ari_labels"] < 0.95  # not a degenerate case
    assert got["targets"] == 60 and set(got) == {*expected, "targets", "non_empty", "size_min", "size_max",
                                                 "balance"}


@pytest.mark.parametrize("case", ["random", "same", "one-cluster", "both-one", "refinement", "tiny"])
def test_pair_counts_fed_in_parts_match_sklearn(case: str):
    rng = np.random.default_rng(len(case))
    n = 5 if case == "tiny" else 20_000
    a = rng.integers(0, 300, n)
    b = {"random": rng.integers(0, 11, n), "same": a, "one-cluster": np.zeros(n, dtype=np.int64),
         "both-one": np.zeros(n, dtype=np.int64), "refinement": a // 7, "tiny": rng.integers(0, 3, n)}[case]
    if case == "both-one":
        a = np.full(n, 4)
    counts = PairCounts()
    for lo in range(0, n, 1777):  # parts, in image order
        counts.add(a[lo : lo + 1777], b[lo : lo + 1777])
    assert counts.total == n
    assert abs(counts.nmi() - nmi(a, b)) < TOLERANCE and abs(counts.ari() - ari(a, b)) < TOLERANCE


def test_pair_counts_refuses_what_it_cannot_code():
    with pytest.raises(ValueError, match="outside"):
        PairCounts().add(np.array([-1]), np.array([0]))


def test_labelled_sample_is_seeded_uniform_and_bounded(tmp_path: Path):
    store = RunStore(tmp_path / "run")
    whole = write_round_files(store, n=20_000, targets=20, classes=5, seed=1, part_rows=3000)
    labelled = np.flatnonzero(~np.asarray(whole["labels"].isna()))
    everything = labelled_sample(store, 10**6, seed=0)  # no more labelled images than the cap: all of them
    assert np.array_equal(everything.ids, labelled) and everything.labelled == len(labelled)
    assert np.array_equal(everything.labels, whole["labels"][labelled].to_numpy(dtype=np.int64))
    a, b, other = labelled_sample(store, 2000, 0), labelled_sample(store, 2000, 0), labelled_sample(store, 2000, 1)
    assert len(a.ids) == 2000 and np.array_equal(a.ids, b.ids) and not np.array_equal(a.ids, other.ids)
    assert np.isin(a.ids, labelled).all() and np.all(np.diff(a.ids) > 0)
    assert abs(np.median(a.ids) - np.median(labelled)) < 1500  # spread over the run, not its first row groups


# ---- memory: the stage reads a sample, not the run ---------------------------------------------------------------
DIM = 64


def synthetic_run(root: Path, n: int, cfg: PipelineConfig, shard_size: int = 2000) -> RunStore:
    """A run store with what round 1's evaluate reads: manifest, features (no whitened.zarr: the final round's
    path, the PCA saved beforehand), round 0's and 1's assignments."""
    store = RunStore(root)
    write_round_files(store, n=n, targets=100, classes=10, seed=5, part_rows=4096, unlabelled=0.1)
    array = create_features(store, 1, n, DIM, shard_size, {})
    rng = np.random.default_rng(6)
    centres = rng.normal(size=(10, DIM))
    for lo in range(0, n, shard_size):
        hi = min(lo + shard_size, n)
        array[lo:hi] = (centres[rng.integers(0, 10, hi - lo)] + rng.normal(size=(hi - lo, DIM))).astype(np.float16)
    seal_features(store, 1, {})
    ensure_pca(store, cfg, 1)
    return store


def evaluate_units_peak(store: RunStore, cfg: PipelineConfig) -> tuple[int, dict]:
    """The traced peak (bytes) of the evaluate stage's cluster and sample units, and the metrics they wrote."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        metrics = {**lib.run_cluster_unit(store, 1), **lib.run_probes_unit(store, cfg, 1)}
        return tracemalloc.get_traced_memory()[1], metrics
    finally:
        tracemalloc.stop()


@pytest.mark.slow
def test_evaluate_memory_does_not_grow_with_the_run(tmp_path: Path, digits_dir: Path):
    cfg = build_config(tiny_overrides(digits_dir, cluster={"pca_dim": 16, "pca_sample": 2000, "niter": 5},
                                      eval={"sample": 1000, "kmeans_runs": 1, "probe_max_iter": 20},
                                      runtime={"device": "cpu"}))
    n = 25_000
    small, large = synthetic_run(tmp_path / "n", n, cfg), synthetic_run(tmp_path / "4n", 4 * n, cfg)
    evaluate_units_peak(small, cfg)  # warm: first-use imports and caches are not the stage's
    peak_n, metrics = evaluate_units_peak(small, cfg)
    peak_4n, _ = evaluate_units_peak(large, cfg)
    print(f"evaluate units: traced peak {peak_n / 2**20:.1f} MiB at N={n}, {peak_4n / 2**20:.1f} MiB at 4N")
    assert peak_4n < 1.25 * peak_n + (1 << 20), (peak_n, peak_4n)
    whole_features = 4 * n * DIM * 4  # what reading every image's features as float32 would hold
    assert peak_4n < whole_features / 4, (peak_4n, whole_features)
    assert metrics["probe_train_n"] + metrics["probe_test_n"] == 1000 and 0 < metrics["kmeans_nmi_labels"] <= 1
    assert {"nmi_prev", "nmi_labels", "ari_labels", "probe_acc", "knn_acc", "knn_whitened_acc"} <= set(metrics)
    record = small.done_record("evaluate", 1, lib.PROBES_UNIT)
    assert record["sample"] == 1000 and record["labelled"] > 20_000


# ---- a killed evaluate resumes -------------------------------------------------------------------------------
# the child runs the stage with its probes unit held (a slow unit, deterministically): the parent kills it there
CHILD = """
import sys, time
import deepercluster.evaluation.stage as lib
from deepercluster.run import open_run
from deepercluster.stages import run_stage

def held(*args, **kwargs):
    time.sleep(600)

lib.run_probes_unit = held
store, cfg = open_run(sys.argv[1])
run_stage(store, cfg, "evaluate", 0)
"""


def _without_timing(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "probe_s"}


@pytest.mark.slow
def test_a_killed_evaluate_resumes_from_its_recorded_units(tmp_path: Path, digits_dir: Path):
    from deepercluster.run import init_run

    cfg = build_config(tiny_overrides(digits_dir, rounds=1, eval={"final_round": False, "tensorboard": False}))
    store = RunStore(tmp_path / "run")
    init_run(store, cfg)
    run_stage(store, cfg, "shard")
    run_stage(store, cfg, "extract", 0)
    run_stage(store, cfg, "cluster", 0)
    store.mark_stage_done("train", 0)  # evaluate reads the round's training only for its figures: none here
    shutil.copytree(tmp_path / "run", tmp_path / "reference")
    reference = run_stage(RunStore(tmp_path / "reference"), cfg, "evaluate", 0)  # uninterrupted

    record = Path(store.path("rounds/0/_done/evaluate")) / f"{lib.CLUSTER_UNIT}.json"
    child = subprocess.Popen([sys.executable, "-c", CHILD, store.uri], env={**os.environ},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not record.exists():
            assert child.poll() is None, child.stdout.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the child never recorded its first unit"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        assert child.wait(30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
        child.stdout.close()
    first = store.done_record("evaluate", 0, lib.CLUSTER_UNIT)
    assert first["pid"] == child.pid
    assert not store.is_done("evaluate", 0, lib.PROBES_UNIT) and not store.stage_done("evaluate", 0)

    resumed = run_stage(store, cfg, "evaluate", 0)
    assert store.done_record("evaluate", 0, lib.CLUSTER_UNIT) == first  # not recomputed
    assert store.done_record("evaluate", 0, lib.PROBES_UNIT)["pid"] == os.getpid()
    assert _without_timing(resumed) == _without_timing(reference)
    assert store.read_json("rounds/0/eval/metrics.json") == resumed

    # a lost partial is recomputed, and the metrics merged again from it
    merged = store.done_record("evaluate", 0, lib.METRICS_UNIT)["merged"]
    store.remove(lib.part_rel(0, lib.PROBES_UNIT))
    steps = {s.name: s for s in get_stage("evaluate").steps()}
    assert steps[lib.PROBES_UNIT].todo(store, cfg, 0) == [lib.PROBES_UNIT]
    lib.run_probes_unit(store, cfg, 0)
    assert steps[lib.METRICS_UNIT].todo(store, cfg, 0) == [lib.METRICS_UNIT]
    assert store.done_record("evaluate", 0, lib.PROBES_UNIT)["id"] != merged[lib.PROBES_UNIT]

"""The cluster stage: round features -> PCA-whitening + L2 (shard by shard) -> level 1 (m super-clusters) ->
level 2 (k sub-clusters inside each super-cluster, one unit of work per super-cluster) -> ``assignments.parquet``.

Outputs under ``rounds/<r>/clusters/``: ``pca.npz``, ``whitened.zarr`` (N x d float32, one zarr shard per image
shard), ``super.parquet`` + ``super_centroids.npy`` (level 1), ``sub-<s>.parquet`` + ``sub-<s>_centroids.npy``
(level 2, per super-cluster; with ``train.head_init: centroids`` also ``sub-<s>_means.npy``, the mean ReLU feature
of each sub-cluster, see :mod:`deepercluster.clustering.means`), ``assignments.parquet`` (image_id, super, sub,
target, distance), ``stats.json`` and ``sizes.png`` (cluster-size histogram).
With m = 1 it is plain DeepCluster k-means.

No step needs every feature in memory: a k-means unit whose vectors exceed ``runtime.memory_budget_mb`` streams
its shards at every Lloyd iteration (the "sharded" k-means), and gives the same assignments as in memory.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd

from deepercluster.clustering.assign import resolve_backend
from deepercluster.clustering.kmeans import ArrayVectors, KMeansResult, lloyd_on_sample
from deepercluster.clustering.means import means_rel, save_cluster_means
from deepercluster.clustering.memory import bound_heap, release
from deepercluster.clustering.plots import size_histogram
from deepercluster.clustering.vectors import (
    ShardedVectors,
    members_by_shard,
    open_round_features,
    read_rows,
    shard_ranges,
    shard_rows,
)
from deepercluster.clustering.whitening import (
    STAGE,
    _seed,
    checked,
    clusters_rel,
    ensure_pca,
    open_whitened,
    whiten_round,
    whitened_features,
    whitened_rel,
)
from deepercluster.config import PipelineConfig
from deepercluster.errors import ConfigError, DataError
from deepercluster.paths import assignments_rel, features_rel, pca_rel
from deepercluster.store import PARQUET_ROWS, RunStore

__all__ = [
    "STAGE", "LEVEL1_UNIT", "assignments_rel", "clusters_rel", "cluster_stats", "cluster_super", "finalize_cluster",
    "discard_cluster", "load_assignments", "load_round_features", "prepare_cluster", "super_unit",
    "whitened_features",
]

LEVEL1_UNIT = "level1"
HISTOGRAM = "sizes.png"
BYTES_PER_MEMBER = 20  # labels (int64) + distance (float64) + squared norm (float32) kept for every row of a unit


def super_unit(s: int) -> str:
    return f"super-{s:04d}"


def load_round_features(store: RunStore, r: int) -> np.ndarray:
    """All features of a round as float32, checked finite shard by shard (the error names the shard). For small
    runs and tests: the stage itself never loads every feature."""
    array = open_round_features(store, r)
    out = np.empty(array.shape, dtype=np.float32)
    for s, (lo, hi) in enumerate(shard_ranges(int(array.shape[0]), shard_rows(array))):
        out[lo:hi] = checked(read_rows(store, array, features_rel(r), lo, hi), store, r, s, lo)
    return out


def fits_in_memory(cfg: PipelineConfig, n: int, dim: int) -> bool:
    """Whether ``n`` whitened vectors of width ``dim`` (plus their labels and distances) fit the memory budget."""
    return n * (4 * dim + BYTES_PER_MEMBER) <= cfg.runtime.memory_budget_mb * 2**20


def cluster_rows(store: RunStore, cfg: PipelineConfig, r: int, ids: np.ndarray | None, k: int,
                 seed: np.random.SeedSequence, exact_distances: bool = True,
                 fit_rows: int = 0) -> tuple[KMeansResult, bool]:
    """k-means of the whitened rows ``ids`` (sorted; None = all): gathered in memory when they fit the budget, else
    streamed shard by shard at every iteration; ``fit_rows`` > 0: fitted on that many of them drawn at random, then
    every row assigned. Returns the result and whether it streamed."""
    array = open_whitened(store, r)
    n = int(array.shape[0])
    source = ShardedVectors(array, members_by_shard(n, shard_rows(array), ids), threads=cfg.runtime.stream_threads,
                            store=store, rel=whitened_rel(r))
    streamed = not fits_in_memory(cfg, source.n, source.dim)
    data = source if streamed else ArrayVectors(source.gather())
    backend = resolve_backend(cfg.runtime.device)
    return lloyd_on_sample(data, k, cfg.cluster.niter, seed, fit_rows, backend=backend,
                           exact_distances=exact_distances), streamed


def discard_cluster(store: RunStore, r: int) -> None:
    """Forget the stage (bad input, ``--force``, a changed fingerprint): nothing of it stays in the store."""
    store.reset_stage(STAGE, r)
    store.remove(clusters_rel(r))


def prepare_cluster(store: RunStore, cfg: PipelineConfig, r: int) -> list[int]:
    """PCA + whitening + level 1; returns the super-clusters whose level-2 unit is still to do."""
    n = int(open_round_features(store, r).shape[0])
    m, k = cfg.cluster.super_clusters, cfg.cluster.k
    if m * k > n:
        raise ConfigError(f"cluster.k x cluster.super_clusters = {m * k} exceeds the {n} images of the run")
    bound_heap()
    if not store.is_done(STAGE, r, LEVEL1_UNIT):
        try:
            whiten_round(store, cfg, r, ensure_pca(store, cfg, r))
        except DataError:
            discard_cluster(store, r)
            raise
        release()
        if m > 1:
            # level-1 distances are not kept: its inertia is the float32 search's (last bits may vary with batching)
            res, streamed = cluster_rows(store, cfg, r, None, m, _seed(cfg, r, 1), exact_distances=False,
                                         fit_rows=m * cfg.cluster.super_sample)
            super_ids = res.assign
            info = {"inertia": res.inertia, "repairs": res.repairs, "streamed": streamed, "rechecked": res.rechecked}
            store.write_npy(clusters_rel(r, "super_centroids.npy"), res.centroids)
        else:
            super_ids = np.zeros(n, dtype=np.int64)
            info = {"inertia": 0.0, "repairs": 0, "streamed": False, "rechecked": 0}
        store.write_parquet(clusters_rel(r, "super.parquet"), {"image_id": np.arange(n),
                                                              "super": super_ids.astype(np.int32)})
        outputs = [pca_rel(r)] + ([clusters_rel(r, "super_centroids.npy")] if m > 1 else []) + \
            [clusters_rel(r, "super.parquet")]
        store.mark_done(STAGE, r, LEVEL1_UNIT, info, outputs=outputs)
        release()
    done = set(store.done_units(STAGE, r))
    return [s for s in range(m) if super_unit(s) not in done]


def cluster_super(store: RunStore, cfg: PipelineConfig, r: int, s: int) -> dict[str, float]:
    """Level 2 for super-cluster ``s``: k-means of its members into ``k`` sub-clusters (fewer if it is smaller)."""
    unit = super_unit(s)
    if store.is_done(STAGE, r, unit):
        return store.done_record(STAGE, r, unit)
    bound_heap()
    supers = store.read_parquet(clusters_rel(r, "super.parquet"), columns=["super"])["super"].to_numpy()
    ids = np.flatnonzero(supers == s)
    del supers
    release()
    outputs = []
    if len(ids) == 0:
        info = {"members": 0, "k": 0, "inertia": 0.0, "repairs": 0, "streamed": False, "rechecked": 0}
        sub, dist = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    else:
        res, streamed = cluster_rows(store, cfg, r, ids, cfg.cluster.k, _seed(cfg, r, 2, s))
        sub, dist = res.assign, res.distance
        outputs.append(clusters_rel(r, f"sub-{s:04d}_centroids.npy"))
        store.write_npy(outputs[-1], res.centroids)
        info = {"members": len(ids), "k": res.k, "inertia": res.inertia, "repairs": res.repairs,
                "streamed": streamed, "rechecked": res.rechecked}
        if cfg.train.head_init == "centroids":
            info.update(save_cluster_means(store, r, s, ids, sub, res.k, cfg.runtime.stream_threads))
            outputs.append(means_rel(r, s))
    outputs.append(clusters_rel(r, f"sub-{s:04d}.parquet"))
    store.write_parquet(outputs[-1], {"image_id": ids, "sub": sub, "distance": dist})
    store.mark_done(STAGE, r, unit, info, outputs=outputs)
    release()
    return info


def finalize_cluster(store: RunStore, cfg: PipelineConfig, r: int) -> dict:
    """Merge the level-2 units into ``assignments.parquet``; write ``stats.json`` and the size histogram. Columns
    are read and written a row group at a time: beside them, only the per-image super and sub ids and distances are
    held (12 bytes per image)."""
    m, k = cfg.cluster.super_clusters, cfg.cluster.k
    bound_heap()
    supers = store.read_parquet(clusters_rel(r, "super.parquet"), columns=["super"])["super"].to_numpy(np.int32)
    n = len(supers)
    sub, distance = np.zeros(n, dtype=np.int32), np.zeros(n, dtype=np.float32)
    for s in range(m):  # each part: the members of one super-cluster, by image_id
        for part in store.iter_parquet(clusters_rel(r, f"sub-{s:04d}.parquet")):
            ids = part["image_id"].to_numpy()
            sub[ids], distance[ids] = part["sub"].to_numpy(), part["distance"].to_numpy()
    release()
    sizes = np.zeros(m * k, dtype=np.int64)
    store.write_parquet_parts(assignments_rel(r), _assignment_parts(supers, sub, distance, k, sizes))
    del supers, sub, distance
    release()
    stats = cluster_stats(sizes)
    level1 = store.done_record(STAGE, r, LEVEL1_UNIT)
    units = [store.done_record(STAGE, r, super_unit(s)) for s in range(m)]
    stats.update(
        level1={"k": m, "inertia": level1["inertia"], "repairs": level1["repairs"],
                "streamed": level1.get("streamed", False)},
        level2={"k": k, "inertia": float(sum(u["inertia"] for u in units)),
                "repairs": int(sum(u["repairs"] for u in units)),
                "clamped": [s for s, u in enumerate(units) if u["k"] < k],
                "streamed": [s for s, u in enumerate(units) if u.get("streamed")]},
        super_sizes=sizes.reshape(m, k).sum(1).tolist(),
        rechecked=int(level1.get("rechecked", 0) + sum(u.get("rechecked", 0) for u in units)),
        histogram=HISTOGRAM,
    )
    store.write_bytes(clusters_rel(r, HISTOGRAM), size_histogram(sizes, f"round {r}: {m} x {k} targets"))
    store.write_json(clusters_rel(r, "stats.json"), stats)
    store.mark_stage_done(STAGE, r, {"targets": m * k, "non_empty": stats["non_empty"]},
                          outputs=[assignments_rel(r), clusters_rel(r, "stats.json"), clusters_rel(r, HISTOGRAM)])
    return stats


def _assignment_parts(supers: np.ndarray, sub: np.ndarray, distance: np.ndarray, k: int, sizes: np.ndarray,
                      rows: int = PARQUET_ROWS) -> Iterator[pd.DataFrame]:
    """``assignments.parquet``'s rows in parts (image_id, super, sub, target, distance): never all at once. Each
    part's targets are counted into ``sizes`` (images per target) as it is made."""
    for lo in range(0, max(len(supers), 1), rows):
        hi = min(lo + rows, len(supers))
        s, c = supers[lo:hi].astype(np.int64), sub[lo:hi].astype(np.int64)
        target = s * k + c
        sizes += np.bincount(target, minlength=len(sizes))
        yield pd.DataFrame({"image_id": np.arange(lo, hi), "super": s, "sub": c, "target": target,
                            "distance": distance[lo:hi]})


def cluster_stats(sizes: np.ndarray) -> dict:
    """Summary of the cluster sizes (images per target)."""
    n_targets = len(sizes)
    nonempty = sizes[sizes > 0]
    p = nonempty / nonempty.sum()
    return {
        "images": int(sizes.sum()),
        "targets": int(n_targets),
        "non_empty": int(len(nonempty)),
        "empty": int(n_targets - len(nonempty)),
        "size_min": int(nonempty.min()),
        "size_median": float(np.median(nonempty)),
        "size_max": int(nonempty.max()),
        # 1.0 when every non-empty cluster has the same size
        "balance": float(-(p * np.log(p)).sum() / np.log(len(nonempty))) if len(nonempty) > 1 else 1.0,
    }


def load_assignments(store: RunStore, r: int) -> pd.DataFrame:
    return store.read_parquet(assignments_rel(r))

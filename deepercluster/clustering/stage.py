"""The cluster stage: round features -> PCA-whitening + L2 -> level 1 (the k-means of every image into m
super-clusters) -> level 2 (k sub-clusters inside each super-cluster, one unit per super-cluster) ->
``assignments.parquet``. With m = 1, level 1 is the flat DeepCluster k-means and level 2 only files its result.

Every step is units that any worker runs (see ``stages/cluster.py`` for the order): the PCA's moments and the
whitening (:mod:`~deepercluster.clustering.whitening`), level 1 as sharded Lloyd
(:mod:`~deepercluster.clustering.sharded`), one unit per super-cluster, and the merge. None needs every feature
in memory: a level-2 unit whose vectors exceed ``runtime.memory_budget_mb`` streams its shards at every Lloyd
iteration and gives the same assignments as in memory; the merge streams the units' files row group by row group.

Outputs under ``rounds/<r>/clusters/``: ``pca.npz``, ``whitened.zarr`` (N x d float32, one zarr shard per image
shard), ``level1_centroids.npy`` and ``level1/labels-<shard>.npy`` (level 1), ``sub-<s>.parquet`` +
``sub-<s>_centroids.npy`` (level 2, per super-cluster; with ``train.head_init: centroids`` also
``sub-<s>_means.npy``, the mean ReLU feature of each sub-cluster, see :mod:`deepercluster.clustering.means`),
``kmeans/*.npz`` (k-means checkpoints), ``assignments.parquet`` (image_id, super, sub, target, distance),
``stats.json`` and ``sizes.png`` (cluster-size histogram).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd

from deepercluster.clustering.assign import resolve_backend
from deepercluster.clustering.kmeans import ArrayVectors, KMeansResult, lloyd
from deepercluster.clustering.means import means_rel, save_cluster_means
from deepercluster.clustering.memory import bound_heap, release
from deepercluster.clustering.plots import size_histogram
from deepercluster.clustering.sharded import (
    LEVEL1,
    centroids_rel,
    distance_rel,
    done_unit,
    fits_in_memory,
    level1_stats,
    load_checkpoint,
    read_labels,
    save_checkpoint,
    sharded_result,
)
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
    open_whitened,
    whitened_features,
    whitened_rel,
)
from deepercluster.config import PipelineConfig
from deepercluster.errors import StoreError
from deepercluster.paths import assignments_rel, features_rel
from deepercluster.store import PARQUET_ROWS, RunStore

__all__ = [
    "STAGE", "assignments_rel", "clusters_rel", "cluster_stats", "cluster_super", "finalize_cluster",
    "discard_cluster", "load_assignments", "load_round_features", "members", "super_unit",
    "whitened_features",
]

HISTOGRAM = "sizes.png"


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


def cluster_rows(store: RunStore, cfg: PipelineConfig, r: int, ids: np.ndarray, k: int, name: str,
                 seed: np.random.SeedSequence) -> tuple[KMeansResult, bool, int]:
    """k-means of the whitened rows ``ids`` (sorted): gathered in memory when they fit the budget, else streamed
    shard by shard at every iteration; a checkpoint after every iteration (``name``), resumed from. Returns the
    result, whether it streamed and the iteration it resumed at."""
    array = open_whitened(store, r)
    n = int(array.shape[0])
    source = ShardedVectors(array, members_by_shard(n, shard_rows(array), ids), threads=cfg.runtime.stream_threads,
                            store=store, rel=whitened_rel(r))
    streamed = not fits_in_memory(cfg, source.n, source.dim)
    data = source if streamed else ArrayVectors(source.gather())
    resume = load_checkpoint(store, r, name)
    res = lloyd(data, k, cfg.cluster.niter, seed, backend=resolve_backend(cfg.runtime.device), resume=resume,
                on_iteration=lambda state: save_checkpoint(store, r, name, state))
    return res, streamed, 0 if resume is None else resume.iteration


def discard_cluster(store: RunStore, r: int) -> None:
    """Forget the stage (bad input, ``--force``, a changed fingerprint): nothing of it stays in the store."""
    store.reset_stage(STAGE, r)
    store.remove(clusters_rel(r))


def members(store: RunStore, r: int, s: int) -> np.ndarray:
    """The image ids of super-cluster ``s`` (sorted), from level 1's per-shard labels (one shard in memory)."""
    array = open_whitened(store, r)
    ranges = shard_ranges(int(array.shape[0]), shard_rows(array))
    parts = [lo + np.flatnonzero(read_labels(store, r, i) == s) for i, (lo, _) in enumerate(ranges)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def cluster_super(store: RunStore, cfg: PipelineConfig, r: int, s: int) -> dict[str, float]:
    """Level 2 for super-cluster ``s``: k-means of its members into ``k`` sub-clusters (fewer if it is smaller).
    With one super-cluster, level 1 was the flat k-means: its labels and distances are filed as they are."""
    unit = super_unit(s)
    if store.is_done(STAGE, r, unit):
        return store.done_record(STAGE, r, unit)
    bound_heap()
    outputs = []
    if cfg.cluster.super_clusters == 1:
        ids, sub, dist, info = _flat_result(store, r)
        centroids = store.read_npy(centroids_rel(r, LEVEL1))
    elif store.is_done(STAGE, r, done_unit(unit)):  # sharded Lloyd (larger than a worker's budget): file it
        return _file_sharded(store, cfg, r, s)
    else:
        ids = members(store, r, s)
        release()
        if len(ids) == 0:
            info = {"members": 0, "k": 0, "inertia": 0.0, "repairs": 0, "streamed": False, "rechecked": 0}
            sub, dist, centroids = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32), None
        else:
            res, streamed, resumed = cluster_rows(store, cfg, r, ids, cfg.cluster.k, unit, _seed(cfg, r, 2, s))
            sub, dist, centroids = res.assign, res.distance, res.centroids
            info = {"members": len(ids), "k": res.k, "inertia": res.inertia, "repairs": res.repairs,
                    "streamed": streamed, "rechecked": res.rechecked, "resumed_at": resumed}
    if centroids is not None:
        outputs.append(clusters_rel(r, f"sub-{s:04d}_centroids.npy"))
        store.write_npy(outputs[-1], centroids)
        if cfg.train.head_init == "centroids":
            info.update(save_cluster_means(store, r, s, ids, sub, len(centroids), cfg.runtime.stream_threads))
            outputs.append(means_rel(r, s))
    outputs.append(clusters_rel(r, f"sub-{s:04d}.parquet"))
    store.write_parquet(outputs[-1], {"image_id": ids, "sub": sub, "distance": dist})
    store.mark_done(STAGE, r, unit, info, outputs=outputs)
    release()
    return info


def _file_sharded(store: RunStore, cfg: PipelineConfig, r: int, s: int) -> dict:
    """The unit of a super-cluster clustered by sharded Lloyd: its per-shard labels into ``sub-<s>.parquet`` (a
    shard at a time), its centroids (and with ``train.head_init: centroids`` its members' means)."""
    unit = super_unit(s)
    parts, info = sharded_result(store, cfg, r, s)
    outputs = [clusters_rel(r, f"sub-{s:04d}_centroids.npy")]
    centroids = store.read_npy(centroids_rel(r, unit))
    store.write_npy(outputs[0], centroids)
    ids_all, sub_all = [], []

    def frames() -> Iterator[pd.DataFrame]:
        for ids, sub, dist in parts:
            if cfg.train.head_init == "centroids":
                ids_all.append(ids)
                sub_all.append(sub)
            yield pd.DataFrame({"image_id": ids, "sub": sub, "distance": dist})

    rel = clusters_rel(r, f"sub-{s:04d}.parquet")
    store.write_parquet_parts(rel, frames())
    if cfg.train.head_init == "centroids":
        info.update(save_cluster_means(store, r, s, np.concatenate(ids_all), np.concatenate(sub_all),
                                       len(centroids), cfg.runtime.stream_threads))
        outputs.append(means_rel(r, s))
    store.mark_done(STAGE, r, unit, info, outputs=[*outputs, rel])
    release()
    return info


def _flat_result(store: RunStore, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """The flat k-means' labels and exact distances, from its per-shard files (m = 1)."""
    array = open_whitened(store, r)
    ranges = shard_ranges(int(array.shape[0]), shard_rows(array))
    sub = np.concatenate([read_labels(store, r, i) for i in range(len(ranges))]).astype(np.int64)
    dist = np.concatenate([store.read_npy(distance_rel(r, i)) for i in range(len(ranges))])
    stats = level1_stats(store, r, len(ranges))
    info = {"members": len(sub), "k": stats["k"], "inertia": float(dist.sum(dtype=np.float64)),
            "repairs": stats["repairs"], "streamed": stats["streamed"], "rechecked": stats["rechecked"],
            "resumed_at": stats["resumed_at"]}
    return np.arange(len(sub)), sub, dist, info


def finalize_cluster(store: RunStore, cfg: PipelineConfig, r: int) -> dict:
    """Merge level 1's labels and the level-2 units' files into ``assignments.parquet``, ``PARQUET_ROWS`` images
    at a time (each unit's file is read in step, a row group at a time: memory does not grow with N); write
    ``stats.json`` and the size histogram."""
    m, k = cfg.cluster.super_clusters, cfg.cluster.k
    bound_heap()
    array = open_whitened(store, r)
    n, per = int(array.shape[0]), shard_rows(array)
    sizes = np.zeros(m * k, dtype=np.int64)
    streams = [_IdStream(store.iter_parquet(clusters_rel(r, f"sub-{s:04d}.parquet"))) for s in range(m)]
    store.write_parquet_parts(assignments_rel(r), _assignment_parts(store, r, n, per, m, k, streams, sizes))
    release()
    stats = cluster_stats(sizes)
    level1 = level1_stats(store, r, len(shard_ranges(n, per)))
    units = [store.done_record(STAGE, r, super_unit(s)) for s in range(m)]
    flat = m == 1  # level 1 was the flat k-means: its figures are level 2's
    stats.update(
        level1={"k": m, "inertia": 0.0 if flat else level1["inertia"], "repairs": 0 if flat else level1["repairs"],
                "streamed": False if flat else level1["streamed"]},
        level2={"k": k, "inertia": float(sum(u["inertia"] for u in units)),
                "repairs": int(sum(u["repairs"] for u in units)),
                "clamped": [s for s, u in enumerate(units) if u["k"] < k],
                "streamed": [s for s, u in enumerate(units) if u.get("streamed")]},
        super_sizes=sizes.reshape(m, k).sum(1).tolist(),
        rechecked=int((0 if flat else level1["rechecked"]) + sum(u.get("rechecked", 0) for u in units)),
        histogram=HISTOGRAM,
    )
    store.write_bytes(clusters_rel(r, HISTOGRAM), size_histogram(sizes, f"round {r}: {m} x {k} targets"))
    store.write_json(clusters_rel(r, "stats.json"), stats)
    store.mark_stage_done(STAGE, r, {"targets": m * k, "non_empty": stats["non_empty"]},
                          outputs=[assignments_rel(r), clusters_rel(r, "stats.json"), clusters_rel(r, HISTOGRAM)])
    return stats


class _IdStream:
    """A level-2 unit's rows (sorted by image id), handed out in id order: ``until(hi)`` gives the rows with
    ``image_id < hi`` not given yet, reading the file a row group at a time."""

    def __init__(self, parts: Iterator[pd.DataFrame]):
        self.parts = parts
        self.ids = np.zeros(0, dtype=np.int64)
        self.sub = np.zeros(0, dtype=np.int64)
        self.dist = np.zeros(0, dtype=np.float32)
        self.exhausted = False

    def until(self, hi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        while not self.exhausted and (len(self.ids) == 0 or self.ids[-1] < hi):
            part = next(self.parts, None)
            if part is None:
                self.exhausted = True
                break
            self.ids = np.concatenate([self.ids, part["image_id"].to_numpy(np.int64)])
            self.sub = np.concatenate([self.sub, part["sub"].to_numpy(np.int64)])
            self.dist = np.concatenate([self.dist, part["distance"].to_numpy(np.float32)])
        cut = int(np.searchsorted(self.ids, hi))
        out = self.ids[:cut], self.sub[:cut], self.dist[:cut]
        self.ids, self.sub, self.dist = self.ids[cut:], self.sub[cut:], self.dist[cut:]
        return out


def _assignment_parts(store: RunStore, r: int, n: int, per: int, m: int, k: int, streams: list[_IdStream],
                      sizes: np.ndarray, rows: int = PARQUET_ROWS) -> Iterator[pd.DataFrame]:
    """``assignments.parquet``'s rows in parts (image_id, super, sub, target, distance): never all at once. Each
    part's targets are counted into ``sizes`` (images per target) as it is made; every image must be filed by
    exactly the level-2 unit of its super-cluster."""
    for lo in range(0, max(n, 1), rows):
        hi = min(lo + rows, n)
        if m > 1:
            first, last = lo // per, (hi - 1) // per
            labels = np.concatenate([read_labels(store, r, i) for i in range(first, last + 1)])
            s = labels[lo - first * per : hi - first * per].astype(np.int64)
        else:
            s = np.zeros(hi - lo, dtype=np.int64)
        c = np.full(hi - lo, -1, dtype=np.int64)
        distance = np.zeros(hi - lo, dtype=np.float32)
        for j, stream in enumerate(streams):
            ids, sub, dist = stream.until(hi)
            if len(ids) and (ids[0] < lo or (s[ids - lo] != j).any()):
                raise StoreError(f"cluster round {r}: {super_unit(j)}'s members disagree with level 1's labels: "
                                 "rerun the cluster stage with --force")
            c[ids - lo], distance[ids - lo] = sub, dist
        if (c < 0).any():
            raise StoreError(f"cluster round {r}: image {lo + int(np.flatnonzero(c < 0)[0])} is in no level-2 "
                             "unit's file: rerun the cluster stage with --force")
        target = s * k + c
        sizes += np.bincount(target, minlength=len(sizes))
        yield pd.DataFrame({"image_id": np.arange(lo, hi), "super": s, "sub": c, "target": target,
                            "distance": distance})


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

"""The cluster stage: round features -> PCA-whitening + L2 -> level 1 (m super-clusters) -> level 2 (k
sub-clusters inside each super-cluster, one unit of work per super-cluster) -> ``assignments.parquet``.

Outputs under ``rounds/<r>/clusters/``: ``pca.npz``, ``super.parquet`` + ``super_centroids.npy`` (level 1),
``sub-<s>.parquet`` + ``sub-<s>_centroids.npy`` (level 2, per super-cluster), ``assignments.parquet``
(image_id, super, sub, target, distance) and ``stats.json``. With m = 1 it is plain DeepCluster k-means.
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd

from deepercluster.clustering.kmeans import check_finite, kmeans
from deepercluster.clustering.pca import PCAWhitening, fit_pca
from deepercluster.config import PipelineConfig
from deepercluster.data.shard import load_manifest, shard_ids
from deepercluster.errors import ConfigError, DataError
from deepercluster.features import open_features
from deepercluster.store import RunStore, round_dir

STAGE = "cluster"
LEVEL1_UNIT = "level1"


def clusters_rel(r: int, name: str = "") -> str:
    return f"{round_dir(r)}/clusters/{name}".rstrip("/")


def assignments_rel(r: int) -> str:
    return clusters_rel(r, "assignments.parquet")


def _seed(cfg: PipelineConfig, r: int, level: int, unit: int = 0) -> np.random.SeedSequence:
    return np.random.SeedSequence([cfg.seed, r, level, unit])


def load_round_features(store: RunStore, r: int) -> np.ndarray:
    """All features of a round as float32, checked finite shard by shard (the error names the shard)."""
    array = open_features(store, r)
    manifest = load_manifest(store)
    out = np.empty(array.shape, dtype=np.float32)
    for s in shard_ids(manifest):
        rows = manifest["image_id"][manifest["shard"] == s]
        lo, hi = int(rows.iloc[0]), int(rows.iloc[-1]) + 1
        block = array[lo:hi].astype(np.float32)
        try:
            check_finite(block, f"feature shard {s} of round {r}")
        except DataError as err:
            raise DataError(f"{err} (rows {lo}-{hi - 1} of {store.url(f'{round_dir(r)}/features.zarr')})") from None
        out[lo:hi] = block
    return out


def whitened_features(store: RunStore, cfg: PipelineConfig, r: int) -> np.ndarray:
    """Features after the round's PCA-whitening and L2-normalisation (fits and saves the PCA on first use)."""
    x = load_round_features(store, r)
    rel = clusters_rel(r, "pca.npz")
    if store.exists(rel):
        pca = PCAWhitening.from_bytes(store.read_bytes(rel))
    else:
        rng = np.random.default_rng(_seed(cfg, r, 0))
        sample = x if len(x) <= cfg.cluster.pca_sample else x[np.sort(rng.choice(len(x), cfg.cluster.pca_sample,
                                                                                  replace=False))]
        pca = fit_pca(sample, cfg.cluster.pca_dim, whiten=cfg.cluster.whiten)
        store.write_bytes(rel, pca.to_bytes())
    return pca.transform(x)


def _save_npy(store: RunStore, rel: str, a: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, a)
    store.write_bytes(rel, buf.getvalue())


def prepare_cluster(store: RunStore, cfg: PipelineConfig, r: int, force: bool = False) -> list[int]:
    """PCA + level 1; returns the super-clusters whose level-2 unit is still to do."""
    if force:
        store.reset_stage(STAGE, r)
        store.remove(clusters_rel(r))
    n = len(load_manifest(store))
    m, k = cfg.cluster.super_clusters, cfg.cluster.k
    if m * k > n:
        raise ConfigError(f"cluster.k x cluster.super_clusters = {m * k} exceeds the {n} images of the run")
    if not store.is_done(STAGE, r, LEVEL1_UNIT):
        x = whitened_features(store, cfg, r)
        if m > 1:
            res = kmeans(x, m, cfg.cluster.niter, _seed(cfg, r, 1))
            super_ids, inertia, repairs = res.assign, res.inertia, res.repairs
            _save_npy(store, clusters_rel(r, "super_centroids.npy"), res.centroids)
        else:
            super_ids, inertia, repairs = np.zeros(n, dtype=np.int64), 0.0, 0
        store.write_parquet(clusters_rel(r, "super.parquet"), pd.DataFrame({"image_id": np.arange(n),
                                                                           "super": super_ids}))
        store.mark_done(STAGE, r, LEVEL1_UNIT, {"inertia": inertia, "repairs": repairs})
    done = set(store.done_units(STAGE, r))
    return [s for s in range(m) if f"super-{s:04d}" not in done]


def cluster_super(store: RunStore, cfg: PipelineConfig, r: int, s: int) -> dict[str, float]:
    """Level 2 for super-cluster ``s``: k-means of its members into ``k`` sub-clusters (fewer if it is smaller)."""
    unit = f"super-{s:04d}"
    if store.is_done(STAGE, r, unit):
        return store.done_record(STAGE, r, unit)
    x = whitened_features(store, cfg, r)
    members = store.read_parquet(clusters_rel(r, "super.parquet"))
    ids = members["image_id"].to_numpy()[members["super"].to_numpy() == s]
    if len(ids) == 0:
        info = {"members": 0, "k": 0, "inertia": 0.0, "repairs": 0}
        sub, dist = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    else:
        res = kmeans(x[ids], cfg.cluster.k, cfg.cluster.niter, _seed(cfg, r, 2, s))
        sub, dist = res.assign, res.distance
        _save_npy(store, clusters_rel(r, f"sub-{s:04d}_centroids.npy"), res.centroids)
        info = {"members": len(ids), "k": res.k, "inertia": res.inertia, "repairs": res.repairs}
    store.write_parquet(clusters_rel(r, f"sub-{s:04d}.parquet"),
                        pd.DataFrame({"image_id": ids, "sub": sub, "distance": dist}))
    store.mark_done(STAGE, r, unit, info)
    return info


def finalize_cluster(store: RunStore, cfg: PipelineConfig, r: int) -> dict:
    """Merge the level-2 units into ``assignments.parquet`` and write ``stats.json``."""
    m, k = cfg.cluster.super_clusters, cfg.cluster.k
    parts = []
    for s in range(m):
        part = store.read_parquet(clusters_rel(r, f"sub-{s:04d}.parquet"))
        parts.append(part.assign(super=s))
    a = pd.concat(parts).sort_values("image_id").reset_index(drop=True)
    a["target"] = a["super"] * k + a["sub"]
    a = a[["image_id", "super", "sub", "target", "distance"]]
    store.write_parquet(assignments_rel(r), a)
    stats = cluster_stats(a["target"].to_numpy(), m * k)
    level1 = store.done_record(STAGE, r, LEVEL1_UNIT)
    units = [store.done_record(STAGE, r, f"super-{s:04d}") for s in range(m)]
    stats.update(
        level1={"k": m, "inertia": level1["inertia"], "repairs": level1["repairs"]},
        level2={"k": k, "inertia": float(sum(u["inertia"] for u in units)),
                "repairs": int(sum(u["repairs"] for u in units)),
                "clamped": [s for s, u in enumerate(units) if u["k"] < k]},
        super_sizes=np.bincount(a["super"], minlength=m).tolist(),
    )
    store.write_json(clusters_rel(r, "stats.json"), stats)
    store.mark_stage_done(STAGE, r, {"targets": m * k, "non_empty": stats["non_empty"]})
    return stats


def cluster_stats(targets: np.ndarray, n_targets: int) -> dict:
    sizes = np.bincount(targets, minlength=n_targets)
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


def run_cluster_stage(store: RunStore, cfg: PipelineConfig, r: int, force: bool = False) -> dict:
    """The whole stage in this process (the Prefect flow fans ``cluster_super`` out over Dask instead)."""
    if not force and store.stage_done(STAGE, r):
        return store.read_json(clusters_rel(r, "stats.json"))
    for s in prepare_cluster(store, cfg, r, force=force):
        cluster_super(store, cfg, r, s)
    return finalize_cluster(store, cfg, r)


def load_assignments(store: RunStore, r: int) -> pd.DataFrame:
    return store.read_parquet(assignments_rel(r))

"""PCA-whitening of a round's features, as units of the cluster stage (any worker runs any of them).

1. ``moments``: the exact float64 mean and covariance sums of a seeded random sample of ``cluster.pca_sample`` rows,
   one unit per shard group (at most ``PCA_GROUPS``, fixed by N and the shard size: the sums' order is part of the
   fit), each reading only its sampled rows; ``pca``: one unit adds them in group order, fits the transform, saves
   ``clusters/pca.npz`` and creates ``clusters/whitened.zarr`` (N x d float32, NaN fill value).
2. ``whiten``: one unit per run of shards (``runtime.block_rows`` rows): every feature shard is checked (non-finite
   values: an error naming the shard), whitened, L2-normalised and snapped to the fixed-point grid of k-means (exact
   cluster sums, see ``kmeans``), then written as its own zarr shard, recorded with its object's size and checksum,
   so a killed run resumes and a lost or damaged shard is recomputed alone; ``whitened``: the record readers check.

A feature shard whose object is missing (its rows read as NaN, the fill value) or cannot be read is a StoreError
naming the extract unit to recompute; real non-finite features are a DataError naming the shard.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import zarr

from deepercluster.clustering.kmeans import snap_to_grid
from deepercluster.clustering.pca import Moments, PCAWhitening, pca_from_moments
from deepercluster.clustering.vectors import (
    open_round_features,
    raise_if_missing,
    read_rows,
    shard_ranges,
    shard_rows,
)
from deepercluster.config import PipelineConfig
from deepercluster.errors import ConfigError, DataError
from deepercluster.paths import WHITENED, clusters_rel, features_rel, pca_rel, whitened_rel, zarr_shard_rel
from deepercluster.store import RunStore, round_dir

__all__ = ["STAGE", "WHITENED", "checked", "clusters_rel", "ensure_pca", "fit_pca_unit", "group_moments",
           "mark_whitened", "moments_todo", "open_whitened", "pca_rel", "whiten", "whiten_shards", "whiten_todo",
           "whiten_unit", "whitened_features", "whitened_rel", "whitening_done"]

STAGE = "cluster"


def whiten_unit(shard: int) -> str:
    return f"whiten-{shard:05d}"


def _seed(cfg: PipelineConfig, r: int, level: int, unit: int = 0) -> np.random.SeedSequence:
    return np.random.SeedSequence([cfg.seed, r, level, unit])


def checked(block: np.ndarray, store: RunStore, r: int, shard: int, lo: int) -> np.ndarray:
    """``block`` (rows of feature shard ``shard``) as float32, or a one-line error: a StoreError naming the extract
    unit when the shard's object is missing (its rows read as NaN, the fill value), else a DataError naming the
    shard and its first non-finite rows."""
    x = np.asarray(block, dtype=np.float32)
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        raise_if_missing(store, features_rel(r), [shard])
        bad = (lo + np.flatnonzero(~finite)[:5]).tolist()
        raise DataError(f"feature shard {shard} of round {r} holds non-finite values (rows {bad}) in "
                        f"{store.url(round_dir(r) + '/features.zarr')}: "
                        + ("the random init's features are not finite: check model.init_checkpoint and the images"
                           if r == 0 else f"the model round {r - 1}'s training made diverged (see its loss in "
                           f"rounds/{r - 1}/train/log.jsonl): retrain it with a lower train.lr, e.g. `deepercluster "
                           f"run --run RUN --set train.lr=...` (re-extracting gives the same values)"))
    return x


PCA_GROUPS = 16  # at most this many shard groups the PCA's moments are split into
PCA_GROUP_ROWS = 16384  # ... and about one per this many sampled rows (a small run: one unit, not 16 tasks)


def moments_unit(group: int) -> str:
    return f"moments-{group:02d}"


def moments_rel(r: int, group: int) -> str:
    return clusters_rel(r, f"pca/moments-{group:02d}.npz")


def pca_groups(n: int, rows_per_shard: int, sample: int) -> list[tuple[int, int]]:
    """The PCA's shard groups, (first, last) inclusive: runs of consecutive shards, one per ``PCA_GROUP_ROWS``
    sampled rows, at most ``PCA_GROUPS``. Fixed by N, the shard size and ``cluster.pca_sample`` alone (the float64
    sums' order is part of the fit)."""
    shards = len(shard_ranges(n, rows_per_shard))
    g = max(1, min(PCA_GROUPS, shards, -(-min(n, sample) // PCA_GROUP_ROWS)))
    bounds = [shards * i // g for i in range(g + 1)]
    return [(bounds[i], bounds[i + 1] - 1) for i in range(g)]


def pca_sample(cfg: PipelineConfig, r: int, n: int) -> np.ndarray:
    """The rows the PCA is fitted on: ``cluster.pca_sample`` of them, drawn with the round's seed (sorted)."""
    size = min(n, cfg.cluster.pca_sample)
    if size == n:
        return np.arange(n)
    return np.sort(np.random.default_rng(_seed(cfg, r, 0)).choice(n, size, replace=False))


def moments_todo(store: RunStore, cfg: PipelineConfig, r: int) -> list[int]:
    """The shard groups whose sample moments are still to compute (none once the PCA is saved). The stage's first
    step: a run with fewer images than targets is refused here, before any work."""
    n = int(open_round_features(store, r).shape[0])
    if cfg.cluster.n_targets > n:
        raise ConfigError(f"cluster.k x cluster.super_clusters = {cfg.cluster.n_targets} exceeds the {n} images of "
                          "the run")
    if store.is_done(STAGE, r, "pca") or store.exists(pca_rel(r)):
        return []
    array = open_round_features(store, r)
    groups = pca_groups(int(array.shape[0]), shard_rows(array), cfg.cluster.pca_sample)
    done = set(store.done_units(STAGE, r))
    return [g for g in range(len(groups)) if moments_unit(g) not in done]


def _moments(store: RunStore, cfg: PipelineConfig, r: int, group: int) -> Moments:
    """Exact float64 moments of the PCA sample's rows in one shard group (only those rows are read)."""
    array = open_round_features(store, r)
    n, dim = array.shape
    ranges = shard_ranges(n, shard_rows(array))
    first, last = pca_groups(n, shard_rows(array), cfg.cluster.pca_sample)[group]
    sample = pca_sample(cfg, r, n)
    moments = Moments(dim)
    for s in range(first, last + 1):
        lo, hi = ranges[s]
        rows = sample[np.searchsorted(sample, lo) : np.searchsorted(sample, hi)]
        if len(rows):
            block = read_rows(store, array, features_rel(r), lo, hi, None if len(rows) == hi - lo else rows)
            moments.add(checked(block, store, r, s, lo))
    return moments


def group_moments(store: RunStore, cfg: PipelineConfig, r: int, group: int) -> dict:
    """A moments unit: one shard group's moments, saved and recorded."""
    moments = _moments(store, cfg, r, group)
    store.write_bytes(moments_rel(r, group), moments.to_bytes())
    store.mark_done(STAGE, r, moments_unit(group), {"rows": moments.n}, outputs=[moments_rel(r, group)])
    return {"rows": moments.n}


def fit_pca_unit(store: RunStore, cfg: PipelineConfig, r: int) -> dict:
    """Add the groups' moments in group order, fit the PCA-whitening and save it (a saved one is kept: the stage's
    outputs are discarded whole when what they depend on changes), then make the whitened array (each whitening
    unit writes its own shards). The groups' files are removed once the PCA is saved."""
    features = open_round_features(store, r)
    n, dim = int(features.shape[0]), int(features.shape[1])
    groups = pca_groups(n, shard_rows(features), cfg.cluster.pca_sample)
    if store.exists(pca_rel(r)):
        pca, rows = ensure_pca(store, cfg, r), None
    else:
        total = Moments(dim)
        for g in range(len(groups)):
            data = store.read_bytes(moments_rel(r, g))
            with store.reading(moments_rel(r, g)):
                total.merge(Moments.from_bytes(data))
        pca, rows = _fit(cfg, total), total.n
        store.write_bytes(pca_rel(r), pca.to_bytes())
    if not store.exists(f"{whitened_rel(r)}/zarr.json"):
        zarr.create_array(store.url(whitened_rel(r)), shape=(n, pca.dim), chunks=(int(features.chunks[0]), pca.dim),
                          shards=(shard_rows(features), pca.dim), dtype="float32", fill_value=float("nan"),
                          compressors=None, storage_options=store.storage_options or None, overwrite=True)
    store.mark_done(STAGE, r, "pca", {"rows": rows, "dim": pca.dim}, outputs=[pca_rel(r)])
    for g in range(len(groups)):
        store.forget(STAGE, r, moments_unit(g))
        store.remove(moments_rel(r, g))
    return {"rows": rows}


def _fit(cfg: PipelineConfig, total: Moments) -> PCAWhitening:
    return pca_from_moments(total, cfg.cluster.pca_dim, whiten=cfg.cluster.whiten)


def ensure_pca(store: RunStore, cfg: PipelineConfig, r: int) -> PCAWhitening:
    """The round's PCA-whitening: loaded when saved, else fitted in this process (the groups one after the other,
    no records: the final model's round, which has no cluster stage, uses this) and saved."""
    if not store.exists(pca_rel(r)):
        array = open_round_features(store, r)
        total = Moments(int(array.shape[1]))
        for g in range(len(pca_groups(int(array.shape[0]), shard_rows(array), cfg.cluster.pca_sample))):
            total.merge(_moments(store, cfg, r, g))
        store.write_bytes(pca_rel(r), _fit(cfg, total).to_bytes())
    data = store.read_bytes(pca_rel(r))
    with store.reading(pca_rel(r)):
        return PCAWhitening.from_bytes(data)


def whiten(pca: PCAWhitening, x: np.ndarray, rows: int = 4096) -> np.ndarray:
    """Whitened, L2-normalised rows on the k-means grid (|components| <= 1, so the grid step is 2^-23); computed
    ``rows`` at a time to bound the float64 temporaries."""
    out = np.empty((len(x), pca.dim), dtype=np.float32)
    for lo in range(0, len(x), rows):
        out[lo : lo + rows] = snap_to_grid(pca.transform(x[lo : lo + rows]), exponent=0)
    return out


def open_whitened(store: RunStore, r: int, mode: str = "r") -> zarr.Array:
    """``clusters/whitened.zarr``; opened to write, every chunk is written (a shard's object always exists)."""
    array = zarr.open_array(store.url(whitened_rel(r)), mode=mode, storage_options=store.storage_options or None)
    return array if mode == "r" else array.with_config({"write_empty_chunks": True})


def whitening_done(store: RunStore, r: int) -> bool:
    return store.is_done(STAGE, r, "whitened")


def whiten_todo(store: RunStore, cfg: PipelineConfig, r: int) -> list[tuple[int, int]]:
    """Runs of consecutive shards still to whiten (``runtime.block_rows`` rows at most each); a done shard whose
    object went missing or changed size is redone."""
    from deepercluster.clustering.sharded import shard_blocks_todo

    return shard_blocks_todo(store, cfg, r, whiten_unit)


def whiten_shards(store: RunStore, cfg: PipelineConfig, r: int, unit: tuple[int, int]) -> dict:
    """Whiten feature shards ``unit`` (first, last) into ``whitened.zarr`` (one writer per zarr shard, a few
    shards in flight), each shard recorded on its own with its object's size and checksum."""
    pca = ensure_pca(store, cfg, r)
    features = open_round_features(store, r)
    ranges = shard_ranges(int(features.shape[0]), shard_rows(features))
    out = open_whitened(store, r, mode="r+")

    def one(s: int) -> None:
        if store.is_done(STAGE, r, whiten_unit(s)):
            return
        lo, hi = ranges[s]
        out[lo:hi] = whiten(pca, checked(read_rows(store, features, features_rel(r), lo, hi), store, r, s, lo))
        store.mark_done(STAGE, r, whiten_unit(s), {"rows": [lo, hi]}, outputs=[zarr_shard_rel(whitened_rel(r), s)])

    with ThreadPoolExecutor(cfg.runtime.stream_threads) as pool:
        list(pool.map(one, range(unit[0], unit[1] + 1)))
    return {"shards": unit[1] - unit[0] + 1}


def mark_whitened(store: RunStore, r: int) -> dict:
    """Every shard is whitened: what readers of ``whitened.zarr`` check first."""
    array = open_whitened(store, r)
    info = {"rows": int(array.shape[0]), "dim": int(array.shape[1]), "shards": len(shard_ranges(
        int(array.shape[0]), shard_rows(array)))}
    store.write_json(clusters_rel(r, "whitened.json"), info)
    store.mark_done(STAGE, r, "whitened", info, outputs=[clusters_rel(r, "whitened.json")])
    return info


def whitened_features(store: RunStore, cfg: PipelineConfig, r: int) -> np.ndarray:
    """All whitened features of round ``r`` in memory (float32, N x d): read from ``whitened.zarr`` when the cluster
    stage wrote it, else computed shard by shard from the features (the PCA is fitted and saved on first use)."""
    if whitening_done(store, r):
        array = open_whitened(store, r)
        out = np.empty(array.shape, dtype=np.float32)
        for s, (lo, hi) in enumerate(shard_ranges(int(array.shape[0]), shard_rows(array))):
            out[lo:hi] = read_rows(store, array, whitened_rel(r), lo, hi)
            if not np.isfinite(out[lo:hi]).all():
                raise_if_missing(store, whitened_rel(r), [s])
        return out
    pca = ensure_pca(store, cfg, r)
    features = open_round_features(store, r)
    ranges = shard_ranges(int(features.shape[0]), shard_rows(features))
    out = np.empty((features.shape[0], pca.dim), dtype=np.float32)
    for s, (lo, hi) in enumerate(ranges):
        out[lo:hi] = whiten(pca, checked(read_rows(store, features, features_rel(r), lo, hi), store, r, s, lo))
    return out

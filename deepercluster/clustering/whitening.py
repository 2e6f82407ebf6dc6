"""PCA-whitening of a round's features, shard by shard.

1. :func:`ensure_pca`: a seeded random sample of ``cluster.pca_sample`` rows is read shard by shard (only its rows)
   and its exact mean and covariance are accumulated in float64; the fitted transform is saved as
   ``clusters/pca.npz`` and reused when the stage reruns.
2. :func:`whiten_round`: every feature shard is checked (non-finite values: an error naming the shard), whitened,
   L2-normalised and snapped to the fixed-point grid of k-means (exact cluster sums, see ``kmeans``), then written
   as one zarr shard of ``clusters/whitened.zarr`` (N x d float32, NaN fill value). Shards run in a few threads;
   each has a completion record listing its zarr shard's object (size and checksum), so a killed run resumes and
   a lost or damaged shard is recomputed alone.

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
from deepercluster.errors import DataError
from deepercluster.paths import WHITENED, clusters_rel, features_rel, pca_rel, whitened_rel, zarr_shard_rel
from deepercluster.store import RunStore, round_dir

__all__ = ["STAGE", "WHITENED", "checked", "clusters_rel", "ensure_pca", "open_whitened", "pca_rel", "whiten",
           "whiten_round", "whiten_unit", "whitened_features", "whitened_rel", "whitening_done"]

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


def ensure_pca(store: RunStore, cfg: PipelineConfig, r: int) -> PCAWhitening:
    """The round's PCA-whitening: loaded when saved, else fitted on a bounded random sample and saved."""
    if store.exists(pca_rel(r)):
        data = store.read_bytes(pca_rel(r))
        with store.reading(pca_rel(r)):
            return PCAWhitening.from_bytes(data)
    array = open_round_features(store, r)
    n, dim = array.shape
    rng = np.random.default_rng(_seed(cfg, r, 0))
    size = min(n, cfg.cluster.pca_sample)
    sample = np.arange(n) if size == n else np.sort(rng.choice(n, size, replace=False))
    ranges = shard_ranges(n, shard_rows(array))

    def read(s: int) -> np.ndarray:
        lo, hi = ranges[s]
        rows = sample[np.searchsorted(sample, lo) : np.searchsorted(sample, hi)]
        if len(rows) == 0:
            return np.zeros((0, dim), dtype=np.float32)
        block = read_rows(store, array, features_rel(r), lo, hi, None if len(rows) == hi - lo else rows)
        return checked(block, store, r, s, lo)

    moments = Moments(dim)
    with ThreadPoolExecutor(cfg.runtime.stream_threads) as pool:
        for block in pool.map(read, range(len(ranges))):  # in shard order: the float64 sums are reproducible
            moments.add(block)
    pca = pca_from_moments(moments, cfg.cluster.pca_dim, whiten=cfg.cluster.whiten)
    store.write_bytes(pca_rel(r), pca.to_bytes())
    return pca


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
    return store.exists(clusters_rel(r, "whitened.json"))


def whiten_round(store: RunStore, cfg: PipelineConfig, r: int, pca: PCAWhitening) -> zarr.Array:
    """Write ``clusters/whitened.zarr`` shard by shard (skipping shards already done, redoing one whose record was
    dropped, see ``stages.cluster``); returns the array."""
    done = set(store.done_units(STAGE, r))
    if whitening_done(store, r):
        shards = store.read_json(clusters_rel(r, "whitened.json"))["shards"]
        if all(whiten_unit(s) in done for s in range(shards)):
            return open_whitened(store, r)
    features = open_round_features(store, r)
    n = int(features.shape[0])
    rows = shard_rows(features)
    ranges = shard_ranges(n, rows)
    if not store.exists(f"{whitened_rel(r)}/zarr.json"):
        inner = int(features.chunks[0])
        zarr.create_array(store.url(whitened_rel(r)), shape=(n, pca.dim), chunks=(inner, pca.dim),
                          shards=(rows, pca.dim), dtype="float32", fill_value=float("nan"), compressors=None,
                          storage_options=store.storage_options or None, overwrite=True)
    out = open_whitened(store, r, mode="r+")

    def one(s: int) -> None:
        if whiten_unit(s) in done:
            return
        lo, hi = ranges[s]
        out[lo:hi] = whiten(pca, checked(read_rows(store, features, features_rel(r), lo, hi), store, r, s, lo))
        store.mark_done(STAGE, r, whiten_unit(s), {"rows": [lo, hi]}, outputs=[zarr_shard_rel(whitened_rel(r), s)])

    with ThreadPoolExecutor(cfg.runtime.stream_threads) as pool:
        list(pool.map(one, range(len(ranges))))
    store.write_json(clusters_rel(r, "whitened.json"), {"rows": n, "dim": pca.dim, "shards": len(ranges)})
    return out


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

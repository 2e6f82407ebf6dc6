"""Per-cluster means of what the training heads read, for ``train.head_init: centroids``.

The heads read ``ReLU(features)`` of the training view; a level-2 unit, having clustered super-cluster ``s``, also
streams its members' rows of the round's ``features.zarr`` (the clustering view) once and saves the mean of
``ReLU(feature)`` over each sub-cluster as ``sub-<s>_means.npy`` (k x D float32, NaN rows for empty clusters), and
the sum of squared distances of its members to their mean in the unit's completion record. The train stage then
starts each sub-head as the nearest-mean classifier of its clusters (:func:`deepercluster.models.heads.
init_heads_from_means`) instead of a random one. numpy only: the cluster stage does not import torch.
"""

from __future__ import annotations

import numpy as np

from deepercluster.clustering.kernels import signed_row_sums
from deepercluster.clustering.kmeans import VectorSource
from deepercluster.clustering.vectors import ShardedVectors, members_by_shard, open_round_features, shard_rows
from deepercluster.paths import features_rel, means_rel
from deepercluster.store import RunStore


def relu_cluster_means(source: VectorSource, labels: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """Mean ``ReLU(row)`` of each of ``k`` clusters (``labels[i]``: cluster of the source's i-th row; NaN rows for
    empty clusters) and the sum over rows of the squared distance to their cluster's mean; one pass over the
    source's blocks (shard by shard, or an in-memory ``ArrayVectors``), float64."""
    sums = np.zeros((k, source.dim))
    sq = np.zeros(k)
    for lo, block in source.blocks():
        h = np.maximum(block, 0, dtype=np.float32)
        lab = np.asarray(labels[lo : lo + len(h)], dtype=np.int64)
        signed_row_sums(np.ascontiguousarray(h), np.arange(len(h)), lab, np.full(len(h), -1, dtype=np.int64), sums)
        sq += np.bincount(lab, weights=np.einsum("ij,ij->i", h, h, dtype=np.float64), minlength=k)
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / counts[:, None]
    within = float(sq.sum() - (counts * np.einsum("ij,ij->i", np.nan_to_num(means), np.nan_to_num(means))).sum())
    return means.astype(np.float32), max(within, 0.0)


def save_cluster_means(store: RunStore, r: int, s: int, ids: np.ndarray, labels: np.ndarray, k: int,
                       threads: int = 2) -> dict[str, float]:
    """Compute and save the means of super-cluster ``s`` (members ``ids``, sorted, with sub-cluster ``labels``);
    returns what goes into the unit's record: ``means_within`` (sum of squared distances) and ``means_rows``."""
    array = open_round_features(store, r)
    source = ShardedVectors(array, members_by_shard(int(array.shape[0]), shard_rows(array), ids), threads=threads,
                            store=store, rel=features_rel(r))
    means, within = relu_cluster_means(source, labels, k)
    store.write_npy(means_rel(r, s), means)
    return {"means_within": within, "means_rows": int(len(ids))}


def load_cluster_means(store: RunStore, r: int, s: int) -> np.ndarray:
    return store.read_npy(means_rel(r, s))


def head_temperature(records: list[dict]) -> float:
    """The mean squared distance of an image to its cluster's mean, over every level-2 unit's record."""
    rows = sum(int(rec.get("means_rows", 0)) for rec in records)
    within = sum(float(rec.get("means_within", 0.0)) for rec in records)
    return within / rows if rows and within > 0 else 1.0

"""Lloyd's k-means: exact assignment with a faiss flat index, float64 centroid updates, and deterministic
empty-cluster repair (DeeperCluster's: re-seed an empty centroid from a perturbed copy of a large cluster's).

The same data, k, iterations and seed give the same result on any machine with the same faiss/BLAS build.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import faiss
import numpy as np

from deepercluster.errors import DataError

EPS = 1e-7


@dataclass
class KMeansResult:
    centroids: np.ndarray  # (k, d) float32
    assign: np.ndarray  # (n,) int64
    distance: np.ndarray  # (n,) float32: squared L2 to the assigned centroid
    inertia: float  # sum of ``distance``
    repairs: int = 0  # empty clusters re-seeded over all iterations
    k_requested: int = 0
    history: list[float] = field(default_factory=list)  # inertia after each assignment pass

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])


def assign_to_centroids(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid (squared L2) of every row of ``x``."""
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    dist, idx = index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
    return idx[:, 0].astype(np.int64), np.maximum(dist[:, 0], 0)


def cluster_sums(x: np.ndarray, assign: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster float64 sums and counts, in a fixed order (deterministic)."""
    counts = np.bincount(assign, minlength=k)
    order = np.argsort(assign, kind="stable")
    sums = np.zeros((k, x.shape[1]), dtype=np.float64)
    nonempty = np.flatnonzero(counts)
    if len(nonempty):
        starts = np.concatenate([[0], np.cumsum(counts[nonempty])[:-1]])
        sums[nonempty] = np.add.reduceat(x[order].astype(np.float64), starts, axis=0)
    return sums, counts


def repair_empty(centroids: np.ndarray, counts: np.ndarray, rng: np.random.Generator) -> int:
    """Re-seed each empty cluster from a split of a non-empty one, picked with probability ~ (size - 1).

    The split cluster's count is halved so that the next empty cluster prefers another one. In place."""
    empty = np.flatnonzero(counts == 0)
    counts = counts.astype(np.float64)
    for j in empty:
        weights = np.maximum(counts - 1, 0)
        if weights.sum() <= 0:
            break
        m = int(rng.choice(len(counts), p=weights / weights.sum()))
        signs = np.where(np.arange(centroids.shape[1]) % 2 == 0, 1.0, -1.0)
        centroids[j] = centroids[m] * (1 + EPS * signs)
        centroids[m] = centroids[m] * (1 - EPS * signs)
        counts[j] = counts[m] / 2
        counts[m] -= counts[j]
    return len(empty)


def check_finite(x: np.ndarray, what: str) -> None:
    if not np.isfinite(x).all():
        bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
        raise DataError(f"{what} holds non-finite values (rows {bad[:5].tolist()}...): re-extract it")


def kmeans(x: np.ndarray, k: int, niter: int, seed: int | np.random.SeedSequence) -> KMeansResult:
    """k-means of the rows of ``x``. When ``k`` exceeds the number of distinct rows it is lowered to it."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    check_finite(x, "input of k-means")
    n = len(x)
    if n == 0:
        raise DataError("k-means got no points")
    rng = np.random.default_rng(seed)
    k_eff = min(k, n)
    centroids = x[np.sort(rng.choice(n, size=k_eff, replace=False))].astype(np.float64)
    repairs, history = 0, []
    for _ in range(niter):
        assign, dist = assign_to_centroids(x, centroids)
        history.append(float(dist.sum()))
        sums, counts = cluster_sums(x, assign, k_eff)
        nonempty = counts > 0
        centroids[nonempty] = sums[nonempty] / counts[nonempty, None]
        repairs += repair_empty(centroids, counts, rng)
    assign, dist = assign_to_centroids(x, centroids)
    history.append(float(dist.sum()))
    return KMeansResult(
        centroids=centroids.astype(np.float32), assign=assign, distance=dist.astype(np.float32),
        inertia=float(dist.astype(np.float64).sum()), repairs=repairs, k_requested=k, history=history,
    )

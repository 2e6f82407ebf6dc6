"""Lloyd's k-means over a source of vector blocks (in memory, or streamed from zarr shards), exact and deterministic.

- Assignment: :class:`~deepercluster.clustering.assign.NearestCentroid` (BLAS / torch float32 search, near-ties
  re-decided in float64), whose answer does not depend on how rows are batched.
- Update: per-cluster sums are **exact**, and kept up to date incrementally (a pass moves only the rows whose
  cluster changed). Vectors lie on a fixed-point grid (multiples of 2^(e-23) with |x| <= 2^e, see
  :func:`snap_to_grid`), so float64 sums of up to 2^30 of them have no rounding error and any order of summation
  (blocks, shards, threads, workers) gives the same bits.
- Empty clusters: re-seeded deterministically from a split of a large cluster (DeeperCluster's repair).

So the same data, k, iterations and seed give the same assignments in memory or streamed, with any number of
threads or Dask workers, on CPU or GPU.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

import numpy as np

from deepercluster.clustering.assign import NearestCentroid, exact_sq_distances
from deepercluster.clustering.kernels import signed_row_sums
from deepercluster.errors import ConfigError, DataError

EPS = 1e-7
GRID_BITS = 23  # grid step = 2^(e - GRID_BITS): every grid value is exact in float32
MAX_ROWS = 1 << 30  # float64 sums of grid values stay exact up to this many rows
BLOCK_ROWS = 1 << 16  # rows assigned per call for in-memory data


@dataclass
class KMeansResult:
    centroids: np.ndarray  # (k, d) float32
    assign: np.ndarray  # (n,) int64
    distance: np.ndarray  # (n,) float32: squared L2 to the assigned centroid
    inertia: float  # sum of ``distance`` (float64)
    repairs: int = 0  # empty clusters re-seeded over all iterations
    k_requested: int = 0
    history: list[float] = field(default_factory=list)  # inertia after each assignment pass
    rechecked: int = 0  # row assignments re-decided in float64 (near-ties of the float32 search)

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])


class VectorSource(Protocol):
    """Rows to cluster: ``n`` rows of width ``dim`` on the fixed-point grid, read block by block."""

    n: int
    dim: int

    def blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        """(position of the block's first row, float32 C-contiguous rows); every row exactly once."""
        ...

    def take(self, positions: np.ndarray) -> np.ndarray:
        """float32 rows at sorted ``positions``."""
        ...


class ArrayVectors:
    """An in-memory (n, d) float32 array as a source."""

    def __init__(self, x: np.ndarray, block_rows: int = BLOCK_ROWS):
        self.x = np.ascontiguousarray(x, dtype=np.float32)
        self.n, self.dim = self.x.shape
        self.block_rows = block_rows
        self._sq_norms: np.ndarray | None = None

    @property
    def sq_norms(self) -> np.ndarray:
        """float32 squared norms of the rows, computed once per k-means rather than at every pass."""
        if self._sq_norms is None:
            self._sq_norms = np.einsum("ij,ij->i", self.x, self.x)
        return self._sq_norms

    def blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        for lo in range(0, self.n, self.block_rows):
            yield lo, self.x[lo : lo + self.block_rows]

    def take(self, positions: np.ndarray) -> np.ndarray:
        return self.x[positions]


def grid_exponent(max_abs: float) -> int:
    """Smallest e with max_abs <= 2^e."""
    return int(np.ceil(np.log2(max_abs))) if max_abs > 0 else 0


def snap_to_grid(x: np.ndarray, exponent: int | None = None) -> np.ndarray:
    """Round float32 ``x`` to multiples of 2^(e-23) (e: ``exponent``, default from max |x|); a new array. The
    change is at most half a float32 ulp of max |x|, and afterwards cluster sums are exact."""
    x = np.asarray(x, dtype=np.float32)
    e = grid_exponent(float(np.abs(x).max(initial=0))) if exponent is None else exponent
    scale = np.float32(2.0 ** (GRID_BITS - e))
    out = np.multiply(x, scale)
    np.rint(out, out=out)
    out *= np.float32(2.0 ** (e - GRID_BITS))
    return out


def check_finite(x: np.ndarray, what: str) -> None:
    if not np.isfinite(x).all():
        bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
        raise DataError(f"{what} holds non-finite values (rows {bad[:5].tolist()}...): re-extract it")


def cluster_sums(x: np.ndarray, assign: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster float64 sums and counts of the rows of ``x`` (float32). Exact (so order-free) for grid values."""
    sums = np.zeros((k, x.shape[1]))
    n = len(assign)
    signed_row_sums(np.ascontiguousarray(x, dtype=np.float32), np.arange(n), np.asarray(assign, dtype=np.int64),
                    np.full(n, -1, dtype=np.int64), sums)
    return sums, np.bincount(assign, minlength=k)


@dataclass
class Membership:
    """The cluster of every row after the last pass, with the exact per-cluster sums and counts of that membership.

    A pass only moves the rows whose cluster changed (subtracted from the old sum, added to the new one): exact
    arithmetic makes this equal to recomputing every sum, and after the first iterations few rows move. Moves of
    disjoint row ranges may run in concurrent threads (the k-means search threads): each computes its own change of
    the sums, and only adding it in holds a lock."""

    labels: np.ndarray  # (n,) int64; -1 before the first pass
    sums: np.ndarray  # (k, d) float64
    counts: np.ndarray  # (k,) int64
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def empty(cls, n: int, k: int, dim: int) -> Membership:
        return cls(np.full(n, -1, dtype=np.int64), np.zeros((k, dim)), np.zeros(k, dtype=np.int64))

    def move(self, lo: int, x: np.ndarray, new: np.ndarray) -> None:
        """Rows ``[lo, lo + len(x))`` (vectors ``x``) now belong to clusters ``new``."""
        old = self.labels[lo : lo + len(x)]
        changed = np.flatnonzero(old != new)
        if len(changed) == 0:
            return
        k = len(self.counts)
        o, nw = old[changed], new[changed]
        had = o >= 0
        # the clusters touched, numbered 0..t-1 (all k when as many rows moved: no sort needed)
        if len(changed) >= k:
            touched, to_new, to_old = np.arange(k), nw, o[had]
        else:
            touched, inverse = np.unique(np.concatenate([nw, o[had]]), return_inverse=True)
            to_new, to_old = inverse[: len(nw)], inverse[len(nw) :]
        t = len(touched)
        counts = np.bincount(to_new, minlength=t) - np.bincount(to_old, minlength=t)
        sums = np.zeros((t, x.shape[1]))
        old_of = np.full(len(changed), -1, dtype=np.int64)
        old_of[had] = to_old
        signed_row_sums(x, changed, to_new, old_of, sums)  # each changed row + in its new cluster, - in its old
        with self._lock:
            self.counts[touched] += counts
            self.sums[touched] += sums
        old[changed] = nw


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


def _assign_pass(source: VectorSource, centroids: np.ndarray, backend: str, membership: Membership | None,
                 exact: bool = True, threads: int | None = None,
                 ) -> tuple[float, int, np.ndarray | None, np.ndarray | None]:
    """One pass over the source: moves rows in ``membership``, or (final pass, None) returns every row's label and
    distance (``exact``: recomputed row by row, the same bits whatever the batching; else the float32 search's).
    Returns (approximate inertia, rows re-decided in float64, labels, distances)."""
    nc = NearestCentroid(centroids, backend, threads)
    approx = 0.0
    labels_all = distance = None
    if membership is None:
        labels_all = np.empty(source.n, dtype=np.int64)
        distance = np.empty(source.n, dtype=np.float32)
    sq_norms = getattr(source, "sq_norms", None)  # kept by in-memory sources; a streamed block computes its own
    for lo, xb in source.blocks():
        xb_sq = None if sq_norms is None else sq_norms[lo : lo + len(xb)]
        if membership is None:  # the exact distances follow in the search threads, each on its own rows
            done = partial(_exact_rows, distance[lo : lo + len(xb)], xb, nc.centroids) if exact else None
            labels, dist = nc.assign(xb, xb_sq, rows_done=done)
            labels_all[lo : lo + len(xb)] = labels
            if not exact:
                distance[lo : lo + len(xb)] = dist
        else:  # the cluster sums follow in the search threads, each on its own rows
            _, dist = nc.assign(xb, xb_sq, rows_done=partial(_move_rows, membership, lo, xb))
        approx += float(dist.sum(dtype=np.float64))
    return approx, nc.rechecked, labels_all, distance


def _exact_rows(out: np.ndarray, xb: np.ndarray, centroids: np.ndarray, lo: int, hi: int, labels: np.ndarray) -> None:
    out[lo:hi] = exact_sq_distances(xb[lo:hi], centroids, labels, np.float32)


def _move_rows(membership: Membership, block_lo: int, xb: np.ndarray, lo: int, hi: int, labels: np.ndarray) -> None:
    membership.move(block_lo + lo, xb[lo:hi], labels)


@dataclass
class LloydState:
    """A k-means between two iterations: what a checkpoint holds. ``centroids`` after ``iteration`` updates (0: the
    initial ones), the generator's state (the repairs of empty clusters draw from it), and the running totals."""

    iteration: int
    centroids: np.ndarray  # (k, d) float64
    rng_state: dict
    repairs: int = 0
    rechecked: int = 0
    history: list[float] = field(default_factory=list)

    def rng(self) -> np.random.Generator:
        rng = np.random.default_rng()
        rng.bit_generator.state = self.rng_state
        return rng

    def meta(self) -> dict:
        """Everything but the centroids, JSON-able."""
        return {"iteration": self.iteration, "rng_state": self.rng_state, "repairs": self.repairs,
                "rechecked": self.rechecked, "history": self.history}


def initial_state(source: VectorSource, k: int, seed: int | np.random.SeedSequence,
                  init: np.ndarray | None = None) -> LloydState:
    """Iteration 0: ``init``, or ``k`` (at most n) distinct rows of the source drawn with ``seed``."""
    n = source.n
    if n == 0:
        raise DataError("k-means got no points")
    if n > MAX_ROWS:
        raise ConfigError(f"k-means of {n} rows: at most {MAX_ROWS} per unit (use more super-clusters)")
    rng = np.random.default_rng(seed)
    if init is None:
        centroids = source.take(np.sort(rng.choice(n, size=min(k, n), replace=False))).astype(np.float64)
    else:
        centroids = np.array(init, dtype=np.float64)
    return LloydState(0, centroids, rng.bit_generator.state)


def update(state: LloydState, sums: np.ndarray, counts: np.ndarray, approx_inertia: float, rechecked: int) \
        -> LloydState:
    """The next iteration from the exact cluster sums and counts of an assignment pass to ``state``'s centroids
    (the same bits however the pass was split: in one process, or over blocks on many workers)."""
    centroids = state.centroids.copy()
    nonempty = counts > 0
    centroids[nonempty] = sums[nonempty] / counts[nonempty, None]
    rng = state.rng()
    repairs = repair_empty(centroids, counts, rng)
    return LloydState(state.iteration + 1, centroids, rng.bit_generator.state, state.repairs + repairs,
                      state.rechecked + rechecked, [*state.history, approx_inertia])


def block_sums(x: np.ndarray, centroids: np.ndarray, backend: str = "cpu", threads: int | None = None,
               x_sq: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, float, int]:
    """One block's share of an assignment pass: exact per-cluster sums and counts of its rows (grid values) under
    ``centroids``, its approximate inertia and the rows re-decided in float64. Adding every block's sums, in any
    order, gives the whole pass's exact sums. ``x_sq``: the rows' squared norms, when the caller keeps them."""
    nc = NearestCentroid(centroids, backend, threads)
    labels, dist = nc.assign(np.ascontiguousarray(x, dtype=np.float32), x_sq)
    sums, counts = cluster_sums(x, labels, len(centroids))
    return sums, counts, float(dist.sum(dtype=np.float64)), nc.rechecked


def lloyd(source: VectorSource, k: int, niter: int, seed: int | np.random.SeedSequence,
          init: np.ndarray | None = None, backend: str = "cpu", exact_distances: bool = True,
          threads: int | None = None, resume: LloydState | None = None,
          on_iteration: Callable[[LloydState], None] | None = None) -> KMeansResult:
    """k-means of a source whose rows lie on the fixed-point grid. ``k`` is lowered to the number of rows when it
    exceeds it; ``init`` gives the initial centroids (default: ``k`` distinct rows drawn with ``seed``). Without
    ``exact_distances`` the returned distances (and inertia) are the float32 search's, which may differ in the last
    bits with the batching; the assignments never do. ``threads``: CPU search threads (default: numpy's BLAS
    threads); the result does not depend on it.

    Checkpoints: ``on_iteration`` gets the state after every update (save it); ``resume`` continues from such a
    state. The cluster sums are exact, so recomputing them from scratch at the first resumed pass gives the bits
    the uninterrupted run's incremental sums had: a resumed k-means ends bit-identical to an uninterrupted one."""
    state = resume if resume is not None else initial_state(source, k, seed, init)
    state = iterate(source, state, niter, backend, threads, on_iteration)
    return final_pass(source, state, k, backend, exact_distances, threads)


def iterate(source: VectorSource, state: LloydState, niter: int, backend: str = "cpu", threads: int | None = None,
            on_iteration: Callable[[LloydState], None] | None = None) -> LloydState:
    """Lloyd updates from ``state`` until iteration ``niter``; ``on_iteration`` sees every new state."""
    membership = Membership.empty(source.n, len(state.centroids), source.dim)
    while state.iteration < niter:
        approx, checked, _, _ = _assign_pass(source, state.centroids, backend, membership, threads=threads)
        state = update(state, membership.sums, membership.counts.copy(), approx, checked)
        if on_iteration is not None:
            on_iteration(state)
    return state


def final_pass(source: VectorSource, state: LloydState, k: int, backend: str = "cpu", exact_distances: bool = True,
               threads: int | None = None) -> KMeansResult:
    """Every row's label and distance to the state's centroids: the result of the k-means."""
    centroids = state.centroids
    _, checked, labels, distance = _assign_pass(source, centroids, backend, None, exact_distances, threads)
    inertia = float(distance.sum(dtype=np.float64))
    return KMeansResult(
        centroids=centroids.astype(np.float32), assign=labels, distance=distance, inertia=inertia,
        repairs=state.repairs, k_requested=k, history=[*state.history, inertia],
        rechecked=state.rechecked + checked,
    )


def lloyd_on_sample(source: VectorSource, k: int, niter: int, seed: int | np.random.SeedSequence, max_rows: int,
                    backend: str = "cpu", exact_distances: bool = True, threads: int | None = None) -> KMeansResult:
    """k-means fitted on at most ``max_rows`` rows drawn at random with ``seed`` (all rows when there are no more),
    then one pass assigning every row to the fitted centroids. With few clusters (level 1) a sample fixes the
    centroids as well as every row does, at a fraction of the cost of iterating over every row."""
    if max_rows <= 0 or source.n <= max_rows:
        return lloyd(source, k, niter, seed, backend=backend, exact_distances=exact_distances, threads=threads)
    sample_seed, fit_seed = np.random.SeedSequence(seed).spawn(2) if isinstance(seed, int) else seed.spawn(2)
    rows = np.sort(np.random.default_rng(sample_seed).choice(source.n, size=max_rows, replace=False))
    fit = lloyd(ArrayVectors(source.take(rows)), k, niter, fit_seed, backend=backend, exact_distances=False,
                threads=threads)
    out = lloyd(source, k, 0, fit_seed, init=fit.centroids, backend=backend, exact_distances=exact_distances,
                threads=threads)
    out.repairs, out.rechecked = fit.repairs, fit.rechecked + out.rechecked
    out.history = fit.history[:-1] + out.history  # the fit's passes, then the pass over every row
    return out


def kmeans(x: np.ndarray, k: int, niter: int, seed: int | np.random.SeedSequence, init: np.ndarray | None = None,
           backend: str = "cpu") -> KMeansResult:
    """k-means of the rows of ``x`` in memory (snapped to the fixed-point grid first: a copy). When ``k`` exceeds
    the number of rows it is lowered to it; duplicate rows leave clusters empty, which are repaired."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise DataError(f"k-means needs a 2-d array of rows, got shape {x.shape}")
    check_finite(x, "input of k-means")
    return lloyd(ArrayVectors(snap_to_grid(x)), k, niter, seed, init=init, backend=backend)


def assign_to_centroids(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid (squared L2) of every row of ``x``: labels and float32 distances."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    labels, _ = NearestCentroid(centroids).assign(x)
    return labels, exact_sq_distances(x, np.asarray(centroids, dtype=np.float32), labels).astype(np.float32)

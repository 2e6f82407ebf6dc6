"""Nearest-centroid assignment whose answer does not depend on how rows are batched, on threads, workers or device.

A float32 matrix product rounds differently with its blocking and kernels, so two runs that batch rows differently
(in memory vs streamed shard by shard, one worker vs four, CPU vs GPU) could disagree on near-ties, and k-means
would drift apart from there. Here a fast float32 search (a BLAS product on CPU; on CUDA faiss-gpu's flat L2 index
when the ``gpu`` extra is installed, else torch) returns the two nearest centroids of every row; a row whose two
distances are closer than four times a rigorous bound of the float32 error is re-decided in float64, row by row
(ties -> lowest index). Either way the answer is argmin_j of the same float64 distance ``sum_k (x_k - c_jk)^2`` of
the float32 inputs, whatever computed the candidates.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import cache, partial

import numpy as np

from deepercluster.clustering.kernels import nearest_by_column, tree_sq_distances
from deepercluster.errors import ConfigError

U32 = 2.0**-24  # unit roundoff of float32
CANDIDATE_SLACK = 1e-9  # float64 distances this close to the minimum (x (|x| + |c|)^2) are re-checked row by row
DECIDE_BYTES = 32 << 20  # float64 distance block of the near-tie re-check
SCORE_BLOCK_BYTES = 2 << 20  # float32 score block (k x rows) of one search thread: stays in its core's L2 cache
MIN_SEARCH_ROWS, MAX_SEARCH_ROWS = 64, 8192  # rows per score block: fewer make the BLAS products inefficient
CPU, TORCH_CUDA, FAISS_GPU = "cpu", "cuda", "faiss-gpu"  # search backends


def float32_error_bound(x_norms: np.ndarray, c_norm_max: float, dim: int) -> np.ndarray:
    """Bound on |computed - exact| squared L2 distance for any float32 evaluation (GEMM form
    ``|x|^2 + |c|^2 - 2 x.c`` or direct), any summation order: gamma_{d+4} (|x| + |c|)^2, with 10% slack."""
    n = dim + 4
    gamma = n * U32 / (1 - n * U32)
    return 1.1 * gamma * (x_norms.astype(np.float64) + c_norm_max) ** 2


def exact_sq_distances(x: np.ndarray, centroids: np.ndarray, labels: np.ndarray,
                       dtype: type = np.float64) -> np.ndarray:
    """``sum_k (x_ik - c_{label_i},k)^2`` in ``dtype``, summed in a fixed pairwise order, so a row gets the same bits
    whatever its batch, its position or the thread (:func:`~deepercluster.clustering.kernels.tree_sq_distances`)."""
    out = np.empty(len(x), dtype=dtype)
    tree_sq_distances(np.ascontiguousarray(x, dtype=np.float32), np.ascontiguousarray(centroids, dtype=np.float32),
                      np.asarray(labels, dtype=np.int64), out)
    return out


def resolve_backend(device: str = "auto") -> str:
    """``cpu`` (numpy BLAS), ``faiss-gpu`` (faiss's GPU flat index: the ``gpu`` extra) or ``cuda`` (torch): ``auto``
    takes CUDA only when an NVIDIA driver and torch see a GPU; on CUDA, faiss-gpu when faiss reports a GPU (its
    tiled distance + k-selection kernels never hold torch's full n x k distance matrix), torch otherwise. torch and
    faiss are imported only then, so CPU clustering stays light (a streamed k-means must fit a memory budget)."""
    if device == "cpu":
        return CPU
    if device not in ("auto", "cuda"):
        raise ConfigError(f"unknown device {device!r}: use auto, cpu or cuda")
    if device == "auto" and not os.path.exists("/proc/driver/nvidia"):
        return CPU
    import torch

    if torch.cuda.is_available():
        return FAISS_GPU if faiss_gpus() > 0 else TORCH_CUDA
    if device == "cuda":
        raise ConfigError("runtime.device is 'cuda' but no CUDA device is visible: use 'auto' or 'cpu'")
    return CPU


def faiss_gpus() -> int:
    """GPUs faiss can search on: 0 with faiss-cpu (its ``get_num_gpus`` answers 0, and it has no GPU resources
    class), without faiss, or when faiss-gpu cannot talk to the driver; a check that fails must fall back to torch,
    never stop the clustering."""
    try:
        import faiss
    except ImportError:
        return 0
    if not hasattr(faiss, "StandardGpuResources"):
        return 0
    try:
        return int(faiss.get_num_gpus())
    except Exception:  # a faiss-gpu built for another CUDA: torch's search still works
        return 0


def search_threads() -> int:
    """Threads of the CPU search: as many as numpy's BLAS uses (at most the cores this process may run on)."""
    counts = [lib.num_threads for lib in _blas().lib_controllers] if _blas() is not None else []
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(max(counts, default=1), cores))


@cache
def _blas():
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        return None
    return ThreadpoolController().select(user_api="blas")


@cache
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="kmeans-search")


_blas_lock = threading.Lock()
_blas_users = 0
_blas_limit = None


@contextmanager
def single_threaded_blas() -> Iterator[None]:
    """BLAS limited to one thread (process-wide) while at least one search runs: nested and concurrent searches
    share one limit, restored by the last to leave."""
    global _blas_users, _blas_limit
    with _blas_lock:
        if _blas_users == 0 and _blas() is not None:
            _blas_limit = _blas().limit(limits=1)
        _blas_users += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0 and _blas_limit is not None:
                _blas_limit.restore_original_limits()
                _blas_limit = None


RowsDone = Callable[[int, int, np.ndarray], None]  # (lo, hi, final labels of rows [lo, hi)), called in a search thread


class NearestCentroid:
    """The centroids, ready to assign batches of rows to them (build one per Lloyd iteration).

    On CPU a batch is cut into score blocks sized for a core's L2 cache, shared out among ``threads`` threads (default:
    numpy's BLAS threads) that each run single-threaded BLAS products and the compiled top-2 scan of their blocks
    (:func:`~deepercluster.clustering.kernels.nearest_by_column`): the scans run in parallel too, and small products
    do not pay for BLAS's thread synchronisation."""

    def __init__(self, centroids: np.ndarray, backend: str = "cpu", threads: int | None = None):
        self.centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        self.k, self.dim = self.centroids.shape
        self.backend = backend
        self.threads = max(1, threads or search_threads())
        self.rechecked = 0  # rows re-decided in float64 so far
        self._c64 = self.centroids.astype(np.float64)  # for the near-tie re-check
        self._c64_sq = (self._c64**2).sum(1)
        self.c_norm_max = float(np.sqrt(self._c64_sq.max()))
        if backend == TORCH_CUDA:
            self._torch = _torch_centroids(self.centroids)
        elif backend == FAISS_GPU:
            self._faiss = _faiss_gpu_index(self.centroids)
        else:  # scores c.x - |c|^2/2, centroid-major: one float32 product, then -|c|^2/2 added by the top-2 kernel
            self._neg_half_sq = (-self._c64_sq / 2).astype(np.float32)
            self._rows = int(np.clip(SCORE_BLOCK_BYTES // (4 * self.k), MIN_SEARCH_ROWS, MAX_SEARCH_ROWS))

    def assign(self, x: np.ndarray, x_sq: np.ndarray | None = None,
               rows_done: RowsDone | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(labels int64, approximate float32 squared distances) of the rows of ``x`` (float32, C-contiguous);
        ``x_sq``: their float32 squared norms, when the caller keeps them (computed here otherwise).

        ``rows_done(lo, hi, labels)`` is called once per search thread, in that thread, as soon as the labels of its
        contiguous share of rows ``[lo, hi)`` are final: work on those rows (k-means' cluster sums) then runs in
        parallel while their vectors are still in cache. Calls may be concurrent; their row ranges never overlap."""
        n = len(x)
        if x_sq is None:
            x_sq = np.einsum("ij,ij->i", x, x)
        labels, dist = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.float32)
        if n == 0:
            return labels, dist
        if self.backend in (TORCH_CUDA, FAISS_GPU):
            self.rechecked += self._search_device(x, x_sq, labels, dist)
            if rows_done is not None:
                rows_done(0, n, labels)
            return labels, dist
        threads = min(self.threads, -(-n // MIN_SEARCH_ROWS))
        count = -(-n // (self._rows * threads)) * threads  # equal spans, as many for every thread
        bounds = [n * i // count for i in range(count + 1)]
        spans = [(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True) if hi > lo]
        per = -(-len(spans) // threads)
        groups = [spans[i : i + per] for i in range(0, len(spans), per)]
        search = partial(self._search_spans, x, x_sq, labels=labels, dist=dist, rows_done=rows_done)
        with single_threaded_blas():
            if len(groups) == 1:
                self.rechecked += search(spans)
            else:
                self.rechecked += sum(_pool(len(groups)).map(search, groups))
        return labels, dist

    def _search_spans(self, x: np.ndarray, x_sq: np.ndarray, spans: list[tuple[int, int]], labels: np.ndarray,
                      dist: np.ndarray, rows_done: RowsDone | None = None) -> int:
        """Nearest centroid and its float32 distance of the rows ``[lo, hi)`` of each span (consecutive spans), into
        ``labels`` and ``dist``; rows whose second nearest centroid is within the float32 error margin are re-decided
        in float64 (all at once, after the spans), then ``rows_done`` is called on the whole range. Returns the
        number of rows re-decided."""
        width = max(hi - lo for lo, hi in spans)
        block = np.empty(self.k * width, dtype=np.float32)
        ties = np.empty(width, dtype=np.int64)
        near = []
        for lo, hi in spans:
            scores = block[: self.k * (hi - lo)].reshape(self.k, hi - lo)
            np.matmul(self.centroids, x[lo:hi].T, out=scores)
            count = nearest_by_column(scores, self._neg_half_sq, x_sq[lo:hi], self._margin(x_sq[lo:hi]),
                                      labels[lo:hi], dist[lo:hi], ties)
            near.append(lo + ties[:count])
        rechecked = self._redecide(x, np.concatenate(near), labels) if near else 0
        if rows_done is not None:
            lo, hi = spans[0][0], spans[-1][1]
            rows_done(lo, hi, labels[lo:hi])
        return rechecked

    def _search_device(self, x: np.ndarray, x_sq: np.ndarray, labels: np.ndarray, dist: np.ndarray) -> int:
        """The GPU search of all rows at once: the two nearest centroids from torch or faiss-gpu, then the same
        near-tie re-check (:meth:`_take_top2`). Returns the number of rows re-decided."""
        kk = min(2, self.k)
        if self.backend == FAISS_GPU:
            d, idx = _faiss_top2(self._faiss, x, kk)
        else:
            d, idx = _torch_top2(x, *self._torch, kk)
        return self._take_top2(x, x_sq, d, idx, labels, dist)

    def _take_top2(self, x: np.ndarray, x_sq: np.ndarray, d: np.ndarray, idx: np.ndarray, labels: np.ndarray,
                   dist: np.ndarray) -> int:
        """Labels and distances from a float32 search's two nearest candidates per row (``d``, ``idx``: (n, 2), or
        (n, 1) when k = 1, ascending), rows within the float32 margin re-decided in float64: whatever search gave
        the candidates (torch, faiss, any blocking), the labels are the float64 argmin. A search that clamps
        negative distances to 0 (as faiss may) is fine: clamping keeps the order and never widens a gap."""
        labels[:], dist[:] = idx[:, 0], np.maximum(d[:, 0], 0)
        return self._redecide(x, self._near_ties(x_sq, d[:, 1] - d[:, 0]), labels) if self.k > 1 else 0

    def _near_ties(self, x_sq: np.ndarray, gap: np.ndarray) -> np.ndarray:
        """Rows whose two float32 distances differ (``gap``) by at most :meth:`_margin`."""
        return np.flatnonzero(gap <= self._margin(x_sq))

    def _margin(self, x_sq: np.ndarray) -> float:
        """Four times the rigorous float32 error bound of a distance, taken at the largest norm of the batch: rows
        whose two nearest float32 distances differ by at most this are re-decided in float64. A gap computed in
        float32, (second - nearest), is within a relative 2^-23 of the difference of the two computed distances."""
        norm = np.sqrt(float(x_sq.max()) * (1 + (self.dim + 2) * U32))  # bounds every |x| above
        return 4 * float(float32_error_bound(np.float64(norm), self.c_norm_max, self.dim)) * (1 + 4 * U32)

    def _redecide(self, x: np.ndarray, near: np.ndarray, labels: np.ndarray) -> int:
        """Re-decide the rows ``near`` in float64, into ``labels``; returns how many."""
        if len(near):
            labels[near] = self._decide(x[near])
        return len(near)

    def _decide(self, x: np.ndarray) -> np.ndarray:
        """float64 decision for near-tie rows: candidates from a float64 product (error ~1e-13, far below the
        float32 margin), then the row-by-row distance of the candidates, lowest index among equals."""
        step = max(1, DECIDE_BYTES // (8 * self.k))
        return np.concatenate([self._decide_rows(x[lo : lo + step], self._c64, self._c64_sq)
                               for lo in range(0, len(x), step)])

    def _decide_rows(self, x: np.ndarray, c64: np.ndarray, c64_sq: np.ndarray) -> np.ndarray:
        x64 = x.astype(np.float64)
        x64_sq = (x64**2).sum(1, keepdims=True)
        d64 = x64_sq + c64_sq[None, :] - 2 * x64 @ c64.T
        scale = (np.sqrt(x64_sq) + self.c_norm_max) ** 2
        rows, cols = np.nonzero(d64 <= d64.min(1, keepdims=True) + CANDIDATE_SLACK * scale)
        exact = exact_sq_distances(x[rows], self.centroids, cols)
        order = np.lexsort((cols, exact, rows))  # by row, then distance, then centroid index
        first = np.concatenate([[True], rows[order][1:] != rows[order][:-1]])
        return cols[order][first]


def _torch_centroids(centroids: np.ndarray):
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False  # the error bound assumes true float32 products
    c = torch.from_numpy(centroids).cuda()
    return c, (c.double() ** 2).sum(1).float()


def _torch_top2(x: np.ndarray, c, c_sq, kk: int) -> tuple[np.ndarray, np.ndarray]:
    import torch

    xt = torch.from_numpy(x).cuda()
    d = (xt * xt).sum(1, keepdim=True) + c_sq[None, :] - 2 * (xt @ c.T)
    vals, idx = torch.topk(d, kk, dim=1, largest=False)
    return vals.cpu().numpy(), idx.cpu().numpy()


_faiss_lock = threading.Lock()  # one query at a time on the shared faiss GPU resources (faiss's rule)


@cache
def _faiss_resources(device: int):
    """faiss's GPU scratch memory and streams of ``device``, made once per process (each holds ~1.5 GiB)."""
    import faiss

    return faiss.StandardGpuResources()


def _faiss_gpu_index(centroids: np.ndarray):
    """The centroids in a faiss flat L2 index on torch's current CUDA device, stored in float32 and searched by
    faiss's own kernels (not cuVS, whose arithmetic the error bound does not cover). faiss's cuBLAS handle keeps
    full float32 products (no TF32: StandardGpuResources only disallows reduced-precision reductions), so the
    bound of :func:`float32_error_bound` holds for its distances."""
    import faiss
    import torch

    device = torch.cuda.current_device()
    options = faiss.GpuClonerOptions()
    options.useFloat16 = False
    if hasattr(options, "use_cuvs"):
        options.use_cuvs = False
    index = faiss.index_cpu_to_gpu(_faiss_resources(device), device, faiss.IndexFlatL2(centroids.shape[1]), options)
    index.add(centroids)
    return index


def _faiss_top2(index, x: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
    """(float32 squared distances, int64 labels) of the ``kk`` nearest entries of ``index`` for each row of ``x``."""
    with _faiss_lock:
        d, idx = index.search(np.ascontiguousarray(x, dtype=np.float32), kk)
    return d, idx

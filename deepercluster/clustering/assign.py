"""Nearest-centroid assignment whose answer does not depend on how rows are batched, on threads, workers or device.

A float32 matrix product rounds differently with its blocking and kernels, so two runs that batch rows differently
(in memory vs streamed shard by shard, one worker vs four, CPU vs GPU) could disagree on near-ties, and k-means
would drift apart from there. Here a fast float32 search (a BLAS product on CPU, torch on CUDA) returns the two nearest
centroids of every row; a row whose two distances are closer than four times a rigorous bound of the float32 error
is re-decided in float64, row by row (ties -> lowest index). Either way the answer is argmin_j of the same float64
distance ``sum_k (x_k - c_jk)^2`` of the float32 inputs, whatever computed the candidates.
"""

from __future__ import annotations

import os

import numpy as np

from deepercluster.errors import ConfigError

U32 = 2.0**-24  # unit roundoff of float32
CANDIDATE_SLACK = 1e-9  # float64 distances this close to the minimum (x (|x| + |c|)^2) are re-checked row by row
DECIDE_BYTES = 32 << 20  # float64 distance block of the near-tie re-check
SCORE_BLOCK_BYTES = 16 << 20  # float32 score block (rows x k) of the search: few, large BLAS calls


def float32_error_bound(x_norms: np.ndarray, c_norm_max: float, dim: int) -> np.ndarray:
    """Bound on |computed - exact| squared L2 distance for any float32 evaluation (GEMM form
    ``|x|^2 + |c|^2 - 2 x.c`` or direct), any summation order: gamma_{d+4} (|x| + |c|)^2, with 10% slack."""
    n = dim + 4
    gamma = n * U32 / (1 - n * U32)
    return 1.1 * gamma * (x_norms.astype(np.float64) + c_norm_max) ** 2


def exact_sq_distances(x: np.ndarray, centroids: np.ndarray, labels: np.ndarray,
                       dtype: type = np.float64) -> np.ndarray:
    """``sum_k (x_ik - c_{label_i},k)^2`` in ``dtype``, summed in a fixed pairwise order (elementwise halving), so a
    row gets the same bits whatever its batch, its position or the memory alignment."""
    diff = x.astype(dtype)
    diff -= centroids[labels]
    diff *= diff
    return tree_sum_rows(diff)


def tree_sum_rows(a: np.ndarray) -> np.ndarray:
    """Row sums of ``a`` (overwritten) by repeated halving, columns zero-padded to a power of two: only elementwise
    additions, whose results never depend on vectorisation."""
    width = 1 << max(0, int(a.shape[1] - 1).bit_length())
    if width != a.shape[1]:
        a = np.concatenate([a, np.zeros((len(a), width - a.shape[1]), dtype=a.dtype)], axis=1)
    while width > 1:
        width //= 2
        a[:, :width] += a[:, width : 2 * width]
    return a[:, 0].copy()


def resolve_backend(device: str = "auto") -> str:
    """``cpu`` (numpy BLAS) or ``cuda`` (torch): ``auto`` takes CUDA only when an NVIDIA driver and torch see a GPU.
    torch is imported only then, so CPU clustering stays light (a streamed k-means must fit a memory budget)."""
    if device == "cpu":
        return "cpu"
    if device not in ("auto", "cuda"):
        raise ConfigError(f"unknown device {device!r}: use auto, cpu or cuda")
    if device == "auto" and not os.path.exists("/proc/driver/nvidia"):
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if device == "cuda":
        raise ConfigError("runtime.device is 'cuda' but no CUDA device is visible: use 'auto' or 'cpu'")
    return "cpu"


class NearestCentroid:
    """The centroids, ready to assign batches of rows to them (build one per Lloyd iteration)."""

    def __init__(self, centroids: np.ndarray, backend: str = "cpu"):
        self.centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        self.k, self.dim = self.centroids.shape
        self.backend = backend
        self.rechecked = 0  # rows re-decided in float64 so far
        self.c_norm_max = float(np.sqrt((self.centroids.astype(np.float64) ** 2).sum(1)).max())
        if backend == "cuda":
            self._torch = _torch_centroids(self.centroids)
        else:  # scores x.c - |c|^2/2: one float32 product, then the row of -|c|^2/2 added
            self._ct = np.ascontiguousarray(self.centroids.T)
            self._neg_half_sq = (-(self.centroids.astype(np.float64) ** 2).sum(1) / 2).astype(np.float32)
            self._rows = max(64, SCORE_BLOCK_BYTES // (4 * self.k))

    def _top2(self, x: np.ndarray, x_sq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Squared distances (float32) and indices of the two nearest centroids (one when k = 1)."""
        kk = min(2, self.k)
        if self.backend == "cuda":
            return _torch_top2(x, *self._torch, kk)
        dist, idx = np.empty((len(x), kk), dtype=np.float32), np.empty((len(x), kk), dtype=np.int64)
        scores = np.empty((min(self._rows, len(x)), self.k), dtype=np.float32)
        for lo in range(0, len(x), self._rows):
            xb = x[lo : lo + self._rows]
            s = scores[: len(xb)]
            np.matmul(xb, self._ct, out=s)  # BLAS sgemm, all cores
            s += self._neg_half_sq
            rows = np.arange(len(xb))
            for j in range(kk):
                best = s.argmax(1)
                idx[lo : lo + len(xb), j] = best
                dist[lo : lo + len(xb), j] = x_sq[lo : lo + len(xb)] - 2 * s[rows, best]
                if j + 1 < kk:
                    s[rows, best] = -np.inf
        return dist, idx

    def assign(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(labels int64, approximate float32 squared distances) of the rows of ``x`` (float32, C-contiguous)."""
        x_sq = np.einsum("ij,ij->i", x, x)
        dist, idx = self._top2(x, x_sq)
        labels = idx[:, 0].astype(np.int64)
        if self.k > 1:
            norms = np.sqrt(x_sq.astype(np.float64) * (1 + (self.dim + 2) * U32))  # bounds |x| above
            margin = 4 * float32_error_bound(norms, self.c_norm_max, self.dim)
            close = np.flatnonzero((dist[:, 1].astype(np.float64) - dist[:, 0]) <= margin)
            if len(close):
                labels[close] = self._decide(x[close])
                self.rechecked += len(close)
        return labels, np.maximum(dist[:, 0], 0)

    def _decide(self, x: np.ndarray) -> np.ndarray:
        """float64 decision for near-tie rows: candidates from a float64 product (error ~1e-13, far below the
        float32 margin), then the row-by-row distance of the candidates, lowest index among equals."""
        step = max(1, DECIDE_BYTES // (8 * self.k))
        c64 = self.centroids.astype(np.float64)
        return np.concatenate([self._decide_rows(x[lo : lo + step], c64) for lo in range(0, len(x), step)])

    def _decide_rows(self, x: np.ndarray, c64: np.ndarray) -> np.ndarray:
        x64 = x.astype(np.float64)
        d64 = (x64**2).sum(1)[:, None] + (c64**2).sum(1)[None, :] - 2 * x64 @ c64.T
        scale = (np.sqrt((x64**2).sum(1, keepdims=True)) + self.c_norm_max) ** 2
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


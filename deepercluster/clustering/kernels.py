"""Compiled (numba) loops of the CPU k-means: one pass where numpy needs several temporaries and passes.

Both kernels give exactly numpy's answer (the same float32 operations; sums of grid values are exact in float64, so
their order does not matter). They are compiled once per machine (cached on disk next to this file, or in numba's
user cache when that is read-only) and release the GIL, so the search threads run them in parallel."""

from __future__ import annotations

import numba
import numpy as np

LOWEST = np.float32(-3.0e38)  # below every score (scores are finite)


@numba.njit(nogil=True, cache=True, fastmath={"nnan", "nsz"})
def nearest_by_column(scores: np.ndarray, bias: np.ndarray, x_sq: np.ndarray, margin: float, best: np.ndarray,
                      dist: np.ndarray, near: np.ndarray) -> int:  # pragma: no cover - compiled
    """Nearest centroid of each row from its scores ``x.c_j`` laid out centroid-major, ``scores`` (k x m float32),
    with ``bias`` (k,) = -|c_j|^2/2 added (score s_j = x.c_j - |c_j|^2/2, so the nearest has the largest).

    Into ``best`` (m,): the index of the largest score (lowest index among equals); into ``dist`` (m,):
    max(``x_sq`` - 2 top, 0) in float32; into ``near[:count]``: the rows whose two largest scores differ by at most
    ``margin`` / 2 (twice the score gap is the float32 distance gap). Returns count. The inner loops run over
    contiguous rows, elementwise max/min/select: they compile to vector instructions."""
    k, m = scores.shape
    top = np.empty(m, np.float32)
    second = np.empty(m, np.float32)
    index = np.zeros(m, np.int32)
    b = bias[0]
    for i in range(m):
        top[i] = scores[0, i] + b
        second[i] = LOWEST
    for j in range(1, k):
        b = bias[j]
        for i in range(m):
            v = scores[j, i] + b
            a = top[i]
            second[i] = max(second[i], min(v, a))  # v > a: the old best becomes second; else v may
            index[i] = j if v > a else index[i]
            top[i] = max(a, v)
    two, zero = np.float32(2), np.float32(0)
    count = 0
    for i in range(m):
        best[i] = index[i]
        dist[i] = max(x_sq[i] - two * top[i], zero)
        if k > 1 and two * (top[i] - second[i]) <= margin:
            near[count] = i
            count += 1
    return count


@numba.njit(nogil=True, cache=True)
def signed_row_sums(x: np.ndarray, rows: np.ndarray, plus: np.ndarray, minus: np.ndarray,
                    out: np.ndarray) -> None:  # pragma: no cover - compiled
    """For each j: ``out[plus[j]] += x[rows[j]]`` and, where ``minus[j] >= 0``, ``out[minus[j]] -= x[rows[j]]``
    (``out`` float64, ``x`` float32)."""
    d = x.shape[1]
    for j in range(len(rows)):
        r, p, q = rows[j], plus[j], minus[j]
        for c in range(d):
            out[p, c] += x[r, c]
        if q >= 0:
            for c in range(d):
                out[q, c] -= x[r, c]


@numba.njit(nogil=True, cache=True)
def tree_sq_distances(x: np.ndarray, centroids: np.ndarray, labels: np.ndarray,
                      out: np.ndarray) -> None:  # pragma: no cover - compiled
    """``out[i] = sum_c (x[i, c] - centroids[labels[i], c])^2`` in ``out``'s dtype: each difference taken in that
    dtype, squared, then summed by repeated halving of the row zero-padded to a power of two (pairs (c, c + w)).
    A fixed order of plain additions (no fast-math: nothing reassociated or fused), so a row gets the same bits
    whatever its batch, position, thread or machine."""
    n, d = x.shape
    width = 1
    while width < d:
        width *= 2
    buf = np.zeros(width, out.dtype)
    for i in range(n):
        label = labels[i]
        for c in range(d):
            buf[c] = x[i, c]
            buf[c] = buf[c] - centroids[label, c]
            buf[c] = buf[c] * buf[c]
        for c in range(d, width):
            buf[c] = 0
        w = width
        while w > 1:
            w //= 2
            for c in range(w):
                buf[c] = buf[c] + buf[c + w]
        out[i] = buf[0]

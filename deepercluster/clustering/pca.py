"""PCA-whitening followed by L2-normalisation (DeepCluster's preprocessing of features before k-means)."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PCAWhitening:
    """``y = normalise(((x - mean) @ components.T) * scale)``; ``scale`` is 1/sqrt(eigenvalue) when whitening."""

    mean: np.ndarray  # (D,)
    components: np.ndarray  # (d, D), rows sorted by decreasing variance
    scale: np.ndarray  # (d,)

    @property
    def dim(self) -> int:
        return int(self.components.shape[0])

    def transform(self, x: np.ndarray) -> np.ndarray:
        y = (np.asarray(x, dtype=np.float64) - self.mean) @ self.components.T * self.scale
        return l2_normalise(y).astype(np.float32)

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, mean=self.mean, components=self.components, scale=self.scale)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> PCAWhitening:
        z = np.load(io.BytesIO(data))
        return cls(mean=z["mean"], components=z["components"], scale=z["scale"])


def l2_normalise(y: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    return y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), eps)


class Moments:
    """Exact first and second moments of rows seen block by block (float64 sums), for a streamed PCA fit.

    Rows are centred on a reference (the first row seen) before the products are summed, so the covariance does not
    lose precision when features have a large common offset."""

    def __init__(self, dim: int):
        self.n = 0
        self.ref: np.ndarray | None = None
        self.total = np.zeros(dim)
        self.outer = np.zeros((dim, dim))

    def add(self, x: np.ndarray) -> None:
        if len(x) == 0:
            return
        x = np.asarray(x, dtype=np.float64)
        if self.ref is None:
            self.ref = x[0].copy()
        y = x - self.ref
        self.n += len(y)
        self.total += y.sum(axis=0)
        self.outer += y.T @ y

    def merge(self, other: Moments) -> None:
        """Add another block's moments (re-centred on this one's reference: the sums stay those of every row)."""
        if other.n == 0 or other.ref is None:
            return
        if self.ref is None:
            self.n, self.ref, self.total, self.outer = other.n, other.ref.copy(), other.total.copy(), other.outer.copy()
            return
        delta = other.ref - self.ref  # rows of ``other`` are y' + delta relative to this reference
        self.outer += other.outer + np.outer(other.total, delta) + np.outer(delta, other.total) \
            + other.n * np.outer(delta, delta)
        self.total += other.total + other.n * delta
        self.n += other.n

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        ref = self.ref if self.ref is not None else np.zeros(len(self.total))
        np.savez(buf, n=self.n, has_ref=self.ref is not None, ref=ref, total=self.total, outer=self.outer)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Moments:
        z = np.load(io.BytesIO(data), allow_pickle=False)
        out = cls(len(z["total"]))
        out.n, out.total, out.outer = int(z["n"]), z["total"], z["outer"]
        out.ref = z["ref"] if bool(z["has_ref"]) else None
        return out

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and (biased) covariance of every row added."""
        if self.n == 0 or self.ref is None:
            raise ValueError("no rows were added")
        mu = self.total / self.n
        return self.ref + mu, self.outer / self.n - np.outer(mu, mu)


def fit_pca(sample: np.ndarray, dim: int, whiten: bool = True, eps: float = 1e-5) -> PCAWhitening:
    """Exact PCA of ``sample`` (float64 covariance + eigh); ``dim`` is capped at the feature width."""
    moments = Moments(np.asarray(sample).shape[1])
    moments.add(sample)
    return pca_from_moments(moments, dim, whiten=whiten, eps=eps)


def pca_from_moments(moments: Moments, dim: int, whiten: bool = True, eps: float = 1e-5) -> PCAWhitening:
    """PCA-whitening from the exact moments of a sample (see :class:`Moments`)."""
    mean, cov = moments.mean_cov()
    cov = (cov + cov.T) / 2
    eigval, eigvec = np.linalg.eigh(cov)
    order = np.argsort(eigval)[::-1][: min(dim, len(mean))]
    components = eigvec[:, order].T
    # a deterministic sign per component, so equal inputs give equal outputs whatever LAPACK does
    signs = np.sign(components[np.arange(len(order)), np.abs(components).argmax(axis=1)])
    components = components * signs[:, None]
    scale = 1.0 / np.sqrt(np.maximum(eigval[order], 0) + eps) if whiten else np.ones(len(order))
    return PCAWhitening(mean=mean, components=components, scale=scale)

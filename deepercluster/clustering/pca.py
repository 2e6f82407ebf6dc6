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


def fit_pca(sample: np.ndarray, dim: int, whiten: bool = True, eps: float = 1e-5) -> PCAWhitening:
    """Exact PCA of ``sample`` (float64 covariance + eigh); ``dim`` is capped at the feature width."""
    x = np.asarray(sample, dtype=np.float64)
    mean = x.mean(axis=0)
    cov = np.cov(x - mean, rowvar=False, bias=True).reshape(x.shape[1], x.shape[1])
    eigval, eigvec = np.linalg.eigh(cov)
    order = np.argsort(eigval)[::-1][: min(dim, x.shape[1])]
    components = eigvec[:, order].T
    # a deterministic sign per component, so equal inputs give equal outputs whatever LAPACK does
    signs = np.sign(components[np.arange(len(order)), np.abs(components).argmax(axis=1)])
    components = components * signs[:, None]
    scale = 1.0 / np.sqrt(np.maximum(eigval[order], 0) + eps) if whiten else np.ones(len(order))
    return PCAWhitening(mean=mean, components=components, scale=scale)

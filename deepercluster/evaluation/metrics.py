"""Clustering agreement measures (thin, named wrappers so every stage reports the same thing)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score


def nmi(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised mutual information (arithmetic normalisation, as sklearn and the DeepCluster paper)."""
    return float(normalized_mutual_info_score(a, b))


def ari(a: np.ndarray, b: np.ndarray) -> float:
    return float(adjusted_rand_score(a, b))

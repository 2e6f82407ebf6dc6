"""Clustering agreement measures (thin, named wrappers so every stage reports the same thing)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from deepercluster.clustering.kmeans import kmeans


def nmi(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised mutual information (arithmetic normalisation, as sklearn and the DeepCluster paper)."""
    return float(normalized_mutual_info_score(a, b))


def ari(a: np.ndarray, b: np.ndarray) -> float:
    return float(adjusted_rand_score(a, b))


def kmeans_agreement(x: np.ndarray, labels: np.ndarray, niter: int, runs: int,
                     seed: np.random.SeedSequence) -> dict[str, float]:
    """NMI and ARI against ``labels`` of a k-means of ``x`` with k = the number of classes, averaged over ``runs``
    k-means started from independent seeds (``seed.spawn``), with the NMI's standard deviation over them.

    One k-means is a noisy measure: on Fashion-MNIST features its NMI moves by +-0.04 with the seed alone."""
    labels = np.asarray(labels)
    k = int(len(np.unique(labels)))
    nmis, aris = [], []
    for child in seed.spawn(runs):
        assign = kmeans(x, k, niter, child).assign
        nmis.append(nmi(assign, labels))
        aris.append(ari(assign, labels))
    return {"kmeans_nmi_labels": float(np.mean(nmis)), "kmeans_nmi_labels_std": float(np.std(nmis)),
            "kmeans_ari_labels": float(np.mean(aris)), "kmeans_runs": runs}

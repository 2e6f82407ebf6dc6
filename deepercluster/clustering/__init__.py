"""PCA-whitening, k-means with exact sums and deterministic empty-cluster repair, and the 2-level cluster stage."""

from deepercluster.clustering.kmeans import KMeansResult, kmeans
from deepercluster.clustering.pca import PCAWhitening, fit_pca

__all__ = ["KMeansResult", "PCAWhitening", "fit_pca", "kmeans"]

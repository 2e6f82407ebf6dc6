"""Measures of what the pipeline learns: NMI/ARI, cluster statistics, linear probe, kNN, the per-round history."""

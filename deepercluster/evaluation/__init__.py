"""Measures of what the pipeline learns: NMI/ARI, cluster statistics, the per-round history."""

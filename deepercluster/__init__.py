"""deepercluster: unsupervised image features by clustering (DeepCluster, RotNet, DeeperCluster, ClusterFit).

For notebooks, one call each (imported on first use, so ``import deepercluster`` stays light)::

    deepercluster.load_assignments(run, round)   # pandas DataFrame, one row per image
    deepercluster.load_features(run, round)      # zarr array N x D (as_dask=True: a dask array)
"""

from __future__ import annotations

from typing import Any

__all__ = ["load_assignments", "load_features"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from deepercluster import inspection

        return getattr(inspection, name)
    raise AttributeError(f"module 'deepercluster' has no attribute {name!r}")

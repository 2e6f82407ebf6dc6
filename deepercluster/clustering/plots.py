"""The cluster-size histogram of a round (PNG bytes), saved by the cluster stage next to ``stats.json``."""

from __future__ import annotations

import io

import numpy as np


def size_histogram(sizes: np.ndarray, title: str) -> bytes:
    """PNG: how many clusters have each size (log-spaced bins when sizes span more than a decade); empty clusters
    are counted in the title."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    sizes = np.asarray(sizes)
    nonempty = sizes[sizes > 0]
    fig = Figure(figsize=(6, 3.5), dpi=100, layout="constrained")
    ax = fig.subplots()
    if len(nonempty):
        lo, hi = int(nonempty.min()), int(nonempty.max())
        log = hi > 10 * lo
        bins = np.unique(np.geomspace(lo, hi + 1, 40).astype(int)) if log else min(40, hi - lo + 1)
        ax.hist(nonempty, bins=bins, color="tab:blue", edgecolor="white")
        if log:
            ax.set_xscale("log")
    ax.set(title=f"{title}: {len(nonempty)} non-empty, {len(sizes) - len(nonempty)} empty",
           xlabel="images per cluster", ylabel="clusters")
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()

"""Looking into a run between rounds: one-call loaders for notebooks, cluster sizes, the largest and smallest
clusters, a gallery PNG per sampled cluster (a grid of its images closest to the centroid) and a plot of the
per-round metrics.

Written into the run store (so a run on S3 keeps them too)::

    <run>/rounds/<r>/eval/gallery/cluster-<target>.png
    <run>/metrics.png

From a notebook::

    import deepercluster
    a = deepercluster.load_assignments("runs/my-run", 2)  # image_id, super, sub, target, distance, uri, label
    x = deepercluster.load_features("runs/my-run", 2)     # zarr array N x D float16 (as_dask=True: dask array)
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from deepercluster.paths import gallery_rel  # noqa: F401  (re-exported)
from deepercluster.store import RunStore

GALLERY_BACKGROUND = (128, 128, 128)
METRICS_PLOT = "metrics.png"
PLOTTED = {  # history column -> legend; all in [0, 1] (left panel)
    "nmi_labels": "NMI pseudo-labels vs labels",
    "ari_labels": "ARI pseudo-labels vs labels",
    "kmeans_nmi_labels": "NMI k-means(features) vs labels",
    "nmi_prev": "NMI vs previous round",
    "probe_acc": "linear probe accuracy",
    "knn_acc": "kNN accuracy",
    "knn_whitened_acc": "kNN accuracy (whitened features)",
}
LOSS_COLUMN = "train_loss"


def _store(run: str | os.PathLike[str] | RunStore) -> RunStore:
    return run if isinstance(run, RunStore) else RunStore(run)


# ---- notebook API -------------------------------------------------------------------------------------------------
def load_assignments(run: str | os.PathLike[str] | RunStore, round: int) -> pd.DataFrame:
    """Cluster assignments of a round, one row per image: ``image_id, super, sub, target, distance`` plus the
    image's ``uri`` and ``label`` (None when the source has no labels)."""
    from deepercluster.clustering.stage import load_assignments as _load
    from deepercluster.data.shard import load_manifest

    store = _store(run)
    a = _load(store, round)
    manifest = load_manifest(store)
    cols = [c for c in ("image_id", "uri", "label") if c in manifest.columns]
    return a.merge(manifest[cols], on="image_id", how="left")


def load_features(run: str | os.PathLike[str] | RunStore, round: int, as_dask: bool = False) -> Any:
    """Features of a round: the N x D float16 zarr array (row i = image_id i), or a dask array chunked by
    image shard with ``as_dask=True``. Nothing is read until you index or compute it."""
    from deepercluster.features import open_features

    array = open_features(_store(run), round)
    if not as_dask:
        return array
    import dask.array as da

    return da.from_zarr(array, chunks=array.shards or array.chunks)


# ---- cluster sizes ------------------------------------------------------------------------------------------------
def cluster_sizes(assignments: pd.DataFrame, n_targets: int | None = None) -> pd.DataFrame:
    """One row per target (``target, super, sub, size``), largest first; with ``n_targets`` the empty targets are
    included (size 0). When images have labels: ``top_label`` and ``purity`` (share of the top label)."""
    grouped = assignments.groupby("target")
    sizes = grouped.agg(super=("super", "first"), sub=("sub", "first"), size=("image_id", "size")).reset_index()
    if "label" in assignments.columns and assignments["label"].notna().any():
        counts = assignments.dropna(subset=["label"]).groupby(["target", "label"]).size().rename("n").reset_index()
        top = counts.sort_values(["target", "n", "label"], ascending=[True, False, True]).drop_duplicates("target")
        sizes = sizes.merge(top.rename(columns={"label": "top_label"}), on="target", how="left")
        sizes["purity"] = sizes["n"] / sizes["size"]
        sizes = sizes.drop(columns="n")
    if n_targets is not None:
        empty = sorted(set(range(n_targets)) - set(sizes["target"]))
        if empty:
            sizes = pd.concat([sizes, pd.DataFrame({"target": empty, "size": 0})], ignore_index=True)
    sizes["size"] = sizes["size"].astype(int)
    return sizes.sort_values(["size", "target"], ascending=[False, True], ignore_index=True)


def streamed_cluster_sizes(store: RunStore, r: int, n_targets: int | None = None) -> pd.DataFrame:
    """:func:`cluster_sizes` of round ``r`` read from the store without holding its assignments: they and the
    manifest's labels are streamed in step, row group by row group (memory: per target, not per image)."""
    from deepercluster.clustering.stage import assignments_rel
    from deepercluster.data.shard import MANIFEST
    from deepercluster.evaluation.contingency import NA, PairCounts, aligned_parts

    rel = assignments_rel(r)
    size = np.zeros(0, dtype=np.int64)
    sup, sub = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    labelled = PairCounts()
    sources = [(rel, "target"), (rel, "super"), (rel, "sub"), (MANIFEST, "label_id")]
    for target, s, c, label in aligned_parts(store, sources):
        top = int(target.max(initial=-1)) + 1
        if top > len(size):
            size, sup, sub = (np.concatenate([a, np.zeros(top - len(a), dtype=np.int64)]) for a in (size, sup, sub))
        size += np.bincount(target, minlength=len(size))
        sup[target], sub[target] = s, c
        known = label != NA
        labelled.add(target[known], label[known])
    present = np.flatnonzero(size)
    out = pd.DataFrame({"target": present, "super": sup[present], "sub": sub[present], "size": size[present]})
    if labelled.total:
        names = _label_names(store)
        a, b = labelled.codes >> 32, labelled.codes & 0xFFFFFFFF
        # the largest count of each target, ties to the smallest label id (the smallest name: ids follow names)
        order = np.lexsort((b, -labelled.counts, a))
        first = order[np.r_[True, a[order][1:] != a[order][:-1]]]
        top_of = pd.DataFrame({"target": a[first], "top_label": [names.get(int(i)) for i in b[first]],
                               "n": labelled.counts[first]})
        out = out.merge(top_of, on="target", how="left")
        out["purity"] = out["n"] / out["size"]
        out = out.drop(columns="n")
    if n_targets is not None:
        empty = sorted(set(range(n_targets)) - set(present.tolist()))
        if empty:
            out = pd.concat([out, pd.DataFrame({"target": empty, "size": 0})], ignore_index=True)
    out["size"] = out["size"].astype(int)
    return out.sort_values(["size", "target"], ascending=[False, True], ignore_index=True)


def _label_names(store: RunStore) -> dict[int, str]:
    """label_id -> label name, from one streamed pass over the manifest's two label columns."""
    from deepercluster.data.shard import MANIFEST

    names: dict[int, str] = {}
    for part in store.iter_parquet(MANIFEST, columns=["label", "label_id"]):
        pairs = part.dropna().drop_duplicates()
        names.update(zip(pairs["label_id"].astype(int), pairs["label"], strict=True))
    return names


def closest_members(store: RunStore, r: int, targets: list[int], per_cluster: int) -> pd.DataFrame:
    """The ``per_cluster`` images of each of ``targets`` closest to its centroid (``image_id, target, distance,
    uri``), streaming the assignments: only those candidates are held, then their URIs are looked up."""
    from deepercluster.clustering.stage import assignments_rel
    from deepercluster.data.shard import MANIFEST
    from deepercluster.evaluation.sample import rows_at

    best = pd.DataFrame({"image_id": [], "target": [], "distance": []})
    wanted = np.asarray(targets, dtype=np.int64)
    for part in store.iter_parquet(assignments_rel(r), columns=["image_id", "target", "distance"]):
        part = part[np.isin(part["target"].to_numpy(), wanted)]
        if len(part):
            best = pd.concat([best, part], ignore_index=True).sort_values(["target", "distance", "image_id"])
            best = best.groupby("target", sort=False).head(per_cluster)
    best = best.astype({"image_id": np.int64, "target": np.int64}).sort_values("image_id", ignore_index=True)
    best["uri"] = rows_at(store, MANIFEST, best["image_id"].to_numpy(), ["uri"])["uri"].tolist() if len(best) else []
    return best


def top_and_bottom(sizes: pd.DataFrame, n: int = 5) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The ``n`` largest clusters, and the ``n`` smallest non-empty ones (smallest first)."""
    non_empty = sizes[sizes["size"] > 0]
    return non_empty.head(n), non_empty.tail(n).iloc[::-1]


def sample_clusters(sizes: pd.DataFrame, n: int) -> list[int]:
    """``n`` non-empty targets spread evenly over the size ranking: the largest, the smallest and those between."""
    ranked = sizes[sizes["size"] > 0]["target"].tolist()
    if n >= len(ranked):
        return ranked
    if n <= 1:
        return ranked[:n]
    return [ranked[round(i * (len(ranked) - 1) / (n - 1))] for i in range(n)]


# ---- galleries ----------------------------------------------------------------------------------------------------
def gallery_grid(n: int, columns: int) -> tuple[int, int]:
    """(columns, rows) of a gallery of ``n`` tiles."""
    cols = max(1, min(n, columns))
    return cols, max(1, math.ceil(n / cols))


def gallery_size(n: int, tile: int = 64, columns: int = 8, pad: int = 2) -> tuple[int, int]:
    """Pixel (width, height) of a gallery of ``n`` tiles."""
    cols, rows = gallery_grid(n, columns)
    return cols * (tile + pad) + pad, rows * (tile + pad) + pad


def make_gallery(images: list[Image.Image], tile: int = 64, columns: int = 8, pad: int = 2) -> Image.Image:
    """A grid of square tiles on a grey background, row by row: each image scaled to fit ``tile`` x ``tile``
    (nearest neighbour when enlarged, so small images stay sharp) and centred in its tile."""
    cols, _ = gallery_grid(len(images), columns)
    canvas = Image.new("RGB", gallery_size(len(images), tile, columns, pad), GALLERY_BACKGROUND)
    for i, img in enumerate(images):
        scale = tile / max(img.size)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        thumb = img.convert("RGB").resize(size, Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS)
        x = pad + (i % cols) * (tile + pad) + (tile - size[0]) // 2
        y = pad + (i // cols) * (tile + pad) + (tile - size[1]) // 2
        canvas.paste(thumb, (x, y))
    return canvas


def cluster_gallery(assignments: pd.DataFrame, target: int, per_cluster: int = 16, tile: int = 64,
                    columns: int = 8) -> Image.Image:
    """The ``per_cluster`` images of ``target`` closest to its centroid, as a gallery."""
    from deepercluster.data.images import decode, read_bytes

    rows = assignments[assignments["target"] == target].sort_values(["distance", "image_id"]).head(per_cluster)
    return make_gallery([decode(read_bytes(u)) for u in rows["uri"]], tile=tile, columns=columns)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def write_galleries(store: RunStore, r: int, targets: list[int], assignments: pd.DataFrame | None = None,
                    per_cluster: int = 16, tile: int = 64, columns: int = 8) -> dict[int, str]:
    """Write one gallery PNG per target into the store; returns target -> relative path."""
    a = load_assignments(store, r) if assignments is None else assignments
    out = {}
    for t in targets:
        store.write_bytes(gallery_rel(r, t), _png(cluster_gallery(a, t, per_cluster, tile, columns)))
        out[t] = gallery_rel(r, t)
    return out


# ---- metrics over rounds ------------------------------------------------------------------------------------------
def metrics_plot(history: pd.DataFrame) -> bytes:
    """PNG: the agreement metrics (NMI, ARI, probes: 0..1) per round on the left, the training loss on the right."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=100, layout="constrained")
    left, right = fig.subplots(1, 2)
    rounds = history["round"].to_numpy() if "round" in history else np.array([])
    for col, name in PLOTTED.items():
        if col in history and history[col].notna().any():
            left.plot(rounds, history[col].astype(float), marker="o", label=name)
    left.set(title="agreement per round", xlabel="round", ylim=(0, 1.02))
    if left.get_legend_handles_labels()[0]:
        left.legend(fontsize=8, loc="lower right")
    if LOSS_COLUMN in history and history[LOSS_COLUMN].notna().any():
        right.plot(rounds, history[LOSS_COLUMN].astype(float), marker="o", color="tab:red")
    else:
        right.text(0.5, 0.5, "no training finished yet", ha="center", va="center", transform=right.transAxes)
    right.set(title="training loss (last iteration)", xlabel="round")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        if len(rounds):
            ax.set_xticks(sorted({int(x) for x in rounds}))
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_metrics_plot(store: RunStore) -> str | None:
    """Write ``metrics.png`` from ``history.parquet``; None when no round was evaluated yet."""
    from deepercluster.evaluation.stage import load_history

    history = load_history(store)
    if not len(history):
        return None
    store.write_bytes(METRICS_PLOT, metrics_plot(history))
    return METRICS_PLOT


# ---- everything at once -------------------------------------------------------------------------------------------
@dataclass
class RoundInspection:
    round: int
    sizes: pd.DataFrame
    top: pd.DataFrame
    bottom: pd.DataFrame
    empty: int
    galleries: dict[int, str] = field(default_factory=dict)
    metrics_plot: str | None = None


def last_clustered_round(store: RunStore, rounds: int) -> int | None:
    """The latest round whose cluster stage is done."""
    done = [r for r in range(rounds) if store.stage_done("cluster", r)]
    return done[-1] if done else None


def inspect_round(store: RunStore, r: int, n_targets: int | None = None, galleries: int = 8, per_cluster: int = 16,
                  n_top: int = 5, tile: int = 64) -> RoundInspection:
    """Cluster sizes, top and bottom clusters and galleries of ``galleries`` sampled clusters of round ``r``, plus the
    metrics plot; the PNGs are written into the store. Memory does not grow with the number of images (it runs in
    the flow process after an evaluate stage): the assignments are streamed."""
    sizes = streamed_cluster_sizes(store, r, n_targets)
    top, bottom = top_and_bottom(sizes, n_top)
    targets = sample_clusters(sizes, galleries)
    written = write_galleries(store, r, targets, closest_members(store, r, targets, per_cluster), per_cluster, tile)
    return RoundInspection(r, sizes, top, bottom, int((sizes["size"] == 0).sum()), written, write_metrics_plot(store))

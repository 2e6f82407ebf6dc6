"""Looking at a round's features: shape, completion and norm statistics, and the nearest neighbours of an image
(cosine similarity, streamed shard by shard so that no process holds all features) drawn as a PNG grid."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from deepercluster.data.images import decode, read_bytes
from deepercluster.data.shard import MANIFEST
from deepercluster.errors import ConfigError
from deepercluster.features.array import features_attrs, features_rel, open_features
from deepercluster.features.stage import STAGE, unit_name
from deepercluster.store import RunStore


def _shard_ranges(store: RunStore) -> list[tuple[int, int, int]]:
    """``(shard, lo, hi)`` of every image shard, in order."""
    m = store.read_parquet(MANIFEST, columns=["image_id", "shard"])
    g = m.groupby("shard")["image_id"].agg(["min", "max"])
    return [(int(s), int(lo), int(hi) + 1) for s, (lo, hi) in g.iterrows()]


def feature_summary(store: RunStore, r: int) -> dict[str, Any]:
    """Shape, dtype, completed shards and L2-norm statistics of the completed shards' rows."""
    array = open_features(store, r)
    ranges = _shard_ranges(store)
    done = [(s, lo, hi) for s, lo, hi in ranges if store.is_done(STAGE, r, unit_name(s))]
    norms = [np.linalg.norm(array[lo:hi].astype(np.float32), axis=1) for _, lo, hi in done]
    n = np.concatenate(norms) if norms else np.zeros(0, dtype=np.float32)
    finite = n[np.isfinite(n)]
    return {
        "url": store.url(features_rel(r)),
        "shape": tuple(int(x) for x in array.shape),
        "dtype": str(array.dtype),
        "zarr_shard_rows": int(array.shards[0]) if array.shards else None,
        "shards_done": len(done),
        "shards": len(ranges),
        "stage_done": store.stage_done(STAGE, r),
        "layer": features_attrs(store, r).get("layer"),
        "rows_checked": int(n.size),
        "non_finite_rows": int(n.size - finite.size),
        "zero_rows": int((finite == 0).sum()),
        "norm_min": float(finite.min()) if finite.size else float("nan"),
        "norm_mean": float(finite.mean()) if finite.size else float("nan"),
        "norm_max": float(finite.max()) if finite.size else float("nan"),
        "norm_std": float(finite.std()) if finite.size else float("nan"),
    }


def nearest_neighbours(store: RunStore, r: int, image_id: int, k: int = 8) -> list[tuple[int, float]]:
    """The ``k`` images whose features are closest to ``image_id``'s (cosine similarity), best first; only the
    shards already extracted are searched."""
    array = open_features(store, r)
    if not 0 <= image_id < array.shape[0]:
        raise ConfigError(f"image {image_id} is outside this run's images 0..{array.shape[0] - 1}")
    q = array[image_id].astype(np.float32)
    if not np.isfinite(q).all() or not np.any(q):
        raise ConfigError(f"image {image_id} has no features yet (its shard is not extracted, or they are not finite)")
    q /= np.linalg.norm(q)
    best_ids, best_sims = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    for s, lo, hi in _shard_ranges(store):
        if not store.is_done(STAGE, r, unit_name(s)):
            continue
        x = array[lo:hi].astype(np.float32)
        sims = (x @ q) / np.maximum(np.linalg.norm(x, axis=1), 1e-12)
        sims[~np.isfinite(sims)] = -np.inf
        ids = np.arange(lo, hi)
        keep = ids != image_id
        best_ids = np.concatenate([best_ids, ids[keep]])
        best_sims = np.concatenate([best_sims, sims[keep]])
        order = np.argsort(-best_sims, kind="stable")[:k]
        best_ids, best_sims = best_ids[order], best_sims[order]
    return [(int(i), float(v)) for i, v in zip(best_ids, best_sims, strict=True)]


def neighbour_grid(store: RunStore, query: int, neighbours: list[tuple[int, float]], thumb: int = 96) -> bytes:
    """A one-row PNG: the query (red frame) then its neighbours, each captioned with its similarity and label."""
    m = store.read_parquet(MANIFEST)
    uri = dict(zip(m["image_id"], m["uri"], strict=True))
    label = dict(zip(m["image_id"], m["label"], strict=True)) if "label" in m else {}
    cells = [(query, "query")] + [(i, f"{sim:.3f}") for i, sim in neighbours]
    caption = 14
    grid = Image.new("RGB", (len(cells) * (thumb + 4) + 4, thumb + caption + 8), "white")
    draw = ImageDraw.Draw(grid)
    for j, (i, text) in enumerate(cells):
        img = ImageOps.pad(decode(read_bytes(uri[i])), (thumb, thumb), color="white")
        x = 4 + j * (thumb + 4)
        if j == 0:
            draw.rectangle([x - 3, 1, x + thumb + 2, thumb + 6], outline="red", width=3)
        grid.paste(img, (x, 4))
        name = label.get(i)
        draw.text((x, thumb + 6), f"#{i} {text}" + (f" {name}" if isinstance(name, str) else ""), fill="black")
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    return buf.getvalue()

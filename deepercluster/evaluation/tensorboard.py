"""TensorBoard event files of a run, under ``<run>/tb/`` (``tensorboard --logdir RUN/tb``):

    tb/run/     every history metric per round (``round/<metric>``, step = round) and stage times
    tb/r<r>/    round r: training loss and accuracies per step (``train/*``), the cluster-size histogram, galleries
                of sampled clusters (images), and an embedding-projector export of a seeded sample of the round's
                features with their cluster id and label as metadata and image thumbnails as the sprite

Written by the evaluate stage's last step (a unit like any other). A remote run store gets the files written
locally first, then copied into it.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from deepercluster.config import PipelineConfig
from deepercluster.paths import HISTORY, assignments_rel, log_rel
from deepercluster.store import RunStore

TB = "tb"
THUMB = 32  # sprite thumbnails (pixels)
GALLERIES = 4


def _writer(logdir: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(logdir), flush_secs=5)


def write_round(store: RunStore, cfg: PipelineConfig, r: int) -> dict[str, int]:
    """Round ``r``'s event files (and the run's per-round metrics so far); returns what was written."""
    local = Path(store.path(TB)) if store.is_local else Path(tempfile.mkdtemp(prefix="deepercluster-tb-"))
    try:
        counts = _write(store, cfg, r, local)
        if not store.is_local:
            for path in local.rglob("*"):
                if path.is_file():
                    store.write_bytes(f"{TB}/{path.relative_to(local).as_posix()}", path.read_bytes())
    finally:
        if not store.is_local:
            shutil.rmtree(local, ignore_errors=True)
    return counts


def _write(store: RunStore, cfg: PipelineConfig, r: int, root: Path) -> dict[str, int]:
    counts = {"metrics": 0, "steps": 0, "embedding": 0, "galleries": 0}
    round_dir = root / f"r{r}"
    if round_dir.exists():  # a recomputed round: its old events would mix with the new ones
        shutil.rmtree(round_dir)
    with _writer(root / "run") as w:
        if store.exists(HISTORY):
            history = store.read_parquet(HISTORY)
            row = history[history["round"] == r]
            for column, value in (row.iloc[0].items() if len(row) else ()):
                if column != "round" and isinstance(value, int | float) and math.isfinite(value):
                    w.add_scalar(f"round/{column}", float(value), global_step=r)
                    counts["metrics"] += 1
    with _writer(round_dir) as w:
        if store.exists(log_rel(r)):
            rows = [row for row in store.read_text(log_rel(r)).splitlines() if row.strip()]
            for row in map(json.loads, rows):
                for key in ("loss", "acc_super", "acc_sub", "images_per_s"):
                    if key in row:
                        w.add_scalar(f"train/{key}", row[key], global_step=row["step"], walltime=row.get("time"))
                counts["steps"] += 1
        if store.exists(assignments_rel(r)):
            sizes = np.zeros(cfg.cluster.n_targets, dtype=np.int64)
            for part in store.iter_parquet(assignments_rel(r), columns=["target"]):  # a row group at a time
                part_sizes = np.bincount(part["target"].to_numpy(), minlength=len(sizes))
                sizes = np.pad(sizes, (0, len(part_sizes) - len(sizes)))
                sizes += part_sizes
            w.add_histogram("clusters/size", sizes, global_step=r)
            counts["galleries"] = _galleries(store, cfg, r, w)
        if cfg.eval.embedding_sample:
            counts["embedding"] = _embedding(store, cfg, r, w)
    return counts


def _galleries(store: RunStore, cfg: PipelineConfig, r: int, w) -> int:
    from deepercluster.inspection import inspect_round

    try:
        result = inspect_round(store, r, n_targets=cfg.cluster.n_targets, galleries=GALLERIES)
    except OSError:  # images no longer readable here: the rest is still written
        return 0
    from PIL import Image

    for target, rel in result.galleries.items():
        img = np.asarray(Image.open(io.BytesIO(store.read_bytes(rel))).convert("RGB"))
        w.add_image(f"galleries/cluster-{target:05d}", img, global_step=r, dataformats="HWC")
    return len(result.galleries)


def _embedding(store: RunStore, cfg: PipelineConfig, r: int, w) -> int:
    """A seeded sample of ``eval.embedding_sample`` rows of the round's features, their cluster and label, and a
    thumbnail of each image, for the embedding projector."""
    from deepercluster.data.images import decode, read_bytes
    from deepercluster.evaluation.sample import rows_at
    from deepercluster.features import open_features
    from deepercluster.paths import MANIFEST

    features = open_features(store, r)
    n = int(features.shape[0])
    rng = np.random.default_rng([cfg.seed, r, 7])
    ids = np.sort(rng.choice(n, size=min(cfg.eval.embedding_sample, n), replace=False))
    mat = np.asarray(features.get_orthogonal_selection((ids, slice(None))), dtype=np.float32)
    manifest = rows_at(store, MANIFEST, ids, ["uri", "label"])  # streamed: only the sampled rows are kept
    if store.exists(assignments_rel(r)):
        target = rows_at(store, assignments_rel(r), ids, ["target"])["target"].to_numpy()
    else:
        target = np.full(len(ids), -1)
    labels = ["" if x is None or x != x else str(x) for x in manifest["label"]]
    metadata = [[str(t), lab] for t, lab in zip(target, labels, strict=True)]
    thumbs = np.stack([np.asarray(decode(read_bytes(u)).resize((THUMB, THUMB))) for u in manifest["uri"]])
    w.add_embedding(torch.from_numpy(mat), metadata=metadata, metadata_header=["cluster", "label"],
                    label_img=torch.from_numpy(thumbs).permute(0, 3, 1, 2).float() / 255, global_step=r,
                    tag=f"features-r{r}")
    return len(ids)

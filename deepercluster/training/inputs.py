"""What the train stage of round ``r`` reads: the round's model, the manifest and the cluster assignments."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deepercluster.config import PipelineConfig
from deepercluster.data.datasets import PseudoLabelled
from deepercluster.data.locations import CHECK_ROWS, ImageLocations, image_locations, manifest_images
from deepercluster.data.shard import MANIFEST
from deepercluster.data.transforms import N_ROTATIONS, TrainingView
from deepercluster.errors import StoreError
from deepercluster.features import model_rel
from deepercluster.local_cache import MappedArray, build_once, cache_path
from deepercluster.paths import assignments_rel  # noqa: F401  (re-exported)
from deepercluster.store import RunStore

UNSET = -1  # a target not assigned yet while the targets file is made


@dataclass(frozen=True)
class PseudoLabels:
    """Per image (row = ``image_id``): where it is read from and its flat target ``super * k + sub``.

    Nothing here holds a Python object per image: ``uris`` looks URIs up in a memory-mapped column and the targets
    are a memory-mapped int32 file (int64 only past 2**31 targets), both node-local (see
    :mod:`deepercluster.local_cache`). ``super_ids`` and ``sub_ids`` are computed from the targets when asked."""

    uris: ImageLocations
    target_file: MappedArray
    k: int

    @property
    def targets(self) -> np.ndarray:
        return self.target_file.array

    @property
    def super_ids(self) -> np.ndarray:
        return self.targets // self.k

    @property
    def sub_ids(self) -> np.ndarray:
        return self.targets % self.k

    def __len__(self) -> int:
        return len(self.uris)


def check_inputs(store: RunStore, r: int) -> None:
    """Raise a one-line StoreError naming the first missing input and the stage that makes it."""
    makers = {model_rel(r): "extract (round 0) or the previous round's train", MANIFEST: "shard",
              assignments_rel(r): "cluster"}
    for rel, maker in makers.items():
        if not store.exists(rel):
            raise StoreError(f"train round {r}: {store.url(rel)} is missing: run the {maker} stage first")


def target_dtype(m: int, k: int) -> type[np.signedinteger]:
    return np.int32 if m * k <= np.iinfo(np.int32).max else np.int64


def _write_targets(store: RunStore, r: int, n: int, m: int, k: int, path: Path) -> None:
    """The round's targets by image_id into a ``.npy`` at ``path``, streamed from the assignments row group by row
    group (blocks of ``CHECK_ROWS``), checking what the train stage relies on: every id in ``0..n-1`` exactly once
    (no id left unset after exactly ``n`` rows), super and sub ids within range."""
    where = f"train round {r}: {store.url(assignments_rel(r))}"
    cover = StoreError(f"{where} does not assign each of the {n} images exactly once: rerun the cluster stage")
    out = np.lib.format.open_memmap(path, mode="w+", dtype=target_dtype(m, k), shape=(n,))
    try:
        out[:] = UNSET
        rows = 0
        for table in store.iter_parquet_tables(assignments_rel(r), ["image_id", "super", "sub"]):
            for lo in range(0, table.num_rows, CHECK_ROWS):
                block = table.slice(lo, CHECK_ROWS)
                ids, sup, sub = (block.column(c).to_numpy() for c in ("image_id", "super", "sub"))
                rows += len(ids)
                if rows > n or ids.min() < 0 or ids.max() >= n:
                    raise cover
                if sup.min() < 0 or sup.max() >= m or sub.min() < 0 or sub.max() >= k:
                    raise StoreError(f"{where} has ids outside super 0..{m - 1} / sub 0..{k - 1}: rerun the cluster "
                                     "stage")
                out[ids] = sup * k + sub
        if rows != n or any((out[lo : lo + CHECK_ROWS] == UNSET).any() for lo in range(0, n, CHECK_ROWS)):
            raise cover
        out.flush()
    finally:
        del out


def load_pseudo_labels(store: RunStore, cfg: PipelineConfig, r: int) -> PseudoLabels:
    """The round's images and targets, checked to cover every image once with valid ids. The manifest, the packed
    index and the assignments are streamed row group by row group into node-local memory-mapped files (made once
    per node and version of those files: the checks run when they are made): the rank holds no per-image data."""
    n, m, k = manifest_images(store), cfg.cluster.super_clusters, cfg.cluster.k
    rel = assignments_rel(r)
    path = cache_path(store, rel, f"targets-r{r}", ".npy", n, m, k)
    build_once(path, lambda tmp: _write_targets(store, r, n, m, k, tmp))
    return PseudoLabels(image_locations(store, n), MappedArray(path), k)


def n_rotations(cfg: PipelineConfig) -> int:
    return N_ROTATIONS if cfg.train.rotations else 1


def training_dataset(labels: PseudoLabels, cfg: PipelineConfig, rotation: int | None = None) -> PseudoLabelled:
    """The round's training samples: each image through the random training view, turned by its sample's rotation
    (or by ``rotation``, a communication group's), with super-class ``super * rotations + rotation`` and its
    sub-cluster as targets."""
    view = TrainingView(cfg.data.image_size, cfg.train.crop_scale, cfg.train.hflip)
    return PseudoLabelled(labels.uris, labels.target_file, labels.k, view, n_rotations(cfg), rotation)

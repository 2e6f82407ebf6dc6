"""What the train stage of round ``r`` reads: the round's model, the manifest and the cluster assignments."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from deepercluster.config import PipelineConfig
from deepercluster.data.datasets import PseudoLabelled
from deepercluster.data.repack import image_uris
from deepercluster.data.shard import MANIFEST, load_manifest
from deepercluster.data.transforms import N_ROTATIONS, TrainingView
from deepercluster.errors import StoreError
from deepercluster.features import model_rel
from deepercluster.paths import assignments_rel  # noqa: F401  (re-exported)
from deepercluster.store import RunStore


@dataclass(frozen=True)
class PseudoLabels:
    """Per image (row = ``image_id``): its URI, super-cluster, sub-cluster and flat target ``super * k + sub``."""

    uris: list[str]
    super_ids: np.ndarray
    sub_ids: np.ndarray
    targets: np.ndarray

    def __len__(self) -> int:
        return len(self.uris)


def check_inputs(store: RunStore, r: int) -> None:
    """Raise a one-line StoreError naming the first missing input and the stage that makes it."""
    makers = {model_rel(r): "extract (round 0) or the previous round's train", MANIFEST: "shard",
              assignments_rel(r): "cluster"}
    for rel, maker in makers.items():
        if not store.exists(rel):
            raise StoreError(f"train round {r}: {store.url(rel)} is missing: run the {maker} stage first")


def load_pseudo_labels(store: RunStore, cfg: PipelineConfig, r: int) -> PseudoLabels:
    """Join the manifest with the round's assignments, checking they cover every image with valid ids."""
    manifest = load_manifest(store)[["image_id", "uri"]].sort_values("image_id")
    a = store.read_parquet(assignments_rel(r), columns=["image_id", "super", "sub"]).sort_values("image_id")
    n, m, k = len(manifest), cfg.cluster.super_clusters, cfg.cluster.k
    where = f"train round {r}: {store.url(assignments_rel(r))}"
    if not np.array_equal(manifest["image_id"].to_numpy(), np.arange(n)):
        raise StoreError(f"train round {r}: manifest image_ids are not 0..{n - 1}: rerun the shard stage")
    if len(a) != n or not np.array_equal(a["image_id"].to_numpy(), np.arange(n)):
        raise StoreError(f"{where} does not assign each of the {n} images exactly once: rerun the cluster stage")
    sup, sub = a["super"].to_numpy(np.int64, copy=True), a["sub"].to_numpy(np.int64, copy=True)
    if sup.min() < 0 or sup.max() >= m or sub.min() < 0 or sub.max() >= k:
        raise StoreError(f"{where} has ids outside super 0..{m - 1} / sub 0..{k - 1}: rerun the cluster stage")
    return PseudoLabels(image_uris(store, manifest), sup, sub, sup * k + sub)  # packed tar members, if any


def n_rotations(cfg: PipelineConfig) -> int:
    return N_ROTATIONS if cfg.train.rotations else 1


def training_dataset(labels: PseudoLabels, cfg: PipelineConfig, rotation: int | None = None) -> PseudoLabelled:
    """The round's training samples: each image through the random training view, turned by its sample's rotation
    (or by ``rotation``, a communication group's), with super-class ``super * rotations + rotation`` and its
    sub-cluster as targets."""
    view = TrainingView(cfg.data.image_size, cfg.train.crop_scale, cfg.train.hflip)
    return PseudoLabelled(labels.uris, labels.super_ids, labels.sub_ids, view, n_rotations(cfg), rotation)

"""The training targets and the heads' start, end to end through the stages' files: a sample's super-class is
(level-1 cluster of the unrotated image, the rotation actually applied to its pixels) and its sub-class the image's
level-2 cluster, both recomputed here from the cluster stage's whitened features and centroids alone; sub-heads
initialised from the clusters' means classify the clustering view as the new assignments do."""

from __future__ import annotations

import pickle
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import tiny_overrides
from PIL import Image

from deepercluster.clustering.means import load_cluster_means, means_rel
from deepercluster.clustering.stage import clusters_rel, load_round_features, whitened_features
from deepercluster.config import build_config
from deepercluster.data.images import decode, read_bytes
from deepercluster.data.parquet_stream import ParquetStream
from deepercluster.data.repack import image_uris
from deepercluster.data.shard import MANIFEST, load_manifest
from deepercluster.errors import StoreError
from deepercluster.local_cache import LOCAL_CACHE_ENV
from deepercluster.models import SubHeads
from deepercluster.paths import assignments_rel
from deepercluster.stages import run_stage
from deepercluster.store import RunStore
from deepercluster.training.errors import TrainError
from deepercluster.training.inputs import load_pseudo_labels, training_dataset
from deepercluster.training.sampler import uniform_epoch
from deepercluster.training.trainer import init_sub_heads


def nearest(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    d = ((x[:, None, :].astype(np.float64) - centroids[None].astype(np.float64)) ** 2).sum(-1)
    return d.argmin(1)


@pytest.fixture(scope="module")
def clustered(tmp_path_factory: pytest.TempPathFactory, digits_dir: Path):
    cfg = build_config(tiny_overrides(digits_dir, cluster={"super_clusters": 2, "k": 4}))
    store = RunStore(tmp_path_factory.mktemp("targets") / "run")
    run_stage(store, cfg, "shard")
    run_stage(store, cfg, "extract", 0)
    run_stage(store, cfg, "cluster", 0)
    return store, cfg


def expected_clusters(store: RunStore, cfg) -> tuple[np.ndarray, np.ndarray]:
    """Level 1 and level 2 of every image, from whitened.zarr and the centroid files only."""
    x = whitened_features(store, cfg, 0)
    sup = nearest(x, store.read_npy(clusters_rel(0, "level1_centroids.npy")))
    sub = np.empty(len(x), dtype=np.int64)
    for s in range(cfg.cluster.super_clusters):
        rows = np.flatnonzero(sup == s)
        sub[rows] = nearest(x[rows], store.read_npy(clusters_rel(0, f"sub-{s:04d}_centroids.npy")))
    return sup, sub


def rotation_of(sample: torch.Tensor, upright: torch.Tensor) -> int:
    """Which quarter turn (counter-clockwise) of ``upright`` the sample's pixels are."""
    turns = [r for r in range(4) if torch.equal(torch.rot90(upright, r, dims=(0, 1)), sample)]
    assert len(turns) == 1, f"the sample is {len(turns)} rotations of its upright view"
    return turns[0]


@pytest.mark.parametrize("group_rotation", [None, 3])
def test_super_class_is_rotation_and_level1_of_the_unrotated_image(clustered, group_rotation) -> None:
    store, cfg = clustered
    sup, sub = expected_clusters(store, cfg)
    labels = load_pseudo_labels(store, cfg, 0)
    assert np.array_equal(labels.super_ids, sup) and np.array_equal(labels.sub_ids, sub)
    assert len(np.unique(sup)) == 2 and len(np.unique(sub)) == 4  # both levels really split the images

    dataset = training_dataset(labels, cfg, group_rotation)
    rows, seeds = uniform_epoch(labels.targets, cfg.seed, 0, 0, size=160)
    turns = np.zeros(4, dtype=np.int64)
    for row, seed in zip(rows.tolist(), seeds.tolist(), strict=True):
        pixels, super_class, sub_class = dataset[(row, seed)]
        img: Image.Image = decode(read_bytes(labels.uris[row]))
        upright = dataset.view(img, seed=seed, rotation=0)
        rotation = rotation_of(pixels, upright) if not torch.equal(upright, upright.rot90(1, (0, 1))) else None
        if rotation is None:  # a view that all rotations leave unchanged says nothing about the rotation
            continue
        if group_rotation is not None:
            assert rotation == group_rotation
        turns[rotation] += 1
        assert super_class == sup[row] * 4 + rotation
        assert sub_class == sub[row]
    assert (turns > 0).sum() == (4 if group_rotation is None else 1), turns


def test_heads_start_as_the_nearest_mean_classifier_of_the_new_clusters(clustered) -> None:
    """``train.head_init: centroids``: the cluster stage's per-cluster means (streamed shard by shard) equal the
    in-memory means, and the initialised sub-heads' logits on the clustering view rank each image's sub-clusters by
    distance to their means: argmax = nearest mean for every image, and it agrees with the k-means assignment far
    above chance, where random heads are at chance."""
    store, cfg = clustered
    assert cfg.train.head_init == "centroids"
    labels = load_pseudo_labels(store, cfg, 0)
    h_np = np.maximum(load_round_features(store, 0), 0)
    h, sub_ids = torch.from_numpy(h_np), torch.from_numpy(labels.sub_ids)
    k, n_rot = cfg.cluster.k, 4
    for s in range(cfg.cluster.super_clusters):
        for j in range(k):
            members = h_np[(labels.super_ids == s) & (labels.sub_ids == j)]
            np.testing.assert_allclose(load_cluster_means(store, 0, s)[j], members.mean(0), rtol=1e-5, atol=1e-6)

    heads = SubHeads(h.shape[1], cfg.cluster.super_clusters * n_rot, k, seed=0)
    random_logits = heads(h, torch.from_numpy(labels.super_ids * n_rot)).detach()
    assert init_sub_heads(store, cfg, 0, heads) == cfg.cluster.super_clusters * n_rot * k
    for rotation in range(n_rot):
        logits = heads(h, torch.from_numpy(labels.super_ids * n_rot + rotation)).detach()
        means = torch.stack([torch.from_numpy(load_cluster_means(store, 0, s)) for s in range(2)])
        nearest_mean = ((h[:, None, :] - means[torch.from_numpy(labels.super_ids)]) ** 2).sum(-1).argmin(1)
        assert torch.equal(logits.argmax(1), nearest_mean)
        agree = float((logits.argmax(1) == sub_ids).float().mean())
        assert agree > 0.6, agree
    assert float((random_logits.argmax(1) == sub_ids).float().mean()) < 0.45


def test_random_head_init_writes_no_means(tmp_path: Path, digits_dir: Path) -> None:
    cfg = build_config(tiny_overrides(digits_dir, cluster={"super_clusters": 2, "k": 4}, train={"head_init": "random"}))
    store = RunStore(tmp_path / "run")
    run_stage(store, cfg, "shard")
    run_stage(store, cfg, "extract", 0)
    run_stage(store, cfg, "cluster", 0)
    assert not store.exists(means_rel(0, 0)) and "means_within" not in store.done_record("cluster", 0, "super-0000")
    # training these clusters with heads from means is a one-line error saying what to do
    centroids = build_config(tiny_overrides(digits_dir, cluster={"super_clusters": 2, "k": 4}))
    with pytest.raises(TrainError, match="no feature means .*rerun the cluster stage with --force") as err:
        init_sub_heads(store, centroids, 0, SubHeads(32, 8, 4))
    assert "\n" not in str(err.value)


# ---- the training inputs without a per-image Python object: streamed checks, node-local mapped lookups ----------
def synthetic_run(root: Path, n: int, m: int, k: int, seed: int = 0) -> tuple[RunStore, np.ndarray]:
    """A run with only what the train stage's inputs read: a manifest of ``n`` images in row groups of whole shards
    (as the shard stage writes it) and round 0's assignments (as the cluster stage writes them). Returns the
    targets."""
    store = RunStore(root)
    schema = pa.schema([("image_id", pa.int64()), ("uri", pa.string()), ("shard", pa.int64())])
    with ParquetStream(store, MANIFEST, schema, 1 << 16) as out:
        for lo in range(0, n, 1 << 16):
            ids = np.arange(lo, min(lo + (1 << 16), n))
            out.write(pa.table({"image_id": ids, "uri": [f"/images/{i % 97:02d}/{i:09d}.jpg" for i in ids.tolist()],
                                "shard": ids // 1000}, schema))
    rng = np.random.default_rng(seed)
    sup, sub = rng.integers(0, m, n), rng.integers(0, k, n)
    store.write_parquet(assignments_rel(0), {"image_id": np.arange(n), "super": sup, "sub": sub,
                                             "target": sup * k + sub})
    return store, sup * k + sub


def test_image_locations_are_exactly_the_uris_the_stage_read_before(clustered) -> None:
    store, cfg = clustered
    labels = load_pseudo_labels(store, cfg, 0)
    expected = image_uris(store, load_manifest(store))
    assert len(labels) == len(expected) and [labels.uris[i] for i in range(len(expected))] == expected
    assert list(labels.uris) == labels.uris.take(np.arange(len(expected))) == expected
    assert labels.targets.dtype == np.int32 and isinstance(labels.targets, np.memmap)  # mapped, not held
    assert pickle.loads(pickle.dumps(labels.uris))[len(expected) - 1] == expected[-1]


def test_the_training_dataset_pickles_small_whatever_the_number_of_images(tmp_path: Path, digits_dir: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """DataLoader workers receive the dataset pickled: paths, never the URIs or the targets of every image."""
    monkeypatch.setenv(LOCAL_CACHE_ENV, str(tmp_path / "cache"))
    cfg = build_config(tiny_overrides(digits_dir, cluster={"super_clusters": 4, "k": 50}))
    sizes = {}
    for n in (2_000, 200_000):
        store, targets = synthetic_run(tmp_path / f"run-{n}", n, 4, 50)
        labels = load_pseudo_labels(store, cfg, 0)
        dataset = training_dataset(labels, cfg)
        blob = pickle.dumps(dataset)
        sizes[n] = len(blob)
        assert labels.targets.dtype == np.int32 and np.array_equal(labels.targets, targets)
        copy = pickle.loads(blob)  # what a worker holds: the same lookups, mapped again
        assert copy.uris[n - 1] == f"/images/{(n - 1) % 97:02d}/{n - 1:09d}.jpg"
        assert [int(copy.targets[i]) for i in (0, n - 1)] == [int(targets[0]), int(targets[-1])]
    assert sizes[200_000] < 4096 and abs(sizes[200_000] - sizes[2_000]) < 64, sizes


def test_building_the_training_inputs_holds_a_few_bytes_per_image(tmp_path: Path, digits_dir: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """At 400k images the whole check-and-map pass (the node-local files made from scratch) peaks under 20 bytes
    of Python/numpy memory per image; a list of URIs alone is ~100."""
    monkeypatch.setenv(LOCAL_CACHE_ENV, str(tmp_path / "cache"))
    n = 400_000
    cfg = build_config(tiny_overrides(digits_dir, cluster={"super_clusters": 4, "k": 50}))
    store, targets = synthetic_run(tmp_path / "run", n, 4, 50)
    tracemalloc.start()
    try:
        labels = load_pseudo_labels(store, cfg, 0)
        first, last = labels.uris[0], labels.uris[n - 1]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (first, last) == ("/images/00/000000000.jpg", f"/images/{(n - 1) % 97:02d}/{n - 1:09d}.jpg")
    assert np.array_equal(labels.targets, targets)
    assert peak / n < 20, f"{peak / n:.1f} bytes per image"


@pytest.mark.parametrize("damage", ["missing", "twice", "sub out of range"])
def test_assignments_that_miss_an_image_or_go_out_of_range_are_one_line_errors(tmp_path: Path, digits_dir: Path,
                                                                               monkeypatch: pytest.MonkeyPatch,
                                                                               damage: str) -> None:
    monkeypatch.setenv(LOCAL_CACHE_ENV, str(tmp_path / "cache"))
    cfg = build_config(tiny_overrides(digits_dir, cluster={"super_clusters": 4, "k": 50}))
    store, _ = synthetic_run(tmp_path / "run", 1000, 4, 50)
    a = store.read_parquet(assignments_rel(0))
    if damage == "missing":
        a = a.drop(index=500)
    elif damage == "twice":
        a.loc[500, "image_id"] = 499
    else:
        a.loc[500, "sub"] = 50
    store.write_parquet(assignments_rel(0), a)
    with pytest.raises(StoreError, match="outside super" if damage == "sub out of range" else "exactly once") as err:
        load_pseudo_labels(store, cfg, 0)
    assert "\n" not in str(err.value)
    assert not [p for p in (tmp_path / "cache").iterdir() if p.suffix == ".npy"]  # nothing half-checked is kept

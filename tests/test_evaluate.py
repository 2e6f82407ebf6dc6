"""Evaluation: linear probe, kNN, probe splits, IDX / labelled-folder readers, and the evaluate stage on a real
(tiny) run of the digits."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import tiny_overrides

from deepercluster.clustering.kmeans import kmeans
from deepercluster.config import EvalConfig, build_config
from deepercluster.data.idx import benchmark_folder, labelled_folder, load_idx_folder, read_idx, write_image_folder
from deepercluster.errors import ConfigError, DataError
from deepercluster.evaluation.metrics import kmeans_agreement, nmi
from deepercluster.evaluation.pixels import pixel_features
from deepercluster.evaluation.probes import knn_accuracy, knn_predict, linear_probe
from deepercluster.evaluation.splits import probe_splits
from deepercluster.stages import run_stage


def blobs(n: int, dim: int, classes: int, seed: int, spread: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * 3
    y = rng.integers(0, classes, n)
    return (centres[y] + spread * rng.normal(size=(n, dim))).astype(np.float32), y


# ---- linear probe -------------------------------------------------------------------------------------------------
def test_linear_probe_separates_separable_features_and_is_at_chance_on_shuffled_labels():
    x, y = blobs(3000, 24, 6, seed=0)
    res = linear_probe(x[:1500], y[:1500], x[1500:], y[1500:], max_iter=100)
    assert res.test_acc >= 0.99 and res.train_acc >= 0.99

    shuffled = np.random.default_rng(1).permutation(y)
    res = linear_probe(x[:1500], shuffled[:1500], x[1500:], shuffled[1500:], max_iter=100)
    assert abs(res.test_acc - 1 / 6) < 0.05, res  # chance: 1/6 +- ~3 standard deviations


def test_linear_probe_needs_a_linear_boundary_not_a_nearest_neighbour():
    # two classes on concentric rings: a nearest-neighbour vote separates them, a linear classifier cannot
    rng = np.random.default_rng(2)
    angle = rng.uniform(0, 2 * np.pi, 2000)
    y = rng.integers(0, 2, 2000)
    radius = np.where(y == 1, 3.0, 1.0) + 0.05 * rng.normal(size=2000)
    x = np.stack([radius * np.cos(angle), radius * np.sin(angle), rng.normal(size=2000) * 0.01], 1)
    x = x.astype(np.float32) + np.array([0, 0, 5], dtype=np.float32)  # offset so cosine keeps the radius
    assert linear_probe(x[:1000], y[:1000], x[1000:], y[1000:]).test_acc < 0.75
    assert knn_accuracy(x[:1000], y[:1000], x[1000:], y[1000:], k=20) > 0.95


def test_linear_probe_is_deterministic_and_rejects_bad_input():
    x, y = blobs(400, 8, 3, seed=3, spread=3.0)
    a = linear_probe(x[:200], y[:200], x[200:], y[200:])
    assert a == linear_probe(x[:200], y[:200], x[200:], y[200:])
    bad = x.copy()
    bad[5, 2] = np.nan
    with pytest.raises(DataError, match="non-finite"):
        linear_probe(bad[:200], y[:200], x[200:], y[200:])
    with pytest.raises(DataError, match="must both hold images"):
        linear_probe(x[:0], y[:0], x, y)


# ---- kNN ----------------------------------------------------------------------------------------------------------
def brute_force_knn(train_x, train_y, test_x, k):
    a = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    b = test_x / np.linalg.norm(test_x, axis=1, keepdims=True)
    sim = b.astype(np.float64) @ a.T.astype(np.float64)
    nearest = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return np.array([np.bincount(train_y[row], minlength=train_y.max() + 1).argmax() for row in nearest])


def test_knn_matches_a_brute_force_reference():
    x, y = blobs(2500, 16, 7, seed=4, spread=4.0)  # overlapping classes: many mixed votes
    pred = knn_predict(x[:2000], y[:2000], x[2000:], k=20, batch=128)
    ref = brute_force_knn(x[:2000], y[:2000], x[2000:], 20)
    assert (pred == ref).mean() >= 0.998  # float32 vs float64 similarity may swap a borderline 20th neighbour
    assert 0.3 < (ref == y[2000:]).mean() < 0.99
    assert knn_accuracy(x[:2000], y[:2000], x[2000:], y[2000:], k=20) == pytest.approx((pred == y[2000:]).mean())
    # k larger than the train split: every train row votes
    assert (knn_predict(x[:5], y[:5], x[5:9], k=50) == np.bincount(y[:5]).argmax()).all()


# ---- splits -------------------------------------------------------------------------------------------------------
def test_kmeans_agreement_averages_independent_runs():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 50)
    centres = np.array([[0, 0], [1, 0], [0, 1], [1, 1]], dtype=np.float32)
    x = (centres[y] + rng.normal(0, 0.45, (200, 2))).astype(np.float32)  # overlapping: runs disagree
    m = kmeans_agreement(x, y, 10, 6, np.random.SeedSequence(1))
    singles = [nmi(kmeans(x, 4, 10, s).assign, y) for s in np.random.SeedSequence(1).spawn(6)]
    assert m["kmeans_runs"] == 6
    assert m["kmeans_nmi_labels"] == pytest.approx(np.mean(singles)) and 0 < m["kmeans_nmi_labels"] < 1
    assert m["kmeans_nmi_labels_std"] == pytest.approx(np.std(singles)) and m["kmeans_nmi_labels_std"] > 0
    clean = kmeans_agreement(centres[y] + 0.01 * x, y, 10, 3, np.random.SeedSequence(2))
    assert clean["kmeans_nmi_labels"] > m["kmeans_nmi_labels"] + 0.2 and clean["kmeans_ari_labels"] > 0.8


def test_probe_splits_are_deterministic_disjoint_and_only_labelled():
    ids = np.arange(1000)
    labels = pd.Series(np.where(ids % 10 == 0, None, ids % 3), dtype="Int64")  # every 10th image unlabelled
    a = probe_splits(ids, labels, EvalConfig(probe_train=0.5, probe_test=300))
    assert len(a.train) == 450 and len(a.test) == 300
    assert not set(a.train) & set(a.test)
    assert not {i for i in (*a.train, *a.test) if i % 10 == 0}
    b = probe_splits(ids, labels, EvalConfig(probe_train=0.5, probe_test=300))
    assert np.array_equal(a.train, b.train) and np.array_equal(a.test, b.test)
    c = probe_splits(ids, labels, EvalConfig(probe_train=0.5, probe_test=300, split_seed=1))
    assert not np.array_equal(a.train, c.train)
    with pytest.raises(ConfigError, match="exceed the 900 labelled images"):
        probe_splits(ids, labels, EvalConfig(probe_train=800, probe_test=200))
    with pytest.raises(ConfigError, match="eval.probe_test"):
        build_config({"eval": {"probe_test": 1.0}})


# ---- IDX and labelled folders --------------------------------------------------------------------------------------
def write_idx(path: Path, a: np.ndarray, code: int) -> None:
    header = bytes([0, 0, code, a.ndim]) + np.array(a.shape, dtype=">u4").tobytes()
    data = header + a.astype(a.dtype.newbyteorder(">")).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def test_idx_reader_round_trip_and_errors(tmp_path: Path):
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (12, 5, 4), dtype=np.uint8)
    test = rng.integers(0, 256, (3, 5, 4), dtype=np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", train, 0x08)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(12, dtype=np.uint8) % 3, 0x08)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", test, 0x08)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([2, 1, 0], dtype=np.uint8), 0x08)
    floats = rng.normal(size=(4, 2)).astype(np.float32)
    write_idx(tmp_path / "f.idx", floats, 0x0D)
    assert np.array_equal(read_idx(tmp_path / "f.idx"), floats)

    x, y = load_idx_folder(tmp_path)
    assert np.array_equal(x, np.concatenate([train, test])) and y.tolist() == [*(np.arange(12) % 3), 2, 1, 0]

    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes((tmp_path / "t10k-images-idx3-ubyte").read_bytes()[:-5])
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "short")

    folder = benchmark_folder(tmp_path, tmp_path / "cache")  # IDX -> <class>/<index>.png, once
    paths, labels, classes = labelled_folder(folder)
    assert classes == ["00", "01", "02"] and len(paths) == 15
    assert sorted(labels.tolist()) == sorted(y.tolist())
    first = next(p for p in paths if p.endswith("/00.png"))
    pixels = pixel_features([first], 5)  # resized to 5 x 5 (bilinear), one channel: the image is grey
    assert pixels.shape == (1, 25) and 0 <= pixels.min() <= pixels.max() <= 1
    assert pixel_features([first], 4).shape == (1, 16)
    assert benchmark_folder(folder, tmp_path / "cache") == folder  # a labelled folder is taken as it is
    with pytest.raises(DataError, match="neither IDX files nor class sub-folders"):
        benchmark_folder(tmp_path / "cache", tmp_path / "cache2")


def test_write_image_folder_keeps_the_images(tmp_path: Path):
    from PIL import Image

    images = np.random.default_rng(5).integers(0, 256, (6, 7, 7), dtype=np.uint8)
    dest = write_image_folder(images, np.array([0, 1, 1, 0, 2, 2]), tmp_path / "out", ("a", "b", "c"))
    assert np.array_equal(np.asarray(Image.open(dest / "01-b" / "2.png")), images[2])
    assert write_image_folder(images[:1], np.array([0]), dest) == dest  # already complete: kept


# ---- the evaluate stage on a real tiny run -------------------------------------------------------------------------
@pytest.mark.slow
def test_evaluate_stage_records_probes_per_round(tmp_path: Path, digits_dir: Path):
    from deepercluster.evaluation.stage import evaluate_round, load_history
    from deepercluster.run import init_run
    from deepercluster.store import RunStore

    cfg = build_config(tiny_overrides(digits_dir, eval={"probe_train": 120, "probe_test": 0.4}))
    store = RunStore(tmp_path / "run")
    init_run(store, cfg)
    run_stage(store, cfg, "shard")
    run_stage(store, cfg, "extract", 0)
    run_stage(store, cfg, "cluster", 0)
    m = evaluate_round(store, cfg, 0)
    assert (m["probe_train_n"], m["probe_test_n"]) == (120, 96)
    # even a random network's features carry the digit classes well above chance (0.1)
    assert 0.3 < m["probe_acc"] <= 1 and 0.3 < m["knn_acc"] <= 1 and 0 < m["kmeans_nmi_labels"] <= 1
    assert m["probe_dim"] == 32 and 0 <= m["nmi_labels"] <= 1
    # the whitened vote reads whitened.zarr's rows of the split images: recomputed here from those rows
    from deepercluster.clustering.stage import whitened_features
    from deepercluster.data.shard import load_manifest
    from deepercluster.evaluation.probes import knn_accuracy as knn
    from deepercluster.evaluation.splits import probe_splits

    manifest = load_manifest(store)
    s = probe_splits(manifest["image_id"].to_numpy(), manifest["label_id"], cfg.eval)
    w, y = whitened_features(store, cfg, 0), manifest.set_index("image_id")["label_id"]
    expected = knn(w[s.train], y[s.train].to_numpy(int), w[s.test], y[s.test].to_numpy(int), cfg.eval.knn_k)
    assert m["knn_whitened_acc"] == expected and 0.3 < expected <= 1
    row = load_history(store).iloc[0]
    assert row["probe_acc"] == m["probe_acc"] and row["knn_acc"] == m["knn_acc"]
    assert store.read_json("rounds/0/eval/metrics.json")["probe_acc"] == m["probe_acc"]

    # another layer of the same model: a pooled conv layer, computed on the split images only
    cfg_layer = build_config(tiny_overrides(digits_dir, eval={"probe_train": 120, "probe_test": 0.4,
                                                              "layer": "trunk.12"}))
    m2 = evaluate_round(store, cfg_layer, 0)
    assert m2["probe_dim"] == 64 and 0.3 < m2["probe_acc"] <= 1
    assert load_history(store)["round"].tolist() == [0]  # replaced, not appended

"""Inspection between rounds: notebook loaders, cluster sizes, gallery PNGs, the metrics plot, `deepercluster
inspect` and the Prefect artifacts, on a real round 0 of the digits subset (shard, extract, cluster, evaluate)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import tiny_overrides
from PIL import Image
from typer.testing import CliRunner

import deepercluster
from deepercluster.config import PipelineConfig, build_config
from deepercluster.data.images import decode, read_bytes
from deepercluster.inspection import (
    GALLERY_BACKGROUND,
    METRICS_PLOT,
    closest_members,
    cluster_sizes,
    gallery_rel,
    gallery_size,
    sample_clusters,
    streamed_cluster_sizes,
    top_and_bottom,
    write_galleries,
    write_metrics_plot,
)
from deepercluster.run import init_run
from deepercluster.stages import run_stage
from deepercluster.store import RunStore


@pytest.fixture(scope="module")
def clustered_run(tmp_path_factory: pytest.TempPathFactory, digits_dir: Path) -> tuple[RunStore, PipelineConfig]:
    """Round 0 of a tiny run: 240 digits in 6 shards, 2 x 5 clusters, evaluated (no training needed)."""
    from deepercluster.evaluation.stage import evaluate_round

    cfg = build_config(tiny_overrides(digits_dir, rounds=1))
    store = RunStore(tmp_path_factory.mktemp("inspect") / "run")
    init_run(store, cfg)
    run_stage(store, cfg, "shard")
    run_stage(store, cfg, "extract", 0)
    run_stage(store, cfg, "cluster", 0)
    evaluate_round(store, cfg, 0)
    return store, cfg


def test_notebook_loaders(clustered_run):
    store, cfg = clustered_run
    a = deepercluster.load_assignments(store.uri, 0)
    assert isinstance(a, pd.DataFrame) and len(a) == 240
    assert {"image_id", "super", "sub", "target", "distance", "uri", "label"} <= set(a.columns)
    assert a["image_id"].tolist() == list(range(240))
    assert sorted(a["label"].unique()) == [str(d) for d in range(10)]
    assert all(Path(u).parent.name == lbl for u, lbl in zip(a["uri"], a["label"], strict=True))

    x = deepercluster.load_features(store.uri, 0)
    assert x.shape == (240, 32) and x.dtype == np.float16
    lazy = deepercluster.load_features(store.uri, 0, as_dask=True)
    assert lazy.chunks[0] == (40,) * 6  # one dask chunk per image shard
    np.testing.assert_array_equal(lazy[37:83].compute(), x[37:83])
    assert np.abs(np.asarray(x[:])).sum() > 0


def test_cluster_sizes_top_and_bottom(clustered_run):
    store, cfg = clustered_run
    a = deepercluster.load_assignments(store, 0)
    sizes = cluster_sizes(a, cfg.cluster.n_targets)
    assert len(sizes) == cfg.cluster.n_targets and sizes["size"].sum() == 240
    assert sizes["size"].is_monotonic_decreasing
    counts = a["target"].value_counts()
    assert all(sizes.set_index("target").loc[t, "size"] == n for t, n in counts.items())
    assert sizes["purity"].dropna().between(0, 1).all()
    biggest = sizes.iloc[0]["target"]
    purity = (a[a["target"] == biggest]["label"] == sizes.iloc[0]["top_label"]).mean()
    assert sizes.iloc[0]["purity"] == pytest.approx(purity)
    # what the flow process shows, streamed without holding the assignments: the same table
    pd.testing.assert_frame_equal(streamed_cluster_sizes(store, 0, cfg.cluster.n_targets), sizes, check_dtype=False)
    closest = closest_members(store, 0, [int(biggest)], 4)
    expected = a[a["target"] == biggest].sort_values(["distance", "image_id"]).head(4)
    assert sorted(closest["image_id"]) == sorted(expected["image_id"])
    assert closest.set_index("image_id").loc[expected["image_id"], "uri"].tolist() == expected["uri"].tolist()
    top, bottom = top_and_bottom(sizes, 3)
    assert top["size"].tolist() == sorted(counts, reverse=True)[:3]
    assert bottom["size"].tolist() == sorted(counts)[:3]
    picked = sample_clusters(sizes, 4)
    assert len(picked) == 4 and picked[0] == top.iloc[0]["target"] and picked[-1] == bottom.iloc[0]["target"]


def _tiles(img: Image.Image, n_cells: tuple[int, int], tile: int, pad: int) -> list[np.ndarray]:
    a = np.asarray(img)
    step = tile + pad
    return [a[pad + r * step: pad + r * step + tile, pad + c * step: pad + c * step + tile]
            for r in range(n_cells[1]) for c in range(n_cells[0])]


def test_gallery_png_has_one_tile_per_image(clustered_run):
    store, _ = clustered_run
    a = deepercluster.load_assignments(store, 0)
    target = int(a["target"].value_counts().index[0])  # the largest cluster: more images than the gallery holds
    written = write_galleries(store, 0, [target], a, per_cluster=10, tile=32, columns=4)
    assert written == {target: gallery_rel(0, target)}
    img = Image.open(io.BytesIO(store.read_bytes(gallery_rel(0, target))))
    assert img.format == "PNG" and img.mode == "RGB"
    assert img.size == gallery_size(10, tile=32, columns=4, pad=2) == (4 * 34 + 2, 3 * 34 + 2)

    tiles = _tiles(img, (4, 3), 32, 2)
    filled = [t for t in tiles if not (t == GALLERY_BACKGROUND).all()]
    assert len(filled) == 10 and all((t == GALLERY_BACKGROUND).all() for t in tiles[10:])
    # tile i is the cluster's i-th image closest to the centroid, 8x8 digits enlarged 4x
    closest = a[a["target"] == target].sort_values(["distance", "image_id"])["uri"].tolist()
    for i in (0, 9):
        expected = np.asarray(decode(read_bytes(closest[i])).resize((32, 32), Image.Resampling.NEAREST))
        np.testing.assert_array_equal(tiles[i], expected)


def test_metrics_plot(clustered_run):
    store, _ = clustered_run
    assert write_metrics_plot(store) == METRICS_PLOT
    img = Image.open(io.BytesIO(store.read_bytes(METRICS_PLOT)))
    assert img.format == "PNG" and img.size == (1000, 400)
    assert len(np.unique(np.asarray(img.convert("L")))) > 10  # drawn, not blank


def test_cli_inspect_default_view(clustered_run):
    from deepercluster.cli import app

    store, cfg = clustered_run
    store.remove("rounds/0/eval/gallery")
    result = CliRunner().invoke(app, ["inspect", store.uri, "--galleries", "3"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for text in ("per-round metrics", "round 0: largest clusters", "round 0: smallest clusters", "galleries (3)",
                 "metrics over rounds", "non-empty clusters of 10"):
        assert text in result.output, text
    assert len(store.listdir("rounds/0/eval/gallery")) == 3
    assert store.exists(METRICS_PLOT)


@pytest.mark.slow
def test_galleries_and_tables_as_prefect_artifacts(clustered_run, prefect_server):
    from prefect import flow
    from prefect.client.orchestration import get_client

    from tasks.publish import artifact_key, publish_inspection

    store, _ = clustered_run

    @flow(name="inspect-test")
    def inspect_flow() -> dict:
        return publish_inspection(store.uri, 0)

    result = inspect_flow()
    non_empty = deepercluster.load_assignments(store, 0)["target"].nunique()
    assert result == {"galleries": min(8, non_empty), "empty": 10 - non_empty}
    with get_client(sync_client=True) as client:
        latest = {a.key: a for a in client.read_latest_artifacts()}
    sizes = latest[artifact_key(store, "r0", "cluster-sizes")]
    galleries = latest[artifact_key(store, "r0", "galleries")]
    assert sizes.type == "table" and galleries.type == "markdown"
    rows = sizes.data if isinstance(sizes.data, list) else json.loads(sizes.data)
    assert {r["kind"] for r in rows} == {"largest", "smallest"}
    assert galleries.data.count("data:image/png;base64,") == 1 + len(store.listdir("rounds/0/eval/gallery"))

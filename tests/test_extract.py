from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_overrides
from PIL import Image

from deepercluster.config import build_config
from deepercluster.data.datasets import ImageList
from deepercluster.data.shard import load_manifest
from deepercluster.data.transforms import clustering_view
from deepercluster.errors import ConfigError, DataError
from deepercluster.features import ensure_round_model, extract_shards, open_features, prepare_features, shards_todo
from deepercluster.models import load_body
from deepercluster.stages import begin, get_stage, run_stage
from deepercluster.store import RunStore


def _prepare(store: RunStore, cfg, r: int = 0, force: bool = False) -> list[int]:
    """What the stage does before its shard units: the fingerprint check, the model and the array; returns the
    shards still to extract."""
    begin(store, cfg, get_stage("extract"), r, force=force)
    prepare_features(store, cfg, r)
    return shards_todo(store, r)


def _extract_one(store: RunStore, cfg, r: int, shard: int) -> int:
    return extract_shards(store, cfg, r, [shard])


def test_extract_writes_one_zarr_shard_per_image_shard(tmp_path: Path, digits_dir: Path):
    cfg = build_config(tiny_overrides(digits_dir))
    store = RunStore(tmp_path / "run")
    run_stage(store, cfg, "shard")
    info = run_stage(store, cfg, "extract", 0)
    manifest = load_manifest(store)
    array = open_features(store, 0)
    assert array.shape == (len(manifest), 32) and array.dtype == np.float16
    assert array.shards == (cfg.data.shard_size, 32)
    assert info["shards"] == manifest["shard"].nunique() == 6
    assert store.stage_done("extract", 0)

    # the stored rows are the model's features of the manifest's images, in manifest order
    body = load_body(cfg.model, store.load_torch("rounds/0/model.pt")["body"]).eval()
    images = ImageList(manifest["uri"].tolist()[45:50], clustering_view(cfg.data.image_size, cfg.data.crop_ratio))
    with torch.no_grad():
        expected = body(torch.stack([images[i] for i in range(5)])).numpy()
    np.testing.assert_allclose(array[45:50].astype(np.float32), expected, rtol=2e-3, atol=2e-3)


def test_extract_resumes_only_missing_shards(tmp_path: Path, digits_dir: Path):
    cfg = build_config(tiny_overrides(digits_dir))
    store = RunStore(tmp_path / "run")
    run_stage(store, cfg, "shard")
    todo = _prepare(store, cfg, 0)
    assert todo == [0, 1, 2, 3, 4, 5]
    for s in todo[:4]:
        _extract_one(store, cfg, 0, s)
    first = {u: store.done_record("extract", 0, u) for u in store.done_units("extract", 0)}
    assert _prepare(store, cfg, 0) == [4, 5]  # what a killed run leaves to do
    assert _extract_one(store, cfg, 0, 1) == 0  # a done shard is skipped
    run_stage(store, cfg, "extract", 0)
    after = {u: store.done_record("extract", 0, u) for u in first}
    assert after == first
    assert not np.all(open_features(store, 0)[200:] == 0)

    forced = _prepare(store, cfg, 0, force=True)
    assert forced == [0, 1, 2, 3, 4, 5] and not store.stage_done("extract", 0)


def test_a_shard_has_the_same_features_whichever_shards_share_its_stream(tmp_path: Path, digits_dir: Path):
    """A resumed run must give an uninterrupted run's features bit for bit: the forward pass's float rounding
    depends on a batch's composition, so no batch may mix two shards (40-image shards, 32-image batches here)."""
    from deepercluster.features.loader import batch_spans
    from deepercluster.features.stage import extract_shards

    assert batch_spans(100, 32, [40, 80]) == [(0, 32), (32, 40), (40, 72), (72, 80), (80, 100)]
    assert batch_spans(10, 4) == [(0, 4), (4, 8), (8, 10)]
    cfg = build_config(tiny_overrides(digits_dir))
    whole, resumed = RunStore(tmp_path / "whole"), RunStore(tmp_path / "resumed")
    for store in (whole, resumed):
        run_stage(store, cfg, "shard")
        _prepare(store, cfg, 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as on a 1-thread Dask worker: there the rounding differs with the batch (tested)
    try:
        extract_shards(whole, cfg, 0, [0, 1, 2, 3, 4, 5])
        extract_shards(resumed, cfg, 0, [0])  # then killed: the rerun streams shards 1..5
        extract_shards(resumed, cfg, 0, [0, 1, 2, 3, 4, 5])
    finally:
        torch.set_num_threads(threads)
    a, b = open_features(whole, 0)[:], open_features(resumed, 0)[:]
    assert not np.all(a == 0) and np.array_equal(a.view(np.uint16), b.view(np.uint16))


def test_round_zero_model_is_seeded(tmp_path: Path, digits_dir: Path):
    a, b = RunStore(tmp_path / "a"), RunStore(tmp_path / "b")
    cfg = build_config(tiny_overrides(digits_dir))
    run_stage(a, cfg, "shard")  # the random init's batch norms are calibrated on the run's images
    run_stage(b, cfg, "shard")
    ensure_round_model(a, cfg, 0)
    ensure_round_model(b, cfg, 0)
    sa, sb = a.load_torch("rounds/0/model.pt")["body"], b.load_torch("rounds/0/model.pt")["body"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_threaded_loader_matches_the_clustering_view(tmp_path: Path, digits_dir: Path):
    from deepercluster.features.loader import BatchLoader, HostView

    uris = sorted(str(p) for p in digits_dir.rglob("*.png"))[:23]
    for i, size in enumerate([(50, 37), (29, 61), (8, 8), (21, 20)]):  # landscape, portrait, runs of sizes
        Image.open(uris[i]).convert("RGB").resize(size).save(tmp_path / f"{i}.png")
        uris[3 * i + 1] = str(tmp_path / f"{i}.png")
    view = clustering_view(20, 0.8)
    expected = torch.stack([view(Image.open(u).convert("RGB")) for u in uris])
    loader = BatchLoader(uris, HostView(20, 0.8), batch_size=5, threads=3, prefetch=2)
    batches = list(loader)
    assert [lo for lo, _ in batches] == [0, 5, 10, 15, 20] and len(loader) == 5
    got = torch.cat([b for _, b in batches])
    assert got.shape == expected.shape and got.is_contiguous()
    # the same PIL resize + crop per image (bit for bit); normalising differs only in float rounding
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)

    overlapped = BatchLoader(uris, HostView(20, 0.8), batch_size=5, threads=3, prefetch=2, overlap=True)
    torch.testing.assert_close(torch.cat([b for _, b in overlapped]), got, rtol=0, atol=0)  # both schedules agree
    raw = torch.cat([b for _, b in BatchLoader(uris, HostView(20, 0.8), 8, on_device_normalise=True)])
    assert raw.dtype == torch.uint8 and raw.shape == (23, 20, 20, 3)  # the device normalises these


def test_layer_is_configurable_and_checked(tmp_path: Path, digits_dir: Path):
    cfg = build_config(tiny_overrides(digits_dir, extract={"layer": "trunk.12"}))  # smallnet's 3rd conv block
    store = RunStore(tmp_path / "run")
    run_stage(store, cfg, "shard")
    run_stage(store, cfg, "extract", 0)
    array = open_features(store, 0)
    assert array.shape == (240, 64)

    body = load_body(cfg.model, store.load_torch("rounds/0/model.pt")["body"]).eval()
    images = ImageList(load_manifest(store)["uri"].tolist()[:6],
                       clustering_view(cfg.data.image_size, cfg.data.crop_ratio))
    with torch.no_grad():
        maps = body.trunk[:13](torch.stack([images[i] for i in range(6)]))
    np.testing.assert_allclose(array[:6].astype(np.float32), maps.mean(dim=(2, 3)).numpy(), rtol=4e-3, atol=4e-3)

    bad = build_config(tiny_overrides(digits_dir, extract={"layer": "trunk.fc7"}))
    with pytest.raises(ConfigError, match=r"extract.layer 'trunk.fc7' is not a layer .* trunk.0, trunk.1"):
        _prepare(RunStore(tmp_path / "run"), bad, 0, force=True)


def test_unreadable_image_is_a_one_line_error_and_writes_nothing(tmp_path: Path, digits_dir: Path):
    import shutil

    src = tmp_path / "images"
    shutil.copytree(digits_dir, src)
    cfg = build_config(tiny_overrides(src))
    store = RunStore(tmp_path / "run")
    run_stage(store, cfg, "shard")
    assert _prepare(store, cfg, 0) == [0, 1, 2, 3, 4, 5]
    victim = load_manifest(store)["uri"].iloc[50]
    Path(victim).write_bytes(b"not a png any more")
    with pytest.raises(DataError) as err:
        _extract_one(store, cfg, 0, 1)
    assert victim in str(err.value) and "\n" not in str(err.value) and "--force" in str(err.value)
    assert not store.is_done("extract", 0, "shard-00001")
    assert np.isnan(open_features(store, 0)[40:80]).all()  # nothing written: the fill value, never features
    assert _extract_one(store, cfg, 0, 2) == 40  # other shards are unaffected


def test_fsspec_store_and_consolidated_metadata(digits_dir: Path):
    import zarr

    from deepercluster.features import features_group_rel

    cfg = build_config(tiny_overrides(digits_dir))
    store = RunStore("memory://extract-test/run")
    run_stage(store, cfg, "shard")
    info = run_stage(store, cfg, "extract", 0)
    assert info == {"images": 240, "dim": 32, "shards": 6}
    group = zarr.open_group(store.url(features_group_rel(0)), mode="r", use_consolidated=True)
    consolidated = group.metadata.consolidated_metadata
    assert consolidated is not None and "features" in consolidated.metadata
    assert group.attrs["complete"] is True and group.attrs["layer"] == "output"
    assert np.all(np.isfinite(open_features(store, 0)[:])) and np.any(open_features(store, 0)[200:])


def test_inspect_features_prints_statistics_and_draws_neighbours(tmp_path: Path, digits_dir: Path):
    from typer.testing import CliRunner

    from deepercluster.cli import app
    from deepercluster.features.inspect import feature_summary, nearest_neighbours
    from deepercluster.run import init_run

    cfg = build_config(tiny_overrides(digits_dir))
    store = RunStore(tmp_path / "run")
    init_run(store, cfg)
    run_stage(store, cfg, "shard")
    for s in _prepare(store, cfg, 0)[:4]:
        _extract_one(store, cfg, 0, s)
    summary = feature_summary(store, 0)
    assert summary["shape"] == (240, 32) and summary["shards_done"] == 4 and not summary["stage_done"]
    assert summary["rows_checked"] == 160 and summary["norm_min"] > 0

    nn = nearest_neighbours(store, 0, 7, k=5)
    x = open_features(store, 0)[:160].astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sims = x @ x[7]
    sims[7] = -np.inf
    assert [i for i, _ in nn] == np.argsort(-sims, kind="stable")[:5].tolist()

    png = tmp_path / "nn.png"
    out = CliRunner().invoke(app, ["inspect", str(store.uri), "--features", "--round", "0", "--image", "7",
                                   "--neighbours", "5", "--png", str(png)], env={"COLUMNS": "200"})
    assert out.exit_code == 0, out.output
    assert "shape=(240, 32)" in out.output and "shards 4/6 done" in out.output and "L2 norms of 160 rows" in out.output
    assert Image.open(png).size == (6 * 100 + 4, 96 + 14 + 8)

    missing = CliRunner().invoke(app, ["inspect", str(store.uri), "--features", "--image", "200"])
    assert missing.exit_code == 2 and "image 200 has no features yet" in missing.output


def test_an_init_checkpoint_with_code_or_truncated_is_a_one_line_error(tmp_path: Path):
    import os

    from deepercluster.features.model import load_weights

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo this must never run",))

    torch.save({"body": Evil()}, tmp_path / "evil.pt")
    torch.save({"body": {"w": torch.zeros(3)}}, tmp_path / "ok.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "ok.pt").read_bytes()[:40])
    assert torch.equal(load_weights(str(tmp_path / "ok.pt"), "model.init_checkpoint")["body"]["w"], torch.zeros(3))
    for name in ("evil.pt", "cut.pt"):
        with pytest.raises(ConfigError, match="model.init_checkpoint .* is not a weights-only checkpoint") as err:
            load_weights(str(tmp_path / name), "model.init_checkpoint")
        assert "\n" not in str(err.value)

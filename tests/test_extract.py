from pathlib import Path

import numpy as np
import torch
from conftest import tiny_overrides

from deepercluster.config import build_config
from deepercluster.data.datasets import ImageList
from deepercluster.data.shard import load_manifest, run_shard_stage
from deepercluster.data.transforms import clustering_view
from deepercluster.features import (
    ensure_round_model,
    extract_shard,
    open_features,
    prepare_extract,
    run_extract_stage,
)
from deepercluster.models import load_body
from deepercluster.store import RunStore


def test_extract_writes_one_zarr_shard_per_image_shard(tmp_path: Path, digits_dir: Path):
    cfg = build_config(tiny_overrides(digits_dir))
    store = RunStore(tmp_path / "run")
    run_shard_stage(store, cfg.data)
    info = run_extract_stage(store, cfg, 0)
    manifest = load_manifest(store)
    array = open_features(store, 0)
    assert array.shape == (len(manifest), 32) and array.dtype == np.float16
    assert array.shards == (cfg.data.shard_size, 32)
    assert info["shards"] == manifest["shard"].nunique() == 6
    assert store.stage_done("extract", 0)

    # the stored rows are the model's features of the manifest's images, in manifest order
    body = load_body(cfg.model, store.load_torch("rounds/0/model.pt")["body"]).eval()
    images = ImageList(manifest["uri"].tolist()[45:50], clustering_view(cfg.data.image_size))
    with torch.no_grad():
        expected = body(torch.stack([images[i] for i in range(5)])).numpy()
    np.testing.assert_allclose(array[45:50].astype(np.float32), expected, rtol=2e-3, atol=2e-3)


def test_extract_resumes_only_missing_shards(tmp_path: Path, digits_dir: Path):
    cfg = build_config(tiny_overrides(digits_dir))
    store = RunStore(tmp_path / "run")
    run_shard_stage(store, cfg.data)
    todo = prepare_extract(store, cfg, 0)
    assert todo == [0, 1, 2, 3, 4, 5]
    for s in todo[:4]:
        extract_shard(store, cfg, 0, s)
    first = {u: store.done_record("extract", 0, u) for u in store.done_units("extract", 0)}
    assert prepare_extract(store, cfg, 0) == [4, 5]  # what a killed run leaves to do
    assert extract_shard(store, cfg, 0, 1) == 0  # a done shard is skipped
    run_extract_stage(store, cfg, 0)
    after = {u: store.done_record("extract", 0, u) for u in first}
    assert after == first
    assert not np.all(open_features(store, 0)[200:] == 0)

    forced = prepare_extract(store, cfg, 0, force=True)
    assert forced == [0, 1, 2, 3, 4, 5] and not store.stage_done("extract", 0)


def test_round_zero_model_is_seeded(tmp_path: Path, digits_dir: Path):
    a, b = RunStore(tmp_path / "a"), RunStore(tmp_path / "b")
    cfg = build_config(tiny_overrides(digits_dir))
    ensure_round_model(a, cfg, 0)
    ensure_round_model(b, cfg, 0)
    sa, sb = a.load_torch("rounds/0/model.pt")["body"], b.load_torch("rounds/0/model.pt")["body"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)

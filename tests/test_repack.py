"""``data.repack``: the kept images of each shard copied into one webdataset tar, written atomically, and read from
there by the extract and train stages (the original files can then go)."""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

import numpy as np
from conftest import tiny_overrides
from PIL import Image

from deepercluster.config import build_config
from deepercluster.data.datasets import read_image_bytes
from deepercluster.data.images import read_bytes, read_many
from deepercluster.data.locations import image_locations
from deepercluster.data.repack import PACKED_INDEX, image_uris, packed_rel, packed_uris, unit_name
from deepercluster.data.shard import load_manifest
from deepercluster.features import open_features
from deepercluster.stages import run_stage
from deepercluster.store import RunStore


def _folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for i in range(21):
        sub = root / f"c{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8))
        img.save(sub / f"{i:03d}.png") if i % 2 else img.save(sub / f"{i:03d}.jpg", quality=90)
    (root / "c0" / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    return root


def test_repacked_shards_are_webdataset_tars_that_extract_and_train_read(tmp_path: Path):
    source = _folder(tmp_path / "images")
    overrides = tiny_overrides(source, data={"shard_size": 8, "repack": True, "image_size": 16})
    cfg = build_config(overrides)
    store = RunStore(tmp_path / "run")
    info = run_stage(store, cfg, "shard")
    manifest = load_manifest(store)
    assert info["images"] == 21 and info["shards"] == 3 and info["packed"] == 21 and store.stage_done("shard", None)

    for s in range(3):
        rows = manifest[manifest["shard"] == s]
        with tarfile.open(store.path(packed_rel(s))) as tf:  # a plain webdataset shard: image + .cls per key
            names = tf.getnames()
            expected = []
            for image_id, uri, label in zip(rows["image_id"], rows["uri"], rows["label"], strict=True):
                ext = Path(uri).suffix[1:]
                expected += [f"{image_id:010d}.{ext}", f"{image_id:010d}.cls"]
                assert tf.extractfile(f"{image_id:010d}.{ext}").read() == Path(uri).read_bytes()
                assert tf.extractfile(f"{image_id:010d}.cls").read().decode() == label
            assert names == expected
        uris = packed_uris(store, s)
        assert [read_bytes(u) for u in uris] == read_many(uris) == [Path(u).read_bytes() for u in rows["uri"]]
    assert not [p for p in Path(store.path("data/packed")).iterdir() if p.name.startswith(".tmp-")]

    # the train stage's inputs: the packed members, in image_id order
    train_uris = image_uris(store, manifest)
    assert all(u.startswith("tar://") for u in train_uris)
    assert [read_image_bytes(u) for u in train_uris[:5]] == [Path(u).read_bytes() for u in manifest["uri"][:5]]
    locations = image_locations(store)  # what the ranks look up: the same tar members, without the list
    assert [locations[i] for i in range(len(train_uris))] == list(locations) == train_uris

    # features from the tars alone (the source folder is gone) equal features from the original files
    unpacked = RunStore(tmp_path / "unpacked")
    run_stage(unpacked, build_config(tiny_overrides(source, data={"shard_size": 8, "image_size": 16})), "shard")
    run_stage(unpacked, cfg, "extract", 0)
    shutil.move(source, tmp_path / "moved-away")
    run_stage(store, cfg, "extract", 0)
    np.testing.assert_array_equal(open_features(store, 0)[:], open_features(unpacked, 0)[:])


def test_repack_resumes_per_shard(tmp_path: Path):
    source = _folder(tmp_path / "images")
    cfg = build_config(tiny_overrides(source, data={"shard_size": 8, "repack": True}))
    store = RunStore(tmp_path / "run")
    run_stage(store, cfg, "shard")
    records = {s: store.done_record("shard", None, unit_name(s)) for s in range(3)}
    index = store.read_parquet(PACKED_INDEX)

    # what a run killed while packing shard 1 leaves: a temporary tar, no record for shard 1, no stage record
    store.remove(f"data/_done/shard/{unit_name(1)}.json")
    store.remove("data/_done/shard/_stage.json")
    store.remove(PACKED_INDEX)
    Path(store.path(packed_rel(1))).write_bytes(b"half a tar")
    Path(store.path("data/packed/.tmp-abc-shard-00001.tar")).write_bytes(b"half a tar")

    info = run_stage(store, cfg, "shard")
    assert info["packed"] == 21 and store.stage_done("shard", None)
    after = {s: store.done_record("shard", None, unit_name(s)) for s in range(3)}
    assert after[0] == records[0] and after[2] == records[2]  # not packed again
    assert after[1]["finished_at"] > records[1]["finished_at"] and after[1]["offsets"] == records[1]["offsets"]
    assert store.read_parquet(PACKED_INDEX).equals(index)
    with tarfile.open(store.path(packed_rel(1))) as tf:
        assert len(tf.getnames()) == 16

    # --force starts over, the packed tars included
    run_stage(store, cfg, "shard", force=True)
    assert not Path(store.path("data/packed/.tmp-abc-shard-00001.tar")).exists()

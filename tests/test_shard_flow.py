"""The shard flow fans listing parts out on a real Dask cluster, resumes from the parts already scanned, and
``deepercluster inspect --shards`` reports what it made."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from deepercluster.cli import app
from deepercluster.config import build_config
from deepercluster.data.shard import load_manifest
from deepercluster.run import init_run
from deepercluster.stages import run_stage
from deepercluster.store import RunStore


def _tars(folder: Path, n_tars: int, per_tar: int) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir()
    for t in range(n_tars):
        with tarfile.open(folder / f"shard-{t:03d}.tar", "w") as tf:
            for i in range(per_tar):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(buf, format="PNG")
                for name, data in [(f"{t}-{i:03d}.png", buf.getvalue()), (f"{t}-{i:03d}.cls", str(i % 2).encode())]:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
            empty = tarfile.TarInfo(f"{t}-zzz.png")  # a zero-byte image member
            tf.addfile(empty, io.BytesIO(b""))


def test_shard_flow_on_dask_matches_the_serial_stage(tmp_path: Path, dask_address):
    from flows.stages import stage_flow

    _tars(tmp_path / "wds", n_tars=3, per_tar=30)
    overrides = {"data": {"source": str(tmp_path / "wds"), "shard_size": 16, "part_size": 10},
                 "cluster": {"k": 1, "super_clusters": 1}}
    cfg = build_config(overrides)
    store = RunStore(tmp_path / "run")
    init_run(store, cfg)
    info = stage_flow(store.uri, "shard", dask_address=dask_address)
    assert info["images"] == 90 and info["reasons"] == {"empty file": 3} and info["shards"] == 6
    assert len([u for u in store.done_units("shard", None) if u.startswith("part-")]) == 10

    serial = RunStore(tmp_path / "serial")
    run_stage(serial, cfg, "shard")
    assert load_manifest(store).equals(load_manifest(serial))

    result = CliRunner().invoke(app, ["inspect", store.uri, "--shards"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "90 images in 6 shards" in result.output and "empty file" in result.output
    assert "shard-000.tar" in result.output  # the sample of rows

    # data.repack: one Dask task per shard packs it; the stage is done once every shard is packed
    from deepercluster.data.images import read_bytes
    from deepercluster.data.repack import packed_rel, packed_uris

    packed = RunStore(tmp_path / "packed")
    init_run(packed, build_config({**overrides, "data": {**overrides["data"], "repack": True}}))
    info = stage_flow(packed.uri, "shard", dask_address=dask_address)
    assert info["packed"] == 90 and packed.stage_done("shard", None)
    assert all(packed.exists(packed_rel(s)) for s in range(6))
    manifest = load_manifest(packed)
    uris = [u for s in range(6) for u in packed_uris(packed, s)]
    assert [read_bytes(u) for u in uris] == [read_bytes(u) for u in manifest["uri"]]

"""Verified artifacts: completion records hold the size and SHA-256 of what their unit wrote; a resumed stage
redoes units whose files are missing or resized; `deepercluster verify` checks every checksum and names each bad
unit with the command that recomputes it (`--repair`: only those units, back to the recorded bytes); a missing,
zeroed or truncated file is one line naming the file and the unit, never a library's error."""

from __future__ import annotations

import hashlib
import io
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import tiny_overrides
from typer.testing import CliRunner

from deepercluster.cli import app
from deepercluster.clustering.stage import assignments_rel, load_assignments, whitened_features
from deepercluster.clustering.whitening import whitened_rel
from deepercluster.config import build_config
from deepercluster.errors import StoreError
from deepercluster.features.array import open_features, shard_object_rel
from deepercluster.paths import PARTS, owner_of, zarr_shard_rel
from deepercluster.run import init_run
from deepercluster.stages import run_stage
from deepercluster.store import RunStore
from deepercluster.verify import repair_run, verify_run


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, digits_dir: Path) -> Path:
    """240 digits in 6 shards of 40, extracted and clustered once (2 x 5 clusters); each test damages a copy."""
    root = tmp_path_factory.mktemp("verify") / "reference"
    cfg = build_config(tiny_overrides(digits_dir))
    store = RunStore(root)
    init_run(store, cfg)
    for name in ("shard", "extract", "cluster"):
        run_stage(store, cfg, name, None if name == "shard" else 0)
    return root


@pytest.fixture
def run(tmp_path: Path, digits_dir: Path, reference: Path):
    shutil.copytree(reference, tmp_path / "run")
    return RunStore(tmp_path / "run"), build_config(tiny_overrides(digits_dir))


def _damage(store: RunStore, rel: str, how: str) -> None:
    path = Path(store.path(rel))
    if how == "deleted":
        path.unlink()
    elif how == "zeroed":  # same size, every byte zero
        path.write_bytes(bytes(path.stat().st_size))
    else:  # truncated
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text and "Traceback" not in text, text
    return text


def _features(store: RunStore) -> np.ndarray:
    return open_features(store, 0)[:]


def test_records_list_what_their_units_wrote(run):
    store, _ = run
    record = store.done_record("extract", 0, "shard-00002")
    obj = shard_object_rel(0, 2)
    assert obj == "rounds/0/features.zarr/features/c/2/0" == zarr_shard_rel("rounds/0/features.zarr/features", 2)
    data = Path(store.path(obj)).read_bytes()  # the zarr shard's object is where the record says
    assert record["outputs"] == {obj: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}}
    outputs = {stage_unit: list(store.done_record(*stage_unit)["outputs"])
               for stage_unit in [("shard", None, "part-00000"), ("shard", None, "manifest"),
                                  ("cluster", 0, "whiten-00005"), ("cluster", 0, "pca"),
                                  ("cluster", 0, "kmeans-level1"), ("cluster", 0, "ckpt-level1"),
                                  ("cluster", 0, "assign-00002"), ("cluster", 0, "ckpt-super-0001"),
                                  ("cluster", 0, "super-0001"), ("cluster", 0, "_stage")]}
    assert outputs == {
        ("shard", None, "part-00000"): [f"{PARTS}/part-00000.parquet"],
        ("shard", None, "manifest"): ["data/manifest.parquet", "data/rejects.parquet"],
        ("cluster", 0, "whiten-00005"): ["rounds/0/clusters/whitened.zarr/c/5/0"],
        ("cluster", 0, "pca"): ["rounds/0/clusters/pca.npz"],
        ("cluster", 0, "kmeans-level1"): ["rounds/0/clusters/level1_centroids.npy"],
        ("cluster", 0, "ckpt-level1"): ["rounds/0/clusters/kmeans/level1.npz"],
        ("cluster", 0, "assign-00002"): ["rounds/0/clusters/level1/labels-00002.npy"],
        ("cluster", 0, "ckpt-super-0001"): ["rounds/0/clusters/kmeans/super-0001.npz"],
        ("cluster", 0, "super-0001"): ["rounds/0/clusters/sub-0001.parquet",  # train.head_init: centroids
                                       "rounds/0/clusters/sub-0001_centroids.npy",
                                       "rounds/0/clusters/sub-0001_means.npy"],
        ("cluster", 0, "_stage"): ["rounds/0/clusters/assignments.parquet", "rounds/0/clusters/sizes.png",
                                   "rounds/0/clusters/stats.json"],
    }
    for (stage, r, unit), rels in outputs.items():  # the reverse map the error messages use
        assert {owner_of(rel) for rel in rels} == {(stage, r, unit)}
    summary: dict = {}
    assert verify_run(store, summary=summary) == []
    # shard: part, manifest, stage; extract: 6 shards, stage; cluster: 6 whitened shards, pca + whitened, level 1 +
    # its checkpoint, 6 shards' labels, 2 level-2 units + their checkpoints, stage
    assert summary["units"] == 3 + (6 + 1) + (6 + 2 + 2 + 6 + 2 + 2 + 1)
    assert summary["unlisted"] == 0
    # float arrays fill with NaN: rows of a shard that is not there never read as features
    for rel in ("rounds/0/features.zarr/features", whitened_rel(0)):
        assert np.isnan(zarr.open_array(store.url(rel)).fill_value)


@pytest.mark.parametrize("how", ["deleted", "zeroed", "truncated"])
def test_a_damaged_feature_shard_is_named_and_recomputed_alone(run, reference: Path, how: str):
    store, cfg = run
    ref = RunStore(reference)
    extract_id = store.done_record("extract", 0, "_stage")["id"]
    _damage(store, shard_object_rel(0, 2), how)
    command = f"deepercluster verify {store.uri} --round 0 --repair"

    with pytest.raises(StoreError) as err:  # before: zeros (one cluster) or zarr's checksum ValueError
        run_stage(store, cfg, "cluster", 0, force=True)
    text = _one_line(err)
    assert f"{store.url(shard_object_rel(0, 2))} " in text and "(unit extract r0 shard-00002)" in text
    assert text.endswith(f"recompute it with `{command}`")

    problems = verify_run(store)
    assert [(p.stage, p.round, p.unit, p.rel, p.command) for p in problems] == [
        ("extract", 0, "shard-00002", shard_object_rel(0, 2), command)]
    expected = {"deleted": "is missing", "zeroed": "does not match its sha256 checksum",
                "truncated": "bytes, its record"}[how]
    assert expected in problems[0].what

    cli = CliRunner()
    result = cli.invoke(app, ["verify", store.uri])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 2 and "(unit extract r0 shard-00002)" in lines[0] and command in lines[0]
    assert lines[1].startswith("1 bad units of ")

    result = cli.invoke(app, command.split()[1:])  # the suggested command, in-process
    assert result.exit_code == 0, result.output
    assert "extract r0: recomputed shard-00002: the same bytes as recorded" in result.output
    assert "all match their records" in result.output
    assert np.array_equal(_features(store), _features(ref))
    assert store.done_record("extract", 0, "_stage")["id"] == extract_id  # the clusters read the same features
    run_stage(store, cfg, "cluster", 0)  # resumes the interrupted --force rerun
    assert load_assignments(store, 0).equals(load_assignments(ref, 0))
    assert verify_run(store) == []


def test_a_resized_shard_is_redone_when_the_stage_resumes(run, reference: Path, caplog):
    """A stage interrupted before its end (no stage record) re-checks its done units' sizes on resume."""
    store, cfg = run
    _damage(store, shard_object_rel(0, 3), "truncated")
    store.forget("extract", 0, "_stage")
    before = store.done_record("extract", 0, "shard-00004")
    with caplog.at_level(logging.WARNING, logger="deepercluster"):
        run_stage(store, cfg, "extract", 0)
    bad = [r.getMessage() for r in caplog.records if "shard-0000" in r.getMessage()]
    assert len(bad) == 1 and bad[0].startswith("extract r0 shard-00003: ") and "its record" in bad[0]
    assert store.done_record("extract", 0, "shard-00004") == before  # the others are not redone
    assert np.array_equal(_features(store), _features(RunStore(reference)))
    assert verify_run(store, 0) == []


def test_a_resized_super_cluster_file_is_redone_when_the_stage_resumes(run, reference: Path, caplog):
    store, cfg = run
    _damage(store, "rounds/0/clusters/sub-0001.parquet", "truncated")
    with pytest.raises(StoreError, match=r"sub-0001.parquet is corrupt or truncated \(ArrowInvalid\) \(unit cluster "
                                         r"r0 super-0001\): recompute it with `deepercluster verify"):
        store.read_parquet("rounds/0/clusters/sub-0001.parquet")
    store.forget("cluster", 0, "_stage")
    with caplog.at_level(logging.WARNING, logger="deepercluster"):
        run_stage(store, cfg, "cluster", 0)
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["cluster r0 super-0001"]
    assert load_assignments(store, 0).equals(load_assignments(RunStore(reference), 0))


def test_the_probes_name_a_missing_feature_shard(run):
    from deepercluster.evaluation.stage import probe_features

    store, cfg = run
    ids = np.array([200, 5, 90, 41])
    rows = probe_features(store, cfg, 0, ids, [])
    assert np.array_equal(rows, np.asarray(_features(store)[ids], dtype=np.float32))  # in the order asked
    _damage(store, shard_object_rel(0, 2), "deleted")
    with pytest.raises(StoreError, match=r"c/2/0 is missing \(unit extract r0 shard-00002\)"):
        probe_features(store, cfg, 0, ids, [])


def test_a_truncated_assignments_file(run, reference: Path):
    store, cfg = run
    cluster_id = store.done_record("cluster", 0, "_stage")["id"]
    _damage(store, assignments_rel(0), "truncated")
    with pytest.raises(StoreError) as err:  # before: ArrowInvalid ... '<Buffer>', no path
        load_assignments(store, 0)
    text = _one_line(err)
    assert text.startswith(f"{store.url(assignments_rel(0))} is corrupt or truncated (")
    assert "(unit cluster r0 stage record): recompute it with `deepercluster verify" in text

    problems = verify_run(store)
    assert [(p.stage, p.unit, p.rel) for p in problems] == [("cluster", "_stage", assignments_rel(0))]
    lines = repair_run(store, cfg, problems)
    assert lines == ["cluster r0: recomputed the stage record: the same bytes as recorded"]
    assert load_assignments(store, 0).equals(load_assignments(RunStore(reference), 0))
    assert store.done_record("cluster", 0, "_stage")["id"] == cluster_id  # training stays valid
    assert verify_run(store) == []


def test_a_lost_whitened_shard(run, reference: Path):
    store, cfg = run
    _damage(store, zarr_shard_rel(whitened_rel(0), 1), "deleted")
    with pytest.raises(StoreError) as err:  # what the evaluate stage reads
        whitened_features(store, cfg, 0)
    assert "(unit cluster r0 whiten-00001)" in _one_line(err)
    problems = verify_run(store)
    assert [p.unit for p in problems] == ["whiten-00001"]
    assert repair_run(store, cfg, problems) == ["cluster r0: recomputed whiten-00001: the same bytes as recorded"]
    assert np.array_equal(whitened_features(store, cfg, 0), whitened_features(RunStore(reference), cfg, 0))
    assert verify_run(store) == []


def test_corrupt_files_read_as_one_line_naming_them(tmp_path: Path):
    store = RunStore(tmp_path / "run")
    store.write_npy("a.npy", np.arange(1000))
    store.write_parquet("b.parquet", {"x": np.arange(1000)})
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(1000)}, buf)
    store.write_bytes("c.pt", buf.getvalue())
    for rel in ("a.npy", "b.parquet", "c.pt"):
        _damage(store, rel, "truncated")
    for read in (lambda: store.read_npy("a.npy"), lambda: store.read_parquet("b.parquet"),
                 lambda: list(store.iter_parquet("b.parquet")), lambda: store.load_torch("c.pt")):
        with pytest.raises(StoreError, match=r"is corrupt or truncated \(\w+\): recompute the stage") as err:
            read()
        assert _one_line(err).startswith(str(tmp_path / "run"))

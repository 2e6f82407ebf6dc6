from pathlib import Path

import pytest
import yaml

from deepercluster.config import (
    PRESETS,
    RESULT_NEUTRAL,
    SCHEMA_VERSION,
    build_config,
    config_from_yaml_text,
    field_description,
    iter_fields,
    load_config,
)
from deepercluster.errors import ConfigError
from deepercluster.run import default_run_dir, init_run, load_run_config, run_identity
from deepercluster.store import RunStore


def test_presets_mean_what_the_papers_mean():
    dc = build_config(method="deepcluster")
    assert (dc.cluster.super_clusters, dc.train.rotations) == (1, False) and dc.cluster.k > 1
    rot = build_config(method="rotnet")
    assert (rot.cluster.super_clusters, rot.cluster.k, rot.train.rotations) == (1, 1, True)
    deeper = build_config(method="deepercluster")
    assert deeper.cluster.super_clusters > 1 and deeper.cluster.k > 1 and deeper.train.rotations
    assert set(PRESETS) == {"deepcluster", "rotnet", "deepercluster", "clusterfit"}


def test_yaml_overrides_preset_and_hash_ignores_runtime(tmp_path: Path):
    f = tmp_path / "c.yaml"
    f.write_text("method: deepcluster\ncluster:\n  k: 30\nruntime:\n  dask_workers: 7\n")
    cfg = load_config(f)
    assert cfg.method == "deepcluster" and cfg.cluster.k == 30 and cfg.cluster.super_clusters == 1
    assert cfg.hash == build_config({"method": "deepcluster", "cluster": {"k": 30}}).hash
    assert cfg.hash != build_config({"method": "deepcluster", "cluster": {"k": 31}}).hash


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model": {"arch": "vgg99"}}, "model.arch"),
        ({"data": {"source": "/no/such/folder"}}, "does not exist"),
        ({"cluster": {"k": 1000, "super_clusters": 2}}, "exceeds the 1797 images"),
        ({"data": {"limit": 50}, "cluster": {"k": 60, "super_clusters": 1}}, "exceeds the 50 images"),
        ({"clustr": {"k": 3}}, "clustr"),
        ({"method": "simclr"}, "unknown method"),
        ({"train": {"crop_scale": [0.9, 0.2]}}, "crop_scale"),
        ({"model": {"arch": "alexnet"}, "data": {"image_size": 32}}, "too small for alexnet"),
    ],
)
def test_invalid_configs_give_one_line_errors(overrides, message):
    with pytest.raises(ConfigError) as err:
        build_config(overrides)
    text = str(err.value)
    assert message in text
    assert "\n" not in text and text.startswith("invalid config")


def test_config_file_errors(tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("cluster: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_run_keeps_its_config_takes_changes_and_refuses_fewer_rounds_or_another_method(tmp_path: Path):
    store = RunStore(tmp_path / "run")
    cfg = build_config({"cluster": {"k": 7}})
    assert init_run(store, cfg) == []
    assert load_run_config(store).hash == cfg.hash
    assert f"config_hash: {cfg.hash}" in store.read_text("config.yaml")
    assert init_run(store, cfg) == []  # the same config resumes
    changed = build_config({"cluster": {"k": 8}, "rounds": 5})
    assert init_run(store, changed) == ["rounds 3 -> 5", "cluster.k 7 -> 8"]
    assert load_run_config(store).hash == changed.hash
    with pytest.raises(ConfigError, match="rounds can be raised, not lowered") as err:
        init_run(store, build_config({"cluster": {"k": 8}, "rounds": 4}))
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="is a deepercluster run: use a new --run directory for rotnet"):
        init_run(store, build_config({"rounds": 5}, method="rotnet"))


def test_run_identity_ignores_rounds_result_neutral_fields_and_defaults():
    base = build_config({"cluster": {"k": 7}})
    same = [build_config({"cluster": {"k": 7}, "rounds": 6}),
            build_config({"cluster": {"k": 7}, "extract": {"decode_threads": 1}, "runtime": {"dask_workers": 4}})]
    assert all(run_identity(c) == run_identity(base) for c in same)
    assert run_identity(build_config({"cluster": {"k": 8}})) != run_identity(base)
    assert default_run_dir(base) == f"runs/deepercluster-{run_identity(base)[:8]}"


def test_saved_config_has_a_schema_version_and_older_ones_load():
    cfg = build_config({"cluster": {"k": 7}})
    saved = yaml.safe_load(cfg.to_yaml())
    assert (saved["schema_version"], saved["config_hash"]) == (SCHEMA_VERSION, cfg.hash)
    assert config_from_yaml_text(cfg.to_yaml()).hash == cfg.hash
    # written before configs had a version, and before train.head_init / model.bn_calibration existed
    del saved["schema_version"], saved["train"]["head_init"], saved["model"]["bn_calibration"]
    old = config_from_yaml_text(yaml.safe_dump(saved))
    assert (old.train.head_init, old.model.bn_calibration) == ("centroids", 4096) and old.cluster.k == 7
    saved["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(ConfigError, match=r"newer deepercluster \(schema 2, this one reads up to 1\): upgrade"):
        config_from_yaml_text(yaml.safe_dump(saved))


def test_saved_config_loads_without_its_data_source_or_checkpoint(tmp_path: Path):
    images, ckpt = tmp_path / "images", tmp_path / "source.pt"
    images.mkdir()
    ckpt.write_bytes(b"")
    cfg = build_config({"data": {"source": str(images)}, "clusterfit": {"checkpoint": str(ckpt)}},
                       method="clusterfit")
    text = cfg.to_yaml()
    images.rmdir()
    ckpt.unlink()
    again = config_from_yaml_text(text)
    assert (again.data.source, again.clusterfit.checkpoint, again.hash) == (str(images), str(ckpt), cfg.hash)
    with pytest.raises(ConfigError, match="does not exist") as err:
        build_config({"data": {"source": str(images)}})
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("rounds: true\n", "rounds"),
        ("data:\n  limit: false\n", "data.limit"),
        ("eval:\n  probe_train: true\n", "eval.probe_train"),
        ("train:\n  crop_scale: [true, 1.0]\n", "train.crop_scale"),
        ("train:\n  lr: .inf\n", "train.lr"),
        ("train:\n  lr: .nan\n", "train.lr"),
        ("runtime:\n  memory_budget_mb: -.inf\n", "runtime.memory_budget_mb"),
        ("cluster:\n  k: 3\n  niter: 5\n  k: 4\n", "key 'k' is given twice (lines 2 and 4)"),
        ("cluster:\n  k: 3\ncluster:\n  niter: 5\n", "key 'cluster' is given twice (lines 1 and 3)"),
        ("", "is empty: give at least one field, or leave out --config"),
        ("# only a comment\n", "is empty"),
        ("schema_version: 2\n", "newer deepercluster"),
    ],
)
def test_strict_config_files_give_one_line_errors(tmp_path: Path, text: str, names: str):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(f)
    assert names in str(err.value) and "\n" not in str(err.value)
    if "given twice" in names:
        with pytest.raises(ConfigError, match="given twice"):
            config_from_yaml_text(text)


def test_yaml_numbers_keep_working(tmp_path: Path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 1\n  crop_scale: [1, 1]\neval:\n  probe_train: 100\n  probe_test: 0.25\n")
    cfg = load_config(f)
    assert (cfg.train.lr, cfg.train.crop_scale, cfg.eval.probe_train, cfg.eval.probe_test) == (1.0, (1, 1), 100, 0.25)


def test_fields_are_listed_with_values_defaults_and_descriptions():
    cfg = build_config({"cluster": {"k": 30}}, method="deepcluster")
    fields = {name: (value, default, text) for name, value, default, text in iter_fields(cfg)}
    assert fields["cluster.k"] == (30, 100, field_description("cluster.k"))
    assert "level-2 clusters" in fields["cluster.k"][2]
    assert {"method", "train.crop_scale", "clusterfit.model.arch", "runtime.storage_options"} <= fields.keys()
    assert fields.keys() >= RESULT_NEUTRAL >= {"runtime.device", "runtime.dask_workers", "train.loader_workers"}
    assert "extract.batch_size" not in RESULT_NEUTRAL
    for name in sorted(n for n in RESULT_NEUTRAL if not n.startswith("runtime.")):
        assert "(result-neutral: not fingerprinted)" in field_description(name)
    with pytest.raises(ConfigError, match="unknown config field 'cluster.kk'"):
        field_description("cluster.kk")

from pathlib import Path

import pytest

from deepercluster.config import PRESETS, build_config, load_config
from deepercluster.errors import ConfigError
from deepercluster.run import init_run, load_run_config
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


def test_run_keeps_its_config_and_refuses_another(tmp_path: Path):
    store = RunStore(tmp_path / "run")
    cfg = build_config({"cluster": {"k": 7}})
    init_run(store, cfg)
    assert load_run_config(store).hash == cfg.hash
    assert f"config_hash: {cfg.hash}" in store.read_text("config.yaml")
    init_run(store, cfg)  # the same config resumes
    with pytest.raises(ConfigError, match="another config"):
        init_run(store, build_config({"cluster": {"k": 8}}))

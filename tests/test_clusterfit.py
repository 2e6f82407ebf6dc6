"""ClusterFit: source weights (ours or torchvision), labels from the source's features, and the whole flow from a
RotNet run's checkpoint on the digits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import tiny_overrides

from deepercluster.clusterfit import import_labels, prepare_source, source_body_state, source_store
from deepercluster.config import ModelConfig, build_config
from deepercluster.errors import ConfigError
from deepercluster.models import build_body, load_body
from deepercluster.run import init_run
from deepercluster.stages import run_stage
from deepercluster.store import RunStore
from tasks.publish import artifact_key

SOURCE_MODEL = {"arch": "smallnet", "feature_dim": 24}


def clusterfit_overrides(source: Path | str, checkpoint: Path, **sections) -> dict:
    return tiny_overrides(source, method="clusterfit", rounds=1, cluster={"super_clusters": 1, "k": 8},
                          clusterfit={"checkpoint": str(checkpoint), "model": SOURCE_MODEL}, **sections)


def test_clusterfit_config_needs_a_source_and_one_round(tmp_path: Path, digits_dir: Path):
    with pytest.raises(ConfigError, match="needs clusterfit.checkpoint"):
        build_config(tiny_overrides(digits_dir, method="clusterfit"))
    with pytest.raises(ConfigError, match="does not exist"):
        build_config(clusterfit_overrides(digits_dir, tmp_path / "missing.pt"))
    ckpt = tmp_path / "w.pt"
    torch.save({"x": torch.zeros(1)}, ckpt)
    with pytest.raises(ConfigError, match="rounds must be 1"):
        build_config({**clusterfit_overrides(digits_dir, ckpt), "rounds": 2})
    cfg = build_config(clusterfit_overrides(digits_dir, ckpt))
    assert (cfg.cluster.super_clusters, cfg.train.rotations, cfg.eval.final_round) == (1, False, True)
    with pytest.raises(ConfigError, match="does not fit clusterfit.model"):
        source_body_state(cfg)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="not a torch weights file"):
        source_body_state(build_config(clusterfit_overrides(digits_dir, tmp_path / "junk.pt")))


def test_torchvision_weights_become_our_body(tmp_path: Path, digits_dir: Path):
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None, num_classes=7)
    net.eval()
    with torch.no_grad():  # non-trivial running statistics, so that a mismatch in BN buffers would show
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    torch.save(net.state_dict(), tmp_path / "resnet18.pth")
    cfg = build_config(tiny_overrides(digits_dir, method="clusterfit", rounds=1, data={"image_size": 32},
                                      clusterfit={"checkpoint": str(tmp_path / "resnet18.pth"),
                                                  "format": "torchvision", "model": {"arch": "resnet18"}}))
    body = load_body(ModelConfig(arch="resnet18"), source_body_state(cfg)).eval()
    x = torch.randn(2, 3, 32, 32)
    net.fc = torch.nn.Identity()
    with torch.no_grad():
        assert torch.allclose(body(x), net(x), atol=1e-5)
    wrong = build_config(tiny_overrides(digits_dir, method="clusterfit", rounds=1, data={"image_size": 32},
                                        clusterfit={"checkpoint": str(tmp_path / "resnet18.pth"),
                                                    "format": "torchvision", "model": {"arch": "resnet50"}}))
    with pytest.raises(ConfigError, match="is it a resnet50 state dict"):
        source_body_state(wrong)


def test_labels_come_from_the_source_models_features(tmp_path: Path, digits_dir: Path):
    """A fixed source model: its features (computed here directly) are what the source run clusters, and the new
    network's run trains on exactly those clusters, from its own random init."""
    from deepercluster.clustering.stage import load_assignments
    from deepercluster.data.datasets import ImageList
    from deepercluster.data.shard import load_manifest
    from deepercluster.data.transforms import clustering_view
    from deepercluster.features import model_rel, open_features
    from deepercluster.training.inputs import load_pseudo_labels

    source = build_body(ModelConfig(**SOURCE_MODEL), seed=123).eval()
    torch.save({"body": source.state_dict(), "arch": "smallnet", "round": 3}, tmp_path / "source.pt")
    cfg = build_config(clusterfit_overrides(digits_dir, tmp_path / "source.pt"))
    store = RunStore(tmp_path / "cf")
    init_run(store, cfg)
    src = RunStore(prepare_source(store, cfg))
    assert src.uri == source_store(store).uri
    src_cfg = build_config({**cfg.model_dump(mode="json"), "model": SOURCE_MODEL, "eval": {"final_round": False}})
    run_stage(src, src_cfg, "shard")
    run_stage(src, src_cfg, "extract", 0)
    run_stage(src, src_cfg, "cluster", 0)

    uris = load_manifest(src)["uri"].tolist()
    images = ImageList(uris, clustering_view(cfg.data.image_size, cfg.data.crop_ratio))
    with torch.no_grad():
        direct = source(torch.stack([images[i] for i in range(len(images))])).numpy()
    np.testing.assert_allclose(np.asarray(open_features(src, 0)[:], dtype=np.float32), direct, rtol=2e-3, atol=2e-3)

    import_labels(store, cfg)
    labels = load_pseudo_labels(store, cfg, 0)
    assert np.array_equal(labels.targets, load_assignments(src, 0)["target"].to_numpy())
    assert len(np.unique(labels.targets)) == 8
    target_body = store.load_torch(model_rel(0))["body"]
    fresh = build_body(cfg.model, seed=cfg.seed).state_dict()
    weights = [k for k in fresh if "running_" not in k and "num_batches" not in k]  # batch norms: calibrated
    assert all(torch.equal(target_body[k], fresh[k]) for k in weights)  # the new network starts from scratch
    assert target_body["trunk.0.weight"].shape != source.state_dict()["trunk.0.weight"].shape or not torch.equal(
        target_body["trunk.0.weight"], source.state_dict()["trunk.0.weight"])
    assert import_labels(store, cfg) == store.done_record("cluster", 0, "_stage")  # idempotent


@pytest.mark.slow
def test_clusterfit_flow_from_a_rotnet_checkpoint(tmp_path: Path, digits_dir: Path, dask_address):
    from prefect.client.orchestration import get_client

    from deepercluster.evaluation.stage import load_history
    from flows.clusterfit import clusterfit_flow
    from flows.pipeline import pipeline_flow

    rotnet = tmp_path / "rotnet"
    pipeline_flow(str(rotnet), config=tiny_overrides(digits_dir, method="rotnet", rounds=1,
                                                     cluster={"super_clusters": 1, "k": 1},
                                                     model={"feature_dim": 24}), dask_address=dask_address)
    checkpoint = rotnet / "rounds" / "1" / "model.pt"
    assert checkpoint.is_file()

    # the loop flow (deployment deepercluster/loop, `deepercluster run`) dispatches on the run's method
    run = tmp_path / "clusterfit"
    [summary] = pipeline_flow(str(run), config=clusterfit_overrides(digits_dir, checkpoint), dask_address=dask_address)
    store = RunStore(run)
    for name in ("source", "target"):
        for key in ("probe_acc", "knn_acc", "kmeans_nmi_labels"):
            assert 0 < summary[name][key] <= 1, (name, key, summary)
    assert store.read_json("clusterfit.json") == summary
    # the source run evaluated the RotNet weights; the new network's run trained and evaluated its own model
    src = source_store(store)
    src_body = src.load_torch("rounds/0/model.pt")["body"]
    rot_body = torch.load(checkpoint, weights_only=True)["body"]
    assert all(torch.equal(src_body[k], rot_body[k]) for k in rot_body)
    assert load_history(src)["round"].tolist() == [0]
    assert load_history(store)["round"].tolist() == [1]
    assert store.stage_done("train", 0) and store.exists("rounds/1/features.zarr")
    with get_client(sync_client=True) as client:
        assert any(a.key == artifact_key(store, "clusterfit") for a in client.read_latest_artifacts())
    # a rerun finds every stage done
    before = store.done_record("train", 0, "_stage")
    assert clusterfit_flow(str(run), dask_address=dask_address) == summary
    assert store.done_record("train", 0, "_stage") == before

"""ClusterFit (Yan et al., CVPR 2020): features of a source network -> k-means once (K clusters) -> a NEW network
trained from scratch on those pseudo-labels; both networks evaluated with the same probes.

Built from the pipeline's own stages. A ClusterFit run is the new network's run; its source lives in a sub-run:

    <run>/source/                the source network's run: rounds/0/model.pt = the source weights, then the
                                 shard, extract, cluster (k-means, K = cluster.k) and evaluate stages of round 0
    <run>/rounds/0/model.pt      the new network, randomly initialised (``model`` section, seed)
    <run>/rounds/0/clusters/     the source's assignments, imported: the labels the new network learns
    <run>/rounds/1/              the trained new network's features and evaluation (``eval.final_round``)
    <run>/clusterfit.json        source vs new network: the same probes side by side
"""

from __future__ import annotations

import io
from typing import Any

import fsspec
import torch

from deepercluster.clustering.stage import STAGE as CLUSTER_STAGE
from deepercluster.clustering.stage import assignments_rel, clusters_rel
from deepercluster.config import ModelConfig, PipelineConfig, build_config
from deepercluster.data.shard import MANIFEST, REJECTS
from deepercluster.data.shard import STAGE as SHARD_STAGE
from deepercluster.errors import ConfigError, StoreError
from deepercluster.features import ensure_round_model, model_rel
from deepercluster.models import build_body, load_body
from deepercluster.run import init_run, load_run_config
from deepercluster.store import RunStore

SOURCE = "source"
SUMMARY = "clusterfit.json"
# our architectures whose body is a torchvision model minus its last classifier layer
TORCHVISION_NAMES = {"resnet18": "resnet18", "resnet50": "resnet50", "vgg16": "vgg16_bn"}


def read_state(uri: str) -> dict[str, Any]:
    """A checkpoint's tensors, loaded with ``weights_only=True`` (no code runs from the file)."""
    try:
        with fsspec.open(uri, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ConfigError(f"source checkpoint {uri!r} does not exist") from None
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors, unsupported globals, truncated zip...
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"source checkpoint {uri!r} is not a torch weights file: {first}") from None
    if not isinstance(state, dict):
        raise ConfigError(f"source checkpoint {uri!r} holds a {type(state).__name__}, not a state dict")
    return state


def torchvision_body_state(model: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a torchvision state dict (resnet18, resnet50, vgg16_bn) onto our body of the same architecture.

    Our bodies register the torchvision modules in the same order, minus the last classifier layer, so the
    tensors pair up in order; every pair must have the same shape."""
    if model.arch not in TORCHVISION_NAMES:
        raise ConfigError(f"clusterfit.format torchvision supports {', '.join(TORCHVISION_NAMES)} (vgg16 = vgg16_bn), "
                          f"not {model.arch!r}")
    ours = build_body(model).state_dict()
    theirs = [(k, v) for k, v in state.items() if isinstance(v, torch.Tensor)]
    if len(theirs) < len(ours):
        raise ConfigError(f"the torchvision checkpoint has {len(theirs)} tensors, a {model.arch} body needs "
                          f"{len(ours)}: is it a {TORCHVISION_NAMES[model.arch]} state dict?")
    mapped = {}
    for (name, ref), (their_name, tensor) in zip(ours.items(), theirs, strict=False):
        if ref.shape != tensor.shape:
            raise ConfigError(f"torchvision tensor {their_name} {tuple(tensor.shape)} does not fit {name} "
                              f"{tuple(ref.shape)}: is it a {TORCHVISION_NAMES[model.arch]} state dict "
                              "(and clusterfit.model.sobel false)?")
        mapped[name] = tensor
    return mapped


def source_body_state(cfg: PipelineConfig) -> dict[str, torch.Tensor]:
    """The source network's body weights, checked by loading them into the source architecture."""
    cf = cfg.clusterfit
    state = read_state(cf.checkpoint)
    state = torchvision_body_state(cf.model, state) if cf.format == "torchvision" else state.get("body", state)
    try:
        load_body(cf.model, state)
    except RuntimeError as err:
        raise ConfigError(f"source checkpoint {cf.checkpoint!r} does not fit clusterfit.model "
                          f"({cf.model.arch}, sobel={cf.model.sobel}): {str(err).splitlines()[0]}") from None
    return state


def source_config(cfg: PipelineConfig) -> PipelineConfig:
    """The source sub-run's config: the run's, with the source network as ``model``, no final-round evaluation."""
    d = cfg.model_dump(mode="json")
    d["model"] = d["clusterfit"]["model"]
    d["eval"]["final_round"] = False
    return build_config(d)


def source_store(store: RunStore) -> RunStore:
    return RunStore(store.url(SOURCE), store.storage_options)


def prepare_source(store: RunStore, cfg: PipelineConfig) -> str:
    """Create the source sub-run with the source weights as its round-0 model; return its URI."""
    if cfg.method != "clusterfit":
        raise ConfigError(f"run {store.uri} is a {cfg.method} run, not a clusterfit run")
    src = source_store(store)
    init_run(src, source_config(cfg))
    if not src.exists(model_rel(0)):
        src.save_torch(model_rel(0), {"body": source_body_state(cfg), "arch": cfg.clusterfit.model.arch, "round": 0,
                                      "source": cfg.clusterfit.checkpoint})
    return src.uri


def share_manifest(store: RunStore, src: RunStore) -> None:
    """Give ``store`` the shard stage's outputs of ``src`` (same data section: the same manifest), done."""
    if store.stage_done(SHARD_STAGE, None):
        return
    if not src.stage_done(SHARD_STAGE, None):
        raise StoreError(f"{src.uri} has no manifest yet: run its shard stage first")
    for rel in (MANIFEST, REJECTS):
        store.write_bytes(rel, src.read_bytes(rel))
    store.mark_stage_done(SHARD_STAGE, None, {**src.done_record(SHARD_STAGE, None, "_stage"), "from": src.uri})


def import_labels(store: RunStore, cfg: PipelineConfig) -> dict[str, Any]:
    """Give the new network's run the source's manifest and round-0 cluster assignments (its training labels), and
    its own random round-0 model. Idempotent."""
    src = source_store(store)
    if not src.stage_done(CLUSTER_STAGE, 0):
        raise StoreError(f"clusterfit: the source run {src.uri} has no clusters yet: run its cluster stage first")
    share_manifest(store, src)
    if not store.stage_done(CLUSTER_STAGE, 0):
        for rel in (assignments_rel(0), clusters_rel(0, "stats.json")):
            store.write_bytes(rel, src.read_bytes(rel))
        store.mark_stage_done(CLUSTER_STAGE, 0, {**src.done_record(CLUSTER_STAGE, 0, "_stage"), "from": src.uri})
    ensure_round_model(store, load_run_config(store), 0)
    return store.done_record(CLUSTER_STAGE, 0, "_stage")


def summarise(store: RunStore, source_metrics: dict[str, Any], target_metrics: dict[str, Any]) -> dict[str, Any]:
    """``clusterfit.json``: the source's and the new network's metrics under the same probes."""
    keys = ("kmeans_nmi_labels", "kmeans_nmi_labels_std", "kmeans_ari_labels", "probe_acc", "knn_acc",
            "knn_whitened_acc", "nmi_labels")
    summary = {"source": {k: source_metrics.get(k) for k in keys}, "target": {k: target_metrics.get(k) for k in keys},
               "source_run": source_store(store).uri, "target_round": target_metrics.get("round")}
    store.write_json(SUMMARY, summary)
    return summary

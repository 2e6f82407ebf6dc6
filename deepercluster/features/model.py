"""The round's network as a feature extractor: which layer, on which device, at which precision.

A :class:`FeatureModel` is built once per process (a Dask worker) and cached, keyed by the model file's signature,
so tasks pass only URIs and shard ids. Its input is a batch from :mod:`deepercluster.features.loader`: float32 NCHW
already normalised on the host (CPU), or uint8 NHWC normalised on the device (CUDA: 4x less to transfer, and the
permuted view is channels-last for free).
"""

from __future__ import annotations

import hashlib
import json
from contextlib import nullcontext
from functools import lru_cache

import torch
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from deepercluster.config import ModelConfig, PipelineConfig
from deepercluster.errors import ConfigError, StoreError
from deepercluster.models import Body, build_body, load_body
from deepercluster.paths import model_rel  # noqa: F401  (re-exported)
from deepercluster.store import RunStore, round_dir

OUTPUT_LAYER = "output"


def load_weights(path: str, what: str) -> dict:
    """The tensors of a checkpoint file, loaded without running any code from it; a file that is not one (a pickle
    with code in it, a truncated file, something else) is a one-line error naming ``what``."""
    import pickle

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        raise ConfigError(f"{what} {path!r} is not a weights-only checkpoint (a state dict of tensors, loadable "
                          f"without running code from the file): {type(err).__name__}") from None
    if not isinstance(state, dict):
        raise ConfigError(f"{what} {path!r} holds a {type(state).__name__}, not a state dict")
    return state


def _made_from(cfg: PipelineConfig) -> str:
    """What round 0's model is made of: the model section and the seed."""
    blob = json.dumps({"model": cfg.model.model_dump(mode="json"), "seed": cfg.seed}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def ensure_round_model(store: RunStore, cfg: PipelineConfig, r: int) -> str:
    """The weights round ``r`` starts from. Round 0: a seeded random init (or ``model.init_checkpoint``), made again
    when the model section or the seed changed since (``model.json`` says what it was made from; a round-0 model
    put there by someone else, as ClusterFit does, has none and is kept); later rounds: written by the previous
    round's training stage."""
    rel = model_rel(r)
    sidecar = f"{round_dir(r)}/model.json"
    if store.exists(rel) and (r > 0 or not store.exists(sidecar)
                              or store.read_json(sidecar)["made_from"] == _made_from(cfg)):
        return rel
    if r > 0:
        raise StoreError(f"{store.url(rel)} is missing: run the train stage of round {r - 1} first")
    if cfg.model.init_checkpoint:
        state = load_weights(cfg.model.init_checkpoint, "model.init_checkpoint")
        body = load_body(cfg.model, state.get("body", state))
    else:
        body = build_body(cfg.model, seed=cfg.seed)
        from deepercluster.features.calibrate import calibrate_round_model  # reads images: only when needed

        calibrate_round_model(store, cfg, 0, body)
    store.save_torch(rel, {"body": body.state_dict(), "arch": cfg.model.arch, "round": 0})
    store.write_json(sidecar, {"made_from": _made_from(cfg)})
    return rel


class LayerFeatures(nn.Module):
    """The body cut at ``layer`` ('output': the body's own feature layer); conv maps are average-pooled."""

    def __init__(self, body: Body, layer: str = OUTPUT_LAYER):
        super().__init__()
        self.layer = layer
        self.net = body if layer == OUTPUT_LAYER else create_feature_extractor(body, {check_layer(body, layer): "f"})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.net(x)
        if isinstance(f, dict):
            f = f["f"]
        if f.ndim == 4:
            return f.mean(dim=(2, 3))
        return f.flatten(1)


def check_layer(body: Body, layer: str) -> str:
    nodes = get_graph_node_names(body.eval())[1]
    if layer in nodes or any(n.startswith(layer + ".") for n in nodes):
        return layer
    tops = sorted({".".join(n.split(".")[:2]) for n in nodes if n.startswith("trunk.")}, key=nodes.index)
    raise ConfigError(f"extract.layer {layer!r} is not a layer of this body; use {OUTPUT_LAYER!r} or one of: "
                      f"{', '.join(tops)}")


class FeatureModel:
    """Batch -> float16 features on the device, in ``torch.inference_mode``. CPU: float32, contiguous NCHW;
    CUDA: channels-last and autocast (bf16 by default, fp16 where bf16 is not supported)."""

    def __init__(self, body: Body, layer: str, device: torch.device, autocast: str = "bfloat16",
                 mean: tuple[float, ...] = (0.485, 0.456, 0.406), std: tuple[float, ...] = (0.229, 0.224, 0.225)):
        self.device = device
        self.cuda = device.type == "cuda"
        net = LayerFeatures(body, layer).eval().to(device)
        self.net = net.to(memory_format=torch.channels_last) if self.cuda else net
        if self.cuda and autocast != "off":
            dtype = torch.bfloat16 if autocast == "bfloat16" and torch.cuda.is_bf16_supported() else torch.float16
            self.autocast = lambda: torch.autocast("cuda", dtype=dtype)
        else:
            self.autocast = nullcontext
        s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.scale = (1.0 / (255.0 * s)).to(device)
        self.shift = (-torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) / s).to(device)

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.to(self.device, non_blocking=True)
        if x.dtype == torch.uint8:  # NHWC bytes: the permuted view is channels-last
            x = torch.addcmul(self.shift, x.permute(0, 3, 1, 2).float(), self.scale)
            x = x.contiguous(memory_format=torch.channels_last if self.cuda else torch.contiguous_format)
        with self.autocast():
            return self.net(x).to(torch.float16)


@lru_cache(maxsize=2)
def _cached_model(store_uri: str, rel: str, version: str, model_json: str, layer: str, device: str,
                  autocast: str) -> FeatureModel:
    store = RunStore(store_uri)
    body = load_body(ModelConfig.model_validate_json(model_json), store.load_torch(rel)["body"])
    return FeatureModel(body, layer, torch.device(device), autocast)


def load_round_model(store: RunStore, cfg: PipelineConfig, r: int, device: torch.device) -> FeatureModel:
    """The round's feature model on ``device``, loaded once per process (reloaded when model.pt changes)."""
    rel = model_rel(r)
    return _cached_model(store.uri, rel, store.signature(rel), cfg.model.model_dump_json(), cfg.extract.layer,
                         str(device), cfg.extract.autocast)


def model_loads() -> int:
    """How many times this process has loaded a round model (for tests: once per worker and round)."""
    return _cached_model.cache_info().misses


def feature_dim(store: RunStore, cfg: PipelineConfig, r: int) -> int:
    """Width of the extracted layer (a dry forward of one blank image on the CPU); checks ``extract.layer``."""
    model = load_round_model(store, cfg, r, torch.device("cpu"))
    size = cfg.data.image_size
    return int(model(torch.zeros(1, size, size, 3, dtype=torch.uint8)).shape[1])

"""The extract stage: features of every image with the round's model -> ``rounds/<r>/features.zarr``.

The array is N x D float16 with one zarr shard per image shard (shard ``s`` = manifest rows with ``shard == s``),
so two writers never touch the same zarr shard. A shard is written whole in one assignment, then its completion
record is written; a rerun skips shards that have one. Models are loaded once per process (Dask worker), keyed
by their URI.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import zarr

from deepercluster.config import PipelineConfig
from deepercluster.data.datasets import ImageList
from deepercluster.data.shard import load_manifest, shard_ids
from deepercluster.data.transforms import clustering_view
from deepercluster.device import resolve_device
from deepercluster.errors import StoreError
from deepercluster.models import Body, build_body, load_body
from deepercluster.store import RunStore, round_dir

STAGE = "extract"


def model_rel(r: int) -> str:
    return f"{round_dir(r)}/model.pt"


def features_rel(r: int) -> str:
    return f"{round_dir(r)}/features.zarr"


def ensure_round_model(store: RunStore, cfg: PipelineConfig, r: int) -> str:
    """The weights round ``r`` starts from. Round 0: a seeded random init (or ``model.init_checkpoint``);
    later rounds: written by the previous round's training stage."""
    rel = model_rel(r)
    if store.exists(rel):
        return rel
    if r > 0:
        raise StoreError(f"{store.url(rel)} is missing: run the train stage of round {r - 1} first")
    if cfg.model.init_checkpoint:
        state = torch.load(cfg.model.init_checkpoint, map_location="cpu", weights_only=True)
        body = load_body(cfg.model, state.get("body", state))
    else:
        body = build_body(cfg.model, seed=cfg.seed)
    store.save_torch(rel, {"body": body.state_dict(), "arch": cfg.model.arch, "round": 0})
    return rel


@lru_cache(maxsize=2)
def _cached_model(store_uri: str, rel: str, version: str, model_json: str, device: str) -> Body:
    from deepercluster.config import ModelConfig

    store = RunStore(store_uri)
    body = load_body(ModelConfig.model_validate_json(model_json), store.load_torch(rel)["body"])
    body.to(device).eval()
    if device.startswith("cuda"):
        body = body.to(memory_format=torch.channels_last)
    return body


def load_round_model(store: RunStore, cfg: PipelineConfig, r: int, device: torch.device) -> Body:
    """The round's body in eval mode on ``device``, loaded once per process."""
    rel = model_rel(r)
    return _cached_model(store.uri, rel, store.signature(rel), cfg.model.model_dump_json(), str(device))


def feature_dim(store: RunStore, cfg: PipelineConfig, r: int) -> int:
    return load_round_model(store, cfg, r, torch.device("cpu")).feature_dim


def inner_chunk_rows(shard_size: int) -> int:
    """Rows per zarr inner chunk (the read unit); the zarr shard (the write unit) is ``shard_size`` rows."""
    return 64 if shard_size % 64 == 0 else shard_size


def prepare_extract(store: RunStore, cfg: PipelineConfig, r: int, force: bool = False) -> list[int]:
    """Create the round model and the feature array if needed; return the shards still to extract."""
    if force:
        store.reset_stage(STAGE, r)
        store.remove(features_rel(r))
    ensure_round_model(store, cfg, r)
    manifest = load_manifest(store)
    n, dim = len(manifest), feature_dim(store, cfg, r)
    if not store.exists(f"{features_rel(r)}/zarr.json"):
        zarr.create_array(
            store.url(features_rel(r)),
            shape=(n, dim),
            chunks=(inner_chunk_rows(cfg.data.shard_size), dim),
            shards=(cfg.data.shard_size, dim),
            dtype="float16",
            fill_value=0,
            compressors=None,
            dimension_names=("image", "feature"),
            storage_options=store.storage_options or None,
            overwrite=True,
        )
    done = set(store.done_units(STAGE, r))
    return [s for s in shard_ids(manifest) if unit_name(s) not in done]


def unit_name(shard: int) -> str:
    return f"shard-{shard:05d}"


@torch.inference_mode()
def compute_features(body: Body, images: ImageList, batch_size: int, device: torch.device) -> np.ndarray:
    """Forward every image in order; float32 numpy out. Autocast (bf16) on CUDA, float32 on CPU."""
    out = []
    for lo in range(0, len(images), batch_size):
        x = torch.stack([images[i] for i in range(lo, min(lo + batch_size, len(images)))]).to(device)
        if device.type == "cuda":
            x = x.to(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                f = body(x)
        else:
            f = body(x)
        out.append(f.float().cpu().numpy())
    return np.concatenate(out)


def extract_shard(store: RunStore, cfg: PipelineConfig, r: int, shard: int) -> int:
    """Features of one image shard, written as one zarr shard; returns the number of rows written (0 if done)."""
    unit = unit_name(shard)
    if store.is_done(STAGE, r, unit):
        return 0
    manifest = load_manifest(store)
    rows = manifest[manifest["shard"] == shard]
    lo, hi = int(rows["image_id"].iloc[0]), int(rows["image_id"].iloc[-1]) + 1
    device = resolve_device(cfg.runtime.device)
    body = load_round_model(store, cfg, r, device)
    images = ImageList(rows["uri"].tolist(), clustering_view(cfg.data.image_size, cfg.data.crop_ratio))
    feats = compute_features(body, images, cfg.extract.batch_size, device)
    array = open_features(store, r, mode="r+")
    array[lo:hi] = feats.astype(np.float16)
    store.mark_done(STAGE, r, unit, {"rows": [lo, hi]})
    return hi - lo


def open_features(store: RunStore, r: int, mode: str = "r") -> zarr.Array:
    return zarr.open_array(store.url(features_rel(r)), mode=mode, storage_options=store.storage_options or None)


def finalize_extract(store: RunStore, r: int) -> dict[str, int]:
    """Check every shard is recorded, then mark the stage done."""
    manifest = load_manifest(store)
    missing = [s for s in shard_ids(manifest) if not store.is_done(STAGE, r, unit_name(s))]
    if missing:
        raise StoreError(f"extract round {r}: shards {missing[:5]} are not done; rerun the extract stage")
    shape = open_features(store, r).shape
    info = {"images": int(shape[0]), "dim": int(shape[1]), "shards": len(shard_ids(manifest))}
    store.mark_stage_done(STAGE, r, info)
    return info


def run_extract_stage(store: RunStore, cfg: PipelineConfig, r: int, force: bool = False) -> dict[str, int]:
    """The whole stage in this process (the Prefect flow fans ``extract_shard`` out over Dask instead)."""
    if not force and store.stage_done(STAGE, r):
        return store.done_record(STAGE, r, "_stage")
    for shard in prepare_extract(store, cfg, r, force=force):
        extract_shard(store, cfg, r, shard)
    return finalize_extract(store, r)

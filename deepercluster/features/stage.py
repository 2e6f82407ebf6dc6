"""The extract stage: features of every image with the round's model -> ``rounds/<r>/features.zarr``.

Unit of work: one image shard (shard ``s`` = manifest rows with ``shard == s``, contiguous image ids). A worker
decodes the shard's images in threads while it runs the forward pass batch by batch, then writes the shard's rows
in one assignment (one zarr shard) and only then its completion record: a killed worker or flow loses only the
shards in flight, and a rerun skips shards that have a record.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import torch

from deepercluster.config import PipelineConfig
from deepercluster.data.shard import MANIFEST, load_manifest, shard_ids
from deepercluster.device import resolve_device
from deepercluster.errors import StoreError
from deepercluster.features.array import create_features, features_group_rel, open_features, seal_features
from deepercluster.features.loader import BatchLoader, HostView
from deepercluster.features.model import FeatureModel, ensure_round_model, feature_dim, load_round_model, model_rel
from deepercluster.store import RunStore

STAGE = "extract"


def unit_name(shard: int) -> str:
    return f"shard-{shard:05d}"


def prepare_extract(store: RunStore, cfg: PipelineConfig, r: int, force: bool = False) -> list[int]:
    """Create the round model and the feature array if needed; return the shards still to extract."""
    if force:
        store.reset_stage(STAGE, r)
        store.remove(features_group_rel(r))
    ensure_round_model(store, cfg, r)
    shards = store.read_parquet(MANIFEST, columns=["shard"])["shard"]
    attrs = {"round": r, "arch": cfg.model.arch, "layer": cfg.extract.layer, "image_size": cfg.data.image_size,
             "crop_ratio": cfg.data.crop_ratio, "config_hash": cfg.hash}
    create_features(store, r, len(shards), feature_dim(store, cfg, r), cfg.data.shard_size, attrs)
    done = set(store.done_units(STAGE, r))
    return [s for s in sorted(int(s) for s in shards.unique()) if unit_name(s) not in done]


def shard_rows(store: RunStore, shard: int) -> tuple[int, int, list[str]]:
    """First row, end row and image URIs of one shard (reads only the manifest row groups that hold it)."""
    rows = pd.read_parquet(store.url(MANIFEST), columns=["image_id", "uri"], filters=[("shard", "==", shard)],
                           storage_options=store.storage_options or None)
    if rows.empty:
        raise StoreError(f"shard {shard} is not in {store.url(MANIFEST)}")
    ids = rows["image_id"].to_numpy()
    lo, hi = int(ids[0]), int(ids[-1]) + 1
    if hi - lo != len(ids) or not np.all(np.diff(ids) == 1):
        raise StoreError(f"shard {shard} of {store.url(MANIFEST)} is not a contiguous run of image ids: "
                         "rerun the shard stage with --force")
    return lo, hi, rows["uri"].tolist()


def extract_rows(model: FeatureModel, uris: list[str], cfg: PipelineConfig) -> np.ndarray:
    """Features (float16, manifest order) of ``uris``: decoding in threads overlaps the batched forward pass; on
    CUDA the copy of batch k back to the host overlaps the forward pass of batch k + 1."""
    view = HostView(cfg.data.image_size, cfg.data.crop_ratio)
    loader = BatchLoader(uris, view, cfg.extract.batch_size, cfg.extract.decode_threads, cfg.extract.prefetch_batches,
                         on_device_normalise=model.cuda)
    out: np.ndarray | None = None
    pending: tuple[int, torch.Tensor, torch.cuda.Event | None] | None = None

    def land(lo: int, f: torch.Tensor, copied: torch.cuda.Event | None) -> None:
        nonlocal out
        if copied is not None:
            copied.synchronize()  # the asynchronous copy of this batch to the host is complete
        if out is None:
            out = np.empty((len(uris), f.shape[1]), dtype=np.float16)
        out[lo : lo + len(f)] = f.numpy()

    for lo, batch in loader:
        f = model(batch)
        copied = None
        if model.cuda:
            f = f.to("cpu", non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
        if pending is not None:
            land(*pending)
        pending = (lo, f, copied)
    if pending is not None:
        land(*pending)
    assert out is not None
    return out


def extract_shard(store: RunStore, cfg: PipelineConfig, r: int, shard: int) -> int:
    """Features of one image shard, written as one zarr shard; returns the number of rows written (0 if done)."""
    unit = unit_name(shard)
    if store.is_done(STAGE, r, unit):
        return 0
    start = time.perf_counter()
    lo, hi, uris = shard_rows(store, shard)
    device = resolve_device(cfg.runtime.device)
    feats = extract_rows(load_round_model(store, cfg, r, device), uris, cfg)
    open_features(store, r, mode="r+")[lo:hi] = feats  # the whole zarr shard in one assignment
    store.mark_done(STAGE, r, unit, {"rows": [lo, hi], "device": str(device),
                                    "seconds": round(time.perf_counter() - start, 3)})
    return hi - lo


def finalize_extract(store: RunStore, r: int) -> dict[str, int]:
    """Check every shard is recorded, consolidate the array's metadata, then mark the stage done."""
    manifest = load_manifest(store)
    missing = [s for s in shard_ids(manifest) if not store.is_done(STAGE, r, unit_name(s))]
    if missing:
        raise StoreError(f"extract round {r}: shards {missing[:5]} are not done; rerun the extract stage")
    shape = open_features(store, r, mode="r+").shape
    info = {"images": int(shape[0]), "dim": int(shape[1]), "shards": len(shard_ids(manifest))}
    seal_features(store, r, {**info, "model_signature": store.signature(model_rel(r))})
    store.mark_stage_done(STAGE, r, info)
    return info


def run_extract_stage(store: RunStore, cfg: PipelineConfig, r: int, force: bool = False) -> dict[str, int]:
    """The whole stage in this process (the Prefect flow fans ``extract_shard`` out over Dask instead)."""
    if not force and store.stage_done(STAGE, r):
        return store.done_record(STAGE, r, "_stage")
    for shard in prepare_extract(store, cfg, r, force=force):
        extract_shard(store, cfg, r, shard)
    return finalize_extract(store, r)

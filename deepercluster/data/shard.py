"""The shard stage: an image folder -> ``data/manifest.parquet`` (kept images) + ``data/rejects.parquet``.

Three steps, each resumable:
1. ``list_source``: the sorted listing of the source is written once to ``data/listing.parquet`` and cut into parts.
2. ``scan_part``: each part's files are read, decoded and hashed; one parquet per part, then a completion record.
3. ``finalize_manifest``: parts are merged, exact duplicates (same content hash) are kept once, and the kept images
   are numbered and cut into shards of ``shard_size`` rows, so that image shard ``s`` is exactly zarr shard ``s``.
"""

from __future__ import annotations

import os

import fsspec
import pandas as pd

from deepercluster.config import DataConfig
from deepercluster.data.digits import resolve_source
from deepercluster.data.images import IMAGE_SUFFIXES, probe
from deepercluster.errors import ConfigError
from deepercluster.store import RunStore

STAGE = "shard"
PART_SIZE = 512
LISTING = "data/listing.parquet"
MANIFEST = "data/manifest.parquet"
REJECTS = "data/rejects.parquet"


def part_name(i: int) -> str:
    return f"part-{i:05d}"


def list_folder(source: str) -> pd.DataFrame:
    """Every file under ``source`` (sorted); the first sub-folder level, when present, is the label."""
    fs, root = fsspec.core.url_to_fs(source)
    if not fs.isdir(root):
        raise ConfigError(f"image folder {source!r} does not exist")
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    rows = []
    for path in sorted(fs.find(root)):
        name = os.path.basename(path)
        if name.startswith(".") or name.startswith("_"):
            continue
        rel = path[len(root) :].lstrip("/")
        label = rel.split("/", 1)[0] if "/" in rel else None
        uri = path if protocol in ("file", "local") else f"{protocol}://{path}"
        rows.append({"uri": uri, "label": label, "suffix": os.path.splitext(name)[1].lower()})
    df = pd.DataFrame(rows, columns=["uri", "label", "suffix"])
    if df.empty:
        raise ConfigError(f"image folder {source!r} holds no files")
    return df


def list_source(store: RunStore, cfg: DataConfig) -> list[str]:
    """Write the listing once (it is the input of every part) and return the names of its parts."""
    if not store.exists(LISTING):
        listing = list_folder(resolve_source(cfg.source))
        if cfg.limit:
            listing = listing.iloc[: cfg.limit]
        store.write_parquet(LISTING, listing)
    n = len(store.read_parquet(LISTING, columns=["uri"]))
    return [part_name(i) for i in range(-(-n // PART_SIZE))]


def scan_part(store: RunStore, cfg: DataConfig, part: str) -> dict[str, int]:
    """Probe every file of one part; write ``data/parts/<part>.parquet`` and its completion record."""
    if store.is_done(STAGE, None, part):
        return store.done_record(STAGE, None, part)["counts"]
    i = int(part.rsplit("-", 1)[1])
    listing = store.read_parquet(LISTING).iloc[i * PART_SIZE : (i + 1) * PART_SIZE]
    rows = []
    for uri, label, suffix in listing.itertuples(index=False):
        if suffix not in IMAGE_SUFFIXES:
            rows.append({"uri": uri, "label": label, "width": 0, "height": 0, "nbytes": 0, "sha256": "",
                         "reject": "not an image"})
            continue
        p = probe(uri, cfg.max_pixels)
        rows.append({"uri": uri, "label": label, "width": p.width, "height": p.height, "nbytes": p.nbytes,
                     "sha256": p.sha256, "reject": p.reject})
    df = pd.DataFrame(rows)
    store.write_parquet(f"data/parts/{part}.parquet", df)
    counts = {"kept": int(df["reject"].isna().sum()), "rejected": int(df["reject"].notna().sum())}
    store.mark_done(STAGE, None, part, {"counts": counts})
    return counts


def finalize_manifest(store: RunStore, cfg: DataConfig) -> dict[str, int]:
    """Merge the parts into the manifest and the rejects; number kept images and cut them into shards."""
    parts = list_source(store, cfg)
    frames = [store.read_parquet(f"data/parts/{p}.parquet") for p in parts]
    scanned = pd.concat(frames, ignore_index=True)
    kept = scanned[scanned["reject"].isna()]
    duplicate = kept["sha256"].duplicated(keep="first")
    rejects = pd.concat([scanned[scanned["reject"].notna()], kept[duplicate].assign(reject="duplicate")])
    manifest = kept[~duplicate].drop(columns=["reject"]).reset_index(drop=True)
    if manifest.empty:
        raise ConfigError(f"no readable image in {cfg.source!r} ({len(rejects)} rejected): see {REJECTS}")
    manifest.insert(0, "image_id", range(len(manifest)))
    manifest.insert(2, "shard", manifest["image_id"] // cfg.shard_size)
    classes = sorted(manifest["label"].dropna().unique())
    manifest["label_id"] = manifest["label"].map({c: i for i, c in enumerate(classes)}).astype("Int64")
    store.write_parquet(MANIFEST, manifest)
    store.write_parquet(REJECTS, rejects[["uri", "reject"]].rename(columns={"reject": "reason"}))
    info = {"images": len(manifest), "rejects": len(rejects), "shards": int(manifest["shard"].max()) + 1,
            "classes": len(classes)}
    store.mark_stage_done(STAGE, None, info)
    return info


def run_shard_stage(store: RunStore, cfg: DataConfig, force: bool = False) -> dict[str, int]:
    """The whole stage in this process (the Prefect flow fans ``scan_part`` out over Dask instead)."""
    if force:
        reset_shard_stage(store)
    elif store.stage_done(STAGE, None):
        return store.done_record(STAGE, None, "_stage")
    for part in list_source(store, cfg):
        scan_part(store, cfg, part)
    return finalize_manifest(store, cfg)


def reset_shard_stage(store: RunStore) -> None:
    store.reset_stage(STAGE, None)
    for rel in (LISTING, MANIFEST, REJECTS, "data/parts"):
        store.remove(rel)


def load_manifest(store: RunStore) -> pd.DataFrame:
    return store.read_parquet(MANIFEST)


def shard_ids(manifest: pd.DataFrame) -> list[int]:
    return sorted(int(s) for s in manifest["shard"].unique())

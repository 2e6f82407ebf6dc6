"""The shard stage: a data source -> ``data/manifest.parquet`` (kept images) + ``data/rejects.parquet``.

Three steps, each resumable, none holding the whole listing in memory:
1. ``list_source`` streams the source (folder, file list, YFCC100M metadata, webdataset tars) into listing parts
   ``data/listing/part-XXXXX.parquet`` of ``part_size`` rows, then writes ``data/listing/_complete.json``.
2. ``scan_part`` reads, decodes and hashes the files of one listing part (one Dask task per part) into
   ``data/parts/<part>.parquet``, then records the part as done.
3. ``finalize_manifest`` drops exact duplicates (same content hash, first in listing order kept) by an external
   hash-bucketed pass, numbers the kept images and streams them into the manifest in row groups of whole shards,
   so that image shard ``s`` (rows with ``shard == s``) is exactly zarr shard ``s``.
4. With ``data.repack``, ``repack_shard`` copies each image shard's files into one webdataset tar
   (:mod:`deepercluster.data.repack`); ``finalize_shard_stage`` then marks the stage done.

Every entry the source yields is accounted for: it is a manifest row or a rejects row, whose reason is one of
:data:`REJECT_REASONS` (reason -> meaning; :func:`reason_key` maps a reason with a detail back to its key), so
``images + rejects`` of the stage's record is the number of entries listed.
"""

from __future__ import annotations

import tempfile
from collections import Counter, defaultdict

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from deepercluster.config import DataConfig
from deepercluster.data.images import REJECT_REASONS, probe, reason_key  # noqa: F401  (the rejects' vocabulary)
from deepercluster.data.parquet_stream import ParquetStream, read_table, write_table
from deepercluster.data.repack import PACKED, finalize_repack
from deepercluster.data.sources import extra_columns, iter_source, source_kind
from deepercluster.errors import ConfigError
from deepercluster.paths import LISTING, LISTING_DONE, MANIFEST, PARTS, REJECTS  # noqa: F401  (re-exported)
from deepercluster.store import RunStore

STAGE = "shard"
MANIFEST_UNIT = "manifest"  # the completion record of the manifest (the stage's waits for repacking, if any)
BUCKET_ROWS = 1 << 18  # hashes held at once by the duplicate search
MAX_BUCKETS = 512
ROW_GROUP_ROWS = 1 << 16  # manifest row groups: about this many rows, always whole shards
PROBE_FIELDS = {"width": pa.int64(), "height": pa.int64(), "nbytes": pa.int64(), "sha256": pa.string()}
ARROW_TYPES = {"int64": pa.int64(), "float64": pa.float64(), "string": pa.string()}


def part_name(i: int) -> str:
    return f"part-{i:05d}"


def listing_schema(kind: str) -> pa.Schema:
    base = [("uri", pa.string()), ("label", pa.string()), ("reject", pa.string())]
    return pa.schema(base + [(c, ARROW_TYPES[t]) for c, t in extra_columns(kind).items()])


def manifest_schema(kind: str) -> pa.Schema:
    fields = [("image_id", pa.int64()), ("uri", pa.string()), ("shard", pa.int64()), ("label", pa.string()),
              *PROBE_FIELDS.items(), ("label_id", pa.int64())]
    return pa.schema(fields + [(c, ARROW_TYPES[t]) for c, t in extra_columns(kind).items()])


REJECTS_SCHEMA = pa.schema([("uri", pa.string()), ("reason", pa.string())])  # reason: see REJECT_REASONS


# ---- 1. listing ---------------------------------------------------------------------------------------------------
def list_source(store: RunStore, cfg: DataConfig) -> list[str]:
    """Stream the source into listing parts once (a killed listing starts over) and return the part names."""
    if not store.exists(LISTING_DONE):
        kind = source_kind(cfg)
        schema = listing_schema(kind)
        rows: list[dict] = []
        n = parts = 0
        for row in iter_source(cfg):
            rows.append(row)
            n += 1
            if len(rows) == cfg.part_size:
                write_table(store, f"{LISTING}/{part_name(parts)}.parquet", pa.Table.from_pylist(rows, schema))
                rows, parts = [], parts + 1
            if cfg.limit and n >= cfg.limit:
                break
        if rows:
            write_table(store, f"{LISTING}/{part_name(parts)}.parquet", pa.Table.from_pylist(rows, schema))
            parts += 1
        if n == 0:
            raise ConfigError(f"data source {cfg.source!r} lists no image")
        store.write_json(LISTING_DONE, {"kind": kind, "rows": n, "parts": parts, "part_size": cfg.part_size,
                                        "signature": source_signature(cfg)})
    return [part_name(i) for i in range(store.read_json(LISTING_DONE)["parts"])]


def source_signature(cfg: DataConfig) -> dict | None:
    """A cheap signature of the source, to notice it changed after the listing: a file's size and modification
    time; a local folder's and its immediate sub-folders' modification times and entry counts (what adding or
    removing an image in a class folder changes). None where it is not cheap (remote folders)."""
    import os

    from deepercluster.data.digits import resolve_source

    source = resolve_source(cfg.source)
    if "://" in source or "{" in source or not os.path.exists(source):
        return None
    if os.path.isfile(source):
        st = os.stat(source)
        return {"size": st.st_size, "mtime": st.st_mtime}
    folders = [source] + sorted(e.path for e in os.scandir(source) if e.is_dir(follow_symlinks=False))
    out = {}
    for folder in folders:
        try:
            out[os.path.relpath(folder, source)] = [os.stat(folder).st_mtime, len(os.listdir(folder))]
        except OSError:
            continue
    return out


def source_change(store: RunStore, cfg: DataConfig) -> str | None:
    """One line when the source no longer looks as it did when the shard stage listed it (None otherwise): the
    manifest is a snapshot, so new or removed images are not in the run until the shard stage runs again."""
    if not store.exists(LISTING_DONE):
        return None
    then = store.read_json(LISTING_DONE).get("signature")
    if then is None:
        return None
    now = source_signature(cfg)
    if now is None or now == then:  # None: not reachable from here (another machine): nothing to tell
        return None
    return (f"the source {cfg.source} changed since the shard stage listed it ({store.read_json(LISTING_DONE)['rows']}"
            " entries then): this run keeps that snapshot; `deepercluster stage shard --run RUN --force` takes the "
            "new files in (and makes every later stage stale)")


# ---- 2. scanning --------------------------------------------------------------------------------------------------
def scan_part(store: RunStore, cfg: DataConfig, part: str) -> dict[str, int]:
    """Probe every file of one listing part; write ``data/parts/<part>.parquet`` and its completion record."""
    if store.is_done(STAGE, None, part):
        return store.done_record(STAGE, None, part)["counts"]
    listing = read_table(store, f"{LISTING}/{part}.parquet")
    probed: dict[str, list] = {name: [] for name in PROBE_FIELDS}
    rejects = []
    for uri, reject in zip(listing["uri"].to_pylist(), listing["reject"].to_pylist(), strict=True):
        p = probe(uri, cfg.max_pixels, cfg.min_side, cfg.max_side, cfg.max_aspect) if reject is None else None
        for name in PROBE_FIELDS:
            probed[name].append(getattr(p, name) if p else (0 if name != "sha256" else ""))
        rejects.append(p.reject if p else reject)
    table = listing.drop_columns(["reject"])
    for name, typ in PROBE_FIELDS.items():
        table = table.append_column(pa.field(name, typ), pa.array(probed[name], typ))
    table = table.append_column(pa.field("reject", pa.string()), pa.array(rejects, pa.string()))
    write_table(store, f"{PARTS}/{part}.parquet", table)
    kept = sum(r is None for r in rejects)
    counts = {"kept": kept, "rejected": len(rejects) - kept}
    store.mark_done(STAGE, None, part, {"counts": counts}, outputs=[f"{PARTS}/{part}.parquet"])
    return counts


# ---- 3. the manifest ----------------------------------------------------------------------------------------------
def _duplicates(store: RunStore, parts: list[str], n_kept: int) -> tuple[dict[int, set[int]], list[str]]:
    """Rows (part index -> row numbers) whose content hash was already seen earlier in listing order, and the
    sorted labels. Hashes are spread over buckets of at most ~``BUCKET_ROWS`` rows on local scratch disk, and
    one bucket at a time is searched, so memory is bounded whatever the number of images."""
    n_buckets = min(MAX_BUCKETS, max(1, -(-n_kept // BUCKET_ROWS)))
    labels: set[str] = set()
    schema = pa.schema([("sha256", pa.string()), ("part", pa.int32()), ("row", pa.int32())])
    dups: dict[int, set[int]] = defaultdict(set)
    with tempfile.TemporaryDirectory(prefix="deepercluster-dedupe-") as tmp:
        writers: dict[int, ipc.RecordBatchStreamWriter] = {}
        for i, part in enumerate(parts):
            t = read_table(store, f"{PARTS}/{part}.parquet", columns=["sha256", "label", "reject"])
            kept = t["reject"].is_null().to_numpy(zero_copy_only=False)
            rows = np.flatnonzero(kept).astype(np.int32)
            hashes = t["sha256"].filter(pa.array(kept)).to_pylist()
            labels.update(x for x in t["label"].filter(pa.array(kept)).to_pylist() if x is not None)
            bucket = np.array([int(h[:12], 16) % n_buckets for h in hashes], dtype=np.int64)
            for b in np.unique(bucket):
                sel = bucket == b
                if int(b) not in writers:
                    writers[int(b)] = ipc.new_stream(f"{tmp}/{b}.arrow", schema)
                writers[int(b)].write_batch(pa.record_batch(
                    [pa.array([h for h, s in zip(hashes, sel, strict=True) if s], pa.string()),
                     pa.array(np.full(int(sel.sum()), i, np.int32)), pa.array(rows[sel])], schema=schema))
        for w in writers.values():
            w.close()
        for b in sorted(writers):
            with pa.memory_map(f"{tmp}/{b}.arrow") as source:
                df = ipc.open_stream(source).read_all().to_pandas()
            again = df[df["sha256"].duplicated(keep="first")]
            for part_i, row in zip(again["part"].tolist(), again["row"].tolist(), strict=True):
                dups[part_i].add(row)
            del df, again
    return dups, sorted(labels)


def finalize_manifest(store: RunStore, cfg: DataConfig) -> dict:
    """Merge the parts into the manifest and the rejects (both streamed); number kept images and cut shards.
    The stage is then done, unless ``cfg.repack``: then it is done once every shard is packed."""
    info = store.done_record(STAGE, None, MANIFEST_UNIT)
    if info is None:
        info = _write_manifest(store, cfg)
        store.mark_done(STAGE, None, MANIFEST_UNIT, info, outputs=[MANIFEST, REJECTS])
    info = {k: info[k] for k in ("images", "rejects", "shards", "classes", "reasons")}
    if not cfg.repack:
        store.mark_stage_done(STAGE, None, info)
    return info


def _write_manifest(store: RunStore, cfg: DataConfig) -> dict:
    parts = list_source(store, cfg)
    missing = [p for p in parts if not store.is_done(STAGE, None, p)]
    if missing:
        raise ConfigError(f"shard: {len(missing)} listing parts are not scanned yet (first {missing[0]}): "
                          "rerun the shard stage")
    n_kept = sum(store.done_record(STAGE, None, p)["counts"]["kept"] for p in parts)
    if n_kept == 0:
        rejected = store.read_json(LISTING_DONE)["rows"]
        raise ConfigError(f"no readable image in {cfg.source!r} ({rejected} rejected): see the parts in "
                          f"{store.url(PARTS)}")
    dups, classes = _duplicates(store, parts, n_kept)
    class_ids = {c: i for i, c in enumerate(classes)}
    kind = store.read_json(LISTING_DONE)["kind"]
    schema = manifest_schema(kind)
    group = cfg.shard_size * max(1, ROW_GROUP_ROWS // cfg.shard_size)
    reasons: Counter[str] = Counter()
    next_id = 0
    with ParquetStream(store, MANIFEST, schema, group) as manifest, \
            ParquetStream(store, REJECTS, REJECTS_SCHEMA, ROW_GROUP_ROWS) as rejects:
        for i, part in enumerate(parts):
            t = read_table(store, f"{PARTS}/{part}.parquet")
            reject = t["reject"].to_pylist()
            for row in dups.get(i, ()):
                reject[row] = "duplicate"
            keep = pa.array([r is None for r in reject])
            out = t.filter(keep)
            k = out.num_rows
            ids = np.arange(next_id, next_id + k, dtype=np.int64)
            next_id += k
            out = out.append_column("image_id", pa.array(ids)).append_column(
                "shard", pa.array(ids // cfg.shard_size)).append_column(
                "label_id", pa.array([class_ids.get(x) for x in out["label"].to_pylist()], pa.int64()))
            manifest.write(out)
            bad = [(u, r) for u, r in zip(t["uri"].to_pylist(), reject, strict=True) if r is not None]
            reasons.update(r for _, r in bad)
            rejects.write(pa.table({"uri": [u for u, _ in bad], "reason": [r for _, r in bad]}, REJECTS_SCHEMA))
    info = {"images": next_id, "rejects": sum(reasons.values()), "shards": -(-next_id // cfg.shard_size),
            "classes": len(classes), "reasons": dict(sorted(reasons.items()))}
    return info


# ---- the end of the stage -----------------------------------------------------------------------------------------
def finalize_shard_stage(store: RunStore, cfg: DataConfig) -> dict:
    """After the manifest (and, with ``cfg.repack``, every packed shard): the stage's record."""
    info = finalize_manifest(store, cfg)
    if cfg.repack:
        info = {**info, "packed": finalize_repack(store, info["shards"])}
        store.mark_stage_done(STAGE, None, info)
    return info


def reset_shard_stage(store: RunStore) -> None:
    store.reset_stage(STAGE, None)
    for rel in (LISTING, PARTS, MANIFEST, REJECTS, PACKED):
        store.remove(rel)


def _typed(df: pd.DataFrame) -> pd.DataFrame:
    if "label_id" in df:
        df["label_id"] = df["label_id"].astype("Int64")
    return df


def load_manifest(store: RunStore, columns: list[str] | None = None) -> pd.DataFrame:
    """The kept images in ``image_id`` order (``label_id`` is a nullable Int64)."""
    return _typed(store.read_parquet(MANIFEST, columns=columns))


def load_manifest_shard(store: RunStore, shard: int, columns: list[str] | None = None) -> pd.DataFrame:
    """The rows of one image shard, reading only the row group that holds it (shards never straddle two)."""
    with store.fs.open(store.path(MANIFEST), "rb") as f, store.reading(MANIFEST):
        pf = pq.ParquetFile(f)
        col = pf.schema_arrow.get_field_index("shard")
        for g in range(pf.num_row_groups):
            stats = pf.metadata.row_group(g).column(col).statistics
            if stats is None or not stats.has_min_max or stats.min <= shard <= stats.max:
                t = pf.read_row_group(g, columns=None if columns is None else sorted({*columns, "shard"}))
                df = t.filter(pc.equal(t["shard"], shard)).to_pandas()
                if len(df):
                    return _typed(df[columns] if columns else df).reset_index(drop=True)
    return _typed(pd.DataFrame({c: [] for c in (columns or ["image_id", "uri", "shard"])}))


def shard_ids(manifest: pd.DataFrame) -> list[int]:
    return sorted(int(s) for s in manifest["shard"].unique())


def shard_summary(store: RunStore, sample: int = 5, seed: int = 0) -> dict:
    """What ``deepercluster inspect --shards`` shows: rows per shard, rejects per reason, a sample of rows."""
    shards = store.read_parquet(MANIFEST, columns=["shard"])["shard"]
    per_shard = shards.value_counts().sort_index()
    reasons = store.read_parquet(REJECTS, columns=["reason"])["reason"].value_counts()
    n = len(shards)
    rows = np.sort(np.random.default_rng(seed).choice(n, size=min(sample, n), replace=False))
    pieces, start = [], 0
    with store.fs.open(store.path(MANIFEST), "rb") as f:  # read only the row groups that hold sampled rows
        pf = pq.ParquetFile(f)
        for g in range(pf.num_row_groups):
            size = pf.metadata.row_group(g).num_rows
            here = rows[(rows >= start) & (rows < start + size)] - start
            if len(here):
                pieces.append(pf.read_row_group(g).take(pa.array(here)).to_pandas())
            start += size
    taken = pd.concat(pieces, ignore_index=True) if pieces else pd.DataFrame()
    return {"images": n, "per_shard": {int(k): int(v) for k, v in per_shard.items()},
            "reasons": {str(k): int(v) for k, v in reasons.items()}, "sample": taken}

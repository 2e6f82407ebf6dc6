"""Optional repacking of the kept images into webdataset ``.tar`` shards (``data.repack: true``).

Image shard ``s`` (manifest rows with ``shard == s``) becomes ``data/packed/shard-XXXXX.tar``: for each image, in
``image_id`` order, its original bytes as ``<image_id>.<ext>`` (never re-encoded) and its label as
``<image_id>.cls`` when it has one, so the tar is a plain webdataset shard. Each tar is written under a temporary
name and renamed when whole, then its completion record (the offset and size of every image in the tar) is
written. Later stages read a shard from its tar when the record exists (one sequential read instead of one open
per file: what object storage and spinning disks want), from the original files otherwise.
"""

from __future__ import annotations

import io
import tarfile

import pandas as pd
import pyarrow as pa

from deepercluster.config import DataConfig
from deepercluster.data.images import read_bytes, tar_member_uri
from deepercluster.data.parquet_stream import ParquetStream
from deepercluster.errors import StoreError
from deepercluster.paths import PACKED, PACKED_INDEX, packed_rel  # noqa: F401  (re-exported)
from deepercluster.prefetch import read_ahead
from deepercluster.store import RunStore

STAGE = "shard"  # the repack units are units of the shard stage: its stage record waits for them
INDEX_SCHEMA = pa.schema([("image_id", pa.int64()), ("uri", pa.string())])


def unit_name(shard: int) -> str:
    return f"packed-{shard:05d}"


def _ext(uri: str) -> str:
    base = uri.rsplit("::", 1)[0].rsplit("/", 1)[-1].split("@", 1)[0]
    ext = base.rsplit(".", 1)[-1].lower() if "." in base else ""
    return ext if ext.isalnum() and 0 < len(ext) <= 5 else "jpg"


def _write_tar(f, rows: pd.DataFrame, threads: int) -> tuple[list[str], list[int], list[int]]:
    names, offsets, sizes = [], [], []
    labels = rows["label"].tolist() if "label" in rows else [None] * len(rows)
    with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        items = list(zip(rows["image_id"].tolist(), rows["uri"].tolist(), labels, strict=True))
        for (image_id, uri, label), data in read_ahead(lambda item: read_bytes(item[1]), items, depth=4 * threads,
                                                       threads=threads, name="repack"):
            name = f"{image_id:010d}.{_ext(uri)}"
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tf.addfile(info, io.BytesIO(data))
            # the member's data ends the archive so far, padded to 512 bytes: it starts this far back
            offsets.append(tf.offset - -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE)
            sizes.append(len(data))
            names.append(name)
            if isinstance(label, str):
                text = label.encode()
                cls = tarfile.TarInfo(f"{image_id:010d}.cls")
                cls.size, cls.mtime, cls.mode = len(text), 0, 0o644
                tf.addfile(cls, io.BytesIO(text))
    return names, offsets, sizes


def repack_shard(store: RunStore, cfg: DataConfig, shard: int, threads: int = 4) -> int:
    """Pack one image shard into its tar (atomically) and record where each image lies; returns the images
    packed (0 if the shard was packed already)."""
    from deepercluster.data.shard import load_manifest_shard

    unit = unit_name(shard)
    if store.is_done(STAGE, None, unit):
        return 0
    rows = load_manifest_shard(store, shard, columns=["image_id", "uri", "label"])
    if rows.empty:
        raise StoreError(f"shard {shard} is not in the manifest of {store.url()}: rerun the shard stage")
    with store.open_atomic(packed_rel(shard)) as f:
        names, offsets, sizes = _write_tar(f, rows, threads)
    first = int(rows["image_id"].iloc[0])
    store.mark_done(STAGE, None, unit, {"tar": packed_rel(shard), "first_id": first, "names": names,
                                         "offsets": offsets, "sizes": sizes})
    return len(rows)


def packed_uris(store: RunStore, shard: int) -> list[str] | None:
    """The tar member URIs of a packed shard's images in ``image_id`` order, or None if it is not packed."""
    record = store.done_record(STAGE, None, unit_name(shard))
    if record is None:
        return None
    url = store.url(record["tar"])
    return [tar_member_uri(url, n, o, s) for n, o, s in
            zip(record["names"], record["offsets"], record["sizes"], strict=True)]


def finalize_repack(store: RunStore, n_shards: int) -> int:
    """Check every shard is packed and write the index (image_id -> packed uri); returns the images packed."""
    missing = [s for s in range(n_shards) if not store.is_done(STAGE, None, unit_name(s))]
    if missing:
        raise StoreError(f"repack: shards {missing[:5]} are not packed yet: rerun the shard stage")
    n = 0
    with ParquetStream(store, PACKED_INDEX, INDEX_SCHEMA, 1 << 16) as index:
        for s in range(n_shards):
            record = store.done_record(STAGE, None, unit_name(s))
            uris = packed_uris(store, s) or []
            ids = list(range(record["first_id"], record["first_id"] + len(uris)))
            index.write(pa.table({"image_id": ids, "uri": uris}, INDEX_SCHEMA))
            n += len(uris)
    return n


def image_uris(store: RunStore, manifest: pd.DataFrame) -> list[str]:
    """The URIs to read the images of ``manifest`` (rows with ``image_id`` and ``uri``) from: their packed tar
    member when the run's images are repacked (the index exists), their original location otherwise."""
    if not store.exists(PACKED_INDEX):
        return manifest["uri"].tolist()
    index = store.read_parquet(PACKED_INDEX).set_index("image_id")["uri"]
    packed = index.reindex(manifest["image_id"].to_numpy())
    if packed.isna().any():
        raise StoreError(f"{store.url(PACKED_INDEX)} does not cover every image of the manifest: rerun the shard "
                         "stage with --force")
    return packed.tolist()

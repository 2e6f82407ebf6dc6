"""The run store: where every artifact of a run lives, atomic writes, and unit completion records.

A run is one root, a local path or any fsspec URL (``s3://bucket/run``, ``memory://run``)::

    <run>/config.yaml                      resolved config + hash
    <run>/data/manifest.parquet            kept images; <run>/data/rejects.parquet: refused inputs
    <run>/rounds/<r>/model.pt              body weights the round starts from
    <run>/rounds/<r>/features.zarr         zarr group, array "features": N x D float16, one zarr shard per image shard
    <run>/rounds/<r>/clusters/             pca.npz, centroids, assignments.parquet, stats.json
    <run>/rounds/<r>/train/                checkpoint.pt, final.pt, log.jsonl
    <run>/rounds/<r>/eval/metrics.json
    <run>/history.parquet

Remote stores: the storage options of a non-local URI come from, in order of precedence, the ``storage_options``
argument, ``$DEEPERCLUSTER_STORAGE_OPTIONS`` (a JSON object) and, for ``s3://``, an endpoint from
``$DEEPERCLUSTER_S3_ENDPOINT_URL``, ``$AWS_ENDPOINT_URL_S3`` or ``$AWS_ENDPOINT_URL`` (MinIO, moto). Credentials
come from the usual ``AWS_*`` variables. The environment reaches Dask workers and torchrun ranks, which reopen the
store from its URI. Directory listings are not cached for remote stores: other processes write completion records.

Completion: when a unit of work (an image shard, a super-cluster, a checkpoint interval...) is whole, a small JSON
record is written under ``<scope>/_done/<stage>/<unit>.json``. A stage skips the units that have one. Every file is
written to a temporary name and renamed when whole, so a killed process leaves either the old file or the new one.
"""

from __future__ import annotations

import io
import json
import os
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, BinaryIO

import fsspec
import numpy as np
import pandas as pd
from fsspec.implementations.local import LocalFileSystem

from deepercluster.errors import StoreError
from deepercluster.paths import round_dir  # noqa: F401  (re-exported)

DATA_STAGES = ("shard",)
ROUND_STAGES = ("extract", "cluster", "train", "evaluate")
STAGES = DATA_STAGES + ROUND_STAGES
STAGE_DONE = "_stage"
TMP_PREFIX = ".tmp-"  # a write in progress (or left by a killed process): never a completion record
STORAGE_OPTIONS_ENV = "DEEPERCLUSTER_STORAGE_OPTIONS"
S3_ENDPOINT_ENVS = ("DEEPERCLUSTER_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
LOCAL_PROTOCOLS = ("file", "local")
PARQUET_ROWS = 1 << 18  # rows per parquet row group written (a part of 8 int64 columns: 16 MiB)


class RunStore:
    """One run's artifacts, addressed by paths relative to the run root."""

    def __init__(self, uri: str | os.PathLike[str], storage_options: dict[str, Any] | None = None):
        uri = os.fspath(uri)
        self.storage_options = resolve_storage_options(uri, storage_options)
        try:
            self.fs, root = fsspec.core.url_to_fs(uri, **self.storage_options)
        except ImportError as err:
            raise StoreError(f"cannot open run store {uri}: {err} (for s3:// install deepercluster[s3])") from None
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self.root = root.rstrip("/")
        self.uri = os.path.abspath(uri) if self.is_local else uri.rstrip("/")

    def __repr__(self) -> str:
        return f"RunStore({self.uri!r})"

    def __reduce__(self):  # pickles as its URI: safe to send to Dask workers and subprocesses
        return (RunStore, (self.uri, self.storage_options))

    # ---- addressing -------------------------------------------------------------------------------------------
    def path(self, rel: str = "") -> str:
        """Path in the store's filesystem (what ``self.fs`` understands)."""
        return f"{self.root}/{rel}" if rel else self.root

    def url(self, rel: str = "") -> str:
        """Full URL (or absolute local path) for libraries that take one: zarr, pandas, torch."""
        return f"{self.uri}/{rel}" if rel else self.uri

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def signature(self, rel: str) -> str:
        """Changes whenever the file at ``rel`` is rewritten (size + modification stamp); for caches."""
        info = self.fs.info(self.path(rel))
        keys = ("size", "mtime", "ETag", "LastModified", "created")
        return ";".join(f"{k}={info[k]}" for k in keys if k in info)

    def listdir(self, rel: str) -> list[str]:
        """Names (not paths) directly under ``rel``; empty when it does not exist."""
        p = self.path(rel)
        if not self.fs.exists(p):
            return []
        return sorted(os.path.basename(e.rstrip("/")) for e in self.fs.ls(p, detail=False))

    # ---- atomic writes and reads ------------------------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write ``data`` to a temporary name beside ``rel`` then rename it: readers see all or nothing."""
        with self.open_atomic(rel) as f:
            f.write(data)

    @contextmanager
    def open_atomic(self, rel: str) -> Iterator[BinaryIO]:
        """A file to stream ``rel`` into: written under a temporary name beside it (synced to disk when local),
        renamed to ``rel`` when the block ends, removed if it raises. Readers see all or nothing."""
        final = self.path(rel)
        parent = final.rsplit("/", 1)[0]
        tmp = f"{parent}/{TMP_PREFIX}{uuid.uuid4().hex}-{final.rsplit('/', 1)[1]}"
        self.fs.makedirs(parent, exist_ok=True)
        try:
            with self.fs.open(tmp, "wb") as f:
                yield f
                if self.is_local:
                    f.flush()
                    os.fsync(f.fileno())
            if self.is_local:
                os.replace(tmp, final)
            else:
                self.fs.mv(tmp, final)
        except BaseException:
            if self.fs.exists(tmp):
                self.fs.rm(tmp)
            raise

    def read_bytes(self, rel: str) -> bytes:
        try:
            return self.fs.cat_file(self.path(rel))
        except FileNotFoundError:
            raise self._missing(rel) from None

    def _missing(self, rel: str) -> StoreError:
        return StoreError(f"{self.url(rel)} is missing: run the stage that makes it first")

    def _open_existing(self, rel: str) -> BinaryIO:
        """``rel`` opened for reading; a clear error when it does not exist."""
        try:
            return self.fs.open(self.path(rel), "rb")
        except FileNotFoundError:
            raise self._missing(rel) from None

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=2, sort_keys=True, default=_json_default).encode())

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def write_npy(self, rel: str, array: np.ndarray) -> None:
        buf = io.BytesIO()
        np.save(buf, array)
        self.write_bytes(rel, buf.getvalue())

    def read_npy(self, rel: str) -> np.ndarray:
        return np.load(io.BytesIO(self.read_bytes(rel)), allow_pickle=False)

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode())

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode()

    def write_parquet(self, rel: str, data: pd.DataFrame | Mapping[str, np.ndarray]) -> None:
        """A data frame (its index dropped) or equal-length columns as parquet, converted and written one row group
        at a time: columns given as arrays are never copied whole."""
        n = len(data) if isinstance(data, pd.DataFrame) else len(next(iter(data.values())))

        def part(lo: int) -> pd.DataFrame:
            if isinstance(data, pd.DataFrame):
                return data.iloc[lo : lo + PARQUET_ROWS]
            return pd.DataFrame({name: column[lo : lo + PARQUET_ROWS] for name, column in data.items()})

        self.write_parquet_parts(rel, (part(lo) for lo in range(0, max(n, 1), PARQUET_ROWS)))

    def write_parquet_parts(self, rel: str, parts: Iterable[pd.DataFrame]) -> None:
        """Data frames with the same columns and dtypes, streamed into one parquet file (a row group each, index
        dropped, atomically): only one part is ever held in Arrow form, so a table larger than memory can be
        written part by part."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        with self.open_atomic(rel) as f:
            writer = None
            try:
                for part in parts:
                    table = pa.Table.from_pandas(part, preserve_index=False)
                    if writer is None:
                        writer = pq.ParquetWriter(f, table.schema)
                    writer.write_table(table)
            finally:  # also when a part fails: the writer lets go of the file before it is removed
                if writer is not None:
                    writer.close()
            if writer is None:
                raise ValueError(f"no data frame to write to {rel}")

    def iter_parquet(self, rel: str, columns: list[str] | None = None) -> Iterator[pd.DataFrame]:
        """The parquet file ``rel`` row group by row group (only ``columns`` when given)."""
        import pyarrow.parquet as pq

        with self._open_existing(rel) as f:
            reader = pq.ParquetFile(f)
            for group in range(reader.num_row_groups):
                yield reader.read_row_group(group, columns=columns).to_pandas()

    def read_parquet(self, rel: str, columns: list[str] | None = None) -> pd.DataFrame:
        """The parquet file ``rel`` (only ``columns`` when given: the others are not read)."""
        with self._open_existing(rel) as f:
            return pd.read_parquet(f, columns=columns)

    def save_torch(self, rel: str, obj: Any) -> None:
        """``torch.save`` streamed into an atomic write (no in-memory copy of a large state)."""
        import torch

        with self.open_atomic(rel) as f:
            torch.save(obj, f)

    def load_torch(self, rel: str) -> Any:
        import torch

        return torch.load(io.BytesIO(self.read_bytes(rel)), map_location="cpu", weights_only=True)

    def remove(self, rel: str) -> None:
        p = self.path(rel)
        if self.fs.exists(p):
            self.fs.rm(p, recursive=True)

    # ---- completion records -----------------------------------------------------------------------------------
    @staticmethod
    def scope(stage: str, r: int | None) -> str:
        """The folder a stage's records live under: ``data`` for the data stages, else its round's."""
        if stage in DATA_STAGES:
            return "data"
        if r is None:
            raise StoreError(f"stage {stage!r} needs a round")
        return round_dir(r)

    def _record(self, stage: str, r: int | None, unit: str) -> str:
        return f"{self.scope(stage, r)}/_done/{stage}/{unit}.json"

    def lineage_rel(self, stage: str, r: int | None) -> str:
        """Where the lineage (fingerprint) of a stage's current outputs is kept (see ``stages.lineage``)."""
        return f"{self.scope(stage, r)}/_lineage/{stage}.json"

    def fingerprint(self, stage: str, r: int | None) -> str | None:
        """The fingerprint of the lineage the stage's outputs are being made under (None before the stage ran)."""
        rel = self.lineage_rel(stage, r)
        return self.read_json(rel)["fingerprint"] if self.exists(rel) else None

    def mark_done(self, stage: str, r: int | None, unit: str, info: dict[str, Any] | None = None) -> None:
        """Write a unit's completion record: a fresh ``id`` (what later stages' fingerprints name) and the
        fingerprint of the stage's lineage when there is one."""
        record = {"unit": unit, "id": uuid.uuid4().hex, "finished_at": time.time(), "pid": os.getpid(),
                  **(info or {})}
        fingerprint = self.fingerprint(stage, r)
        if fingerprint:
            record["fingerprint"] = fingerprint
        self.write_json(self._record(stage, r, unit), record)

    def is_done(self, stage: str, r: int | None, unit: str) -> bool:
        return self.exists(self._record(stage, r, unit))

    def done_record(self, stage: str, r: int | None, unit: str) -> dict[str, Any] | None:
        return self.read_json(self._record(stage, r, unit)) if self.is_done(stage, r, unit) else None

    def done_units(self, stage: str, r: int | None) -> list[str]:
        """Units of ``stage`` that have a completion record (the stage record excluded)."""
        names = self.listdir(f"{self.scope(stage, r)}/_done/{stage}")
        return [n[:-5] for n in names
                if n.endswith(".json") and n != f"{STAGE_DONE}.json" and not n.startswith(TMP_PREFIX)]

    def stage_done(self, stage: str, r: int | None) -> bool:
        return self.is_done(stage, r, STAGE_DONE)

    def mark_stage_done(self, stage: str, r: int | None, info: dict[str, Any] | None = None) -> None:
        self.mark_done(stage, r, STAGE_DONE, info)

    def reset_stage(self, stage: str, r: int | None) -> None:
        """Forget every completion record of a stage and its lineage (``--force``): its units will be recomputed."""
        self.remove(f"{self.scope(stage, r)}/_done/{stage}")
        self.remove(self.lineage_rel(stage, r))


def _protocol(uri: str) -> str:
    protocol = fsspec.core.split_protocol(uri)[0] or "file"
    return protocol.split("::")[0]


def _env_storage_options() -> dict[str, Any]:
    text = os.environ.get(STORAGE_OPTIONS_ENV, "").strip()
    if not text:
        return {}
    try:
        opts = json.loads(text)
    except json.JSONDecodeError as err:
        raise StoreError(f"${STORAGE_OPTIONS_ENV} is not valid JSON ({err.msg}): give an object such as "
                         '{"endpoint_url": "http://localhost:9000"}') from None
    if not isinstance(opts, dict):
        raise StoreError(f"${STORAGE_OPTIONS_ENV} must be a JSON object, got {type(opts).__name__}")
    return opts


def resolve_storage_options(uri: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The fsspec options a store at ``uri`` is opened with: ``storage_options`` over the environment's (see the
    module docstring); none for a local path."""
    if _protocol(uri) in LOCAL_PROTOCOLS:
        return dict(storage_options or {})
    opts: dict[str, Any] = {"use_listings_cache": False, **_env_storage_options()}
    if _protocol(uri) in ("s3", "s3a") and "endpoint_url" not in opts and "endpoint_url" not in opts.get(
            "client_kwargs", {}):
        endpoint = next((os.environ[k] for k in S3_ENDPOINT_ENVS if os.environ.get(k)), None)
        if endpoint:
            opts["endpoint_url"] = endpoint
    opts.update(storage_options or {})
    return opts


def export_storage_options(storage_options: dict[str, Any]) -> None:
    """Make ``storage_options`` the default of every store opened later by this process and by the processes it
    starts (Dask LocalCluster workers, torchrun ranks), through ``$DEEPERCLUSTER_STORAGE_OPTIONS``."""
    if storage_options:
        os.environ[STORAGE_OPTIONS_ENV] = json.dumps({**_env_storage_options(), **storage_options}, sort_keys=True)


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"cannot serialise {type(o).__name__}")

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

Verified outputs: a record lists what its unit wrote, ``{"outputs": {rel: {"size": n, "sha256": hex}}}`` (SHA-256
of the bytes as stored, read back once the unit has written them). A resumed stage re-checks the sizes of its done
units' outputs (:meth:`RunStore.bad_outputs`: one listing, no reading) and redoes the units whose files are missing
or resized; ``deepercluster verify`` checks every checksum (:mod:`deepercluster.verify`). A file that cannot be read
is a one-line :class:`StoreError` naming it, and the unit and the command that recompute it when a record lists it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import time
import uuid
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, BinaryIO

import fsspec
import numpy as np
import pandas as pd
from fsspec.implementations.local import LocalFileSystem

from deepercluster.errors import DeeperClusterError, StoreError
from deepercluster.paths import owner_of, round_dir  # noqa: F401  (round_dir re-exported)

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger("deepercluster")

DATA_STAGES = ("shard",)
ROUND_STAGES = ("extract", "cluster", "train", "evaluate")
STAGES = DATA_STAGES + ROUND_STAGES
STAGE_DONE = "_stage"
TMP_PREFIX = ".tmp-"  # a write in progress (or left by a killed process): never a completion record
STORAGE_OPTIONS_ENV = "DEEPERCLUSTER_STORAGE_OPTIONS"
S3_ENDPOINT_ENVS = ("DEEPERCLUSTER_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
LOCAL_PROTOCOLS = ("file", "local")
PARQUET_ROWS = 1 << 18  # rows per parquet row group written (a part of 8 int64 columns: 16 MiB)
CHECKSUM = "sha256"  # hashlib's (OpenSSL, SHA-NI): ~1.7 GB/s on one core of the CI machine
HASH_BLOCK = 1 << 22  # bytes read at a time while hashing
# what libraries raise on a truncated or corrupt file (ArrowInvalid is a ValueError; torch: RuntimeError)
READ_ERRORS = (ValueError, OSError, EOFError, RuntimeError, pickle.UnpicklingError,
               zipfile.BadZipFile)


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
        hint = self.recompute_hint(rel)
        if hint:
            return StoreError(f"{self.url(rel)} is missing{hint}")
        return StoreError(f"{self.url(rel)} is missing: run the stage that makes it first")

    def unreadable(self, rel: str, err: BaseException | None = None, what: str = "is corrupt or truncated") \
            -> StoreError:
        """The one-line error for a file that is there but cannot be read: the file, what the library said (its
        exception's name), and the unit and command that recompute it when a completion record lists the file."""
        reason = f" ({type(err).__name__})" if err is not None else ""
        hint = self.recompute_hint(rel) or ": recompute the stage that makes it (deepercluster stage ... --force)"
        return StoreError(f"{self.url(rel)} {what}{reason}{hint}")

    @contextmanager
    def reading(self, rel: str) -> Iterator[None]:
        """Turn what a library raises on a missing, truncated or corrupt ``rel`` into a one-line StoreError."""
        try:
            yield
        except DeeperClusterError:
            raise
        except FileNotFoundError:
            raise self._missing(rel) from None
        except READ_ERRORS as err:
            raise self.unreadable(rel, err) from None

    def recompute_hint(self, rel: str) -> str:
        """``" (unit extract r0 shard-00003): recompute it with `...`"`` for a file a completion record lists among
        its unit's outputs; empty otherwise."""
        owner = owner_of(rel)
        if owner is None:
            return ""
        stage, r, unit = owner
        try:
            record = self.done_record(stage, r, unit)
        except (DeeperClusterError, *READ_ERRORS):
            record = None
        if record is None:
            return ""
        listed = rel in record.get("outputs", {})
        return f" (unit {unit_label(stage, r, unit)}): recompute it with `{self.recompute_command(stage, r, listed)}`"

    def recompute_command(self, stage: str, r: int | None, unit_level: bool = True) -> str:
        """The command that recomputes a bad unit: ``verify --repair`` (only the bad units of the round, checked
        against their records) when its record lists its outputs, else the stage with ``--force``."""
        if unit_level:
            return f"deepercluster verify {self.uri}" + ("" if r is None else f" --round {r}") + " --repair"
        return f"deepercluster stage {stage} --run {self.uri}" + ("" if r is None else f" --round {r}") + " --force"

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
        data = self.read_bytes(rel)
        with self.reading(rel):
            return np.load(io.BytesIO(data), allow_pickle=False)

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
        for table in self.iter_parquet_tables(rel, columns):
            yield table.to_pandas()

    def iter_parquet_tables(self, rel: str, columns: list[str] | None = None) -> Iterator[pa.Table]:
        """The parquet file ``rel`` row group by row group as Arrow tables (only ``columns`` when given): for
        streaming a large file without a pandas copy (numpy views of its int columns share Arrow's buffers)."""
        import pyarrow.parquet as pq

        with self._open_existing(rel) as f:
            with self.reading(rel):
                reader = pq.ParquetFile(f)
                groups = reader.num_row_groups
            for group in range(groups):
                with self.reading(rel):
                    part = reader.read_row_group(group, columns=columns)
                yield part

    def read_parquet(self, rel: str, columns: list[str] | None = None) -> pd.DataFrame:
        """The parquet file ``rel`` (only ``columns`` when given: the others are not read)."""
        with self._open_existing(rel) as f, self.reading(rel):
            return pd.read_parquet(f, columns=columns)

    def save_torch(self, rel: str, obj: Any) -> None:
        """``torch.save`` streamed into an atomic write (no in-memory copy of a large state)."""
        import torch

        with self.open_atomic(rel) as f:
            torch.save(obj, f)

    def load_torch(self, rel: str) -> Any:
        import torch

        data = self.read_bytes(rel)
        with self.reading(rel):
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)

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

    def mark_done(self, stage: str, r: int | None, unit: str, info: dict[str, Any] | None = None,
                  outputs: Iterable[str] = ()) -> None:
        """Write a unit's completion record: a fresh ``id`` (what later stages' fingerprints name), the
        fingerprint of the stage's lineage when there is one, and the size and checksum of each of ``outputs``
        (paths relative to the run, read back now: call it once they are written)."""
        record = {"unit": unit, "id": uuid.uuid4().hex, "finished_at": time.time(), "pid": os.getpid(),
                  **(info or {})}
        fingerprint = self.fingerprint(stage, r)
        if fingerprint:
            record["fingerprint"] = fingerprint
        outputs = list(outputs)
        if outputs:
            record["outputs"] = {rel: self.output_info(rel) for rel in outputs}
        self.write_json(self._record(stage, r, unit), record)

    def output_info(self, rel: str) -> dict[str, Any]:
        """``{"size": bytes, "sha256": hex}`` of the file ``rel`` as stored (read once, ``HASH_BLOCK`` at a time)."""
        digest = hashlib.new(CHECKSUM)
        size = 0
        with self._open_existing(rel) as f:
            while block := f.read(HASH_BLOCK):
                digest.update(block)
                size += len(block)
        return {"size": size, CHECKSUM: digest.hexdigest()}

    def is_done(self, stage: str, r: int | None, unit: str) -> bool:
        return self.exists(self._record(stage, r, unit))

    def done_record(self, stage: str, r: int | None, unit: str) -> dict[str, Any] | None:
        return self.read_json(self._record(stage, r, unit)) if self.is_done(stage, r, unit) else None

    def done_records(self, stage: str, r: int | None, units: Iterable[str]) -> dict[str, dict[str, Any]]:
        """The completion records of ``units`` (those that have one), read in one batch (concurrently on object
        stores)."""
        paths = {self.fs._strip_protocol(self.path(self._record(stage, r, u))): u for u in units}
        if not paths:
            return {}
        blobs = self.fs.cat(list(paths), on_error="omit")
        if not isinstance(blobs, dict):  # one path: fsspec gives its bytes
            blobs = dict(zip(paths, [blobs], strict=True))
        return {paths[k]: json.loads(b) for p, b in blobs.items() if (k := self.fs._strip_protocol(p)) in paths}

    def sizes(self, rels: Iterable[str]) -> dict[str, int | None]:
        """The size of each file (None: missing) from one recursive listing of the folder holding them all."""
        rels = list(rels)
        if not rels:
            return {}
        folder = os.path.commonpath([os.path.dirname(rel) or "." for rel in rels])
        root = self.path("" if folder in ("", ".") else folder)
        try:
            found = self.fs.find(root, detail=True) if self.fs.isdir(root) else {}
        except FileNotFoundError:
            found = {}
        by_path = {self.fs._strip_protocol(p): info.get("size") for p, info in found.items()}
        return {rel: by_path.get(self.fs._strip_protocol(self.path(rel))) for rel in rels}

    def bad_outputs(self, stage: str, r: int | None, units: Iterable[str]) -> dict[str, list[tuple[str, str]]]:
        """Done units among ``units`` whose recorded outputs are missing or of another size now: unit -> [(file,
        why)] (the cheap check of a resume: the records and one listing, no file read). Records without
        ``outputs`` pass."""
        records = self.done_records(stage, r, units)
        listed = {rel: (u, out["size"]) for u, rec in records.items() for rel, out in rec.get("outputs", {}).items()}
        bad: dict[str, list[tuple[str, str]]] = {}
        for rel, size in self.sizes(listed).items():
            unit, expected = listed[rel]
            if size != expected:
                why = "is missing" if size is None else f"has {size} bytes, its record {expected}"
                bad.setdefault(unit, []).append((rel, why))
        return bad

    def redo_bad_units(self, stage: str, r: int | None, units: Iterable[str]) -> list[str]:
        """For a stage's ``todo``: forget the done units among ``units`` whose outputs are missing or resized (one
        log line each) and remove those files (a zarr shard is rewritten only over a readable one), so that they
        are recomputed; returns them."""
        bad = self.bad_outputs(stage, r, units)
        for unit, files in sorted(bad.items()):
            rel, why = files[0]
            more = f" (and {len(files) - 1} more of its files)" if len(files) > 1 else ""
            log.warning("%s: %s %s%s: recomputing it", unit_label(stage, r, unit), self.url(rel), why, more)
            for rel, _ in files:
                self.remove(rel)
            self.forget(stage, r, unit)
        return sorted(bad)

    def forget(self, stage: str, r: int | None, unit: str) -> None:
        """Remove one unit's completion record: the stage will recompute that unit."""
        self.remove(self._record(stage, r, unit))

    def keep_identity(self, stage: str, r: int | None, unit: str, ident: str) -> None:
        """Give a rewritten record the ``id`` of the one it replaces (its outputs are the same bytes): the stages
        whose fingerprints name that id stay valid."""
        record = self.done_record(stage, r, unit)
        if record is not None and record.get("id") != ident:
            self.write_json(self._record(stage, r, unit), {**record, "id": ident})

    def done_units(self, stage: str, r: int | None) -> list[str]:
        """Units of ``stage`` that have a completion record (the stage record excluded)."""
        names = self.listdir(f"{self.scope(stage, r)}/_done/{stage}")
        return [n[:-5] for n in names
                if n.endswith(".json") and n != f"{STAGE_DONE}.json" and not n.startswith(TMP_PREFIX)]

    def stage_done(self, stage: str, r: int | None) -> bool:
        return self.is_done(stage, r, STAGE_DONE)

    def mark_stage_done(self, stage: str, r: int | None, info: dict[str, Any] | None = None,
                        outputs: Iterable[str] = ()) -> None:
        self.mark_done(stage, r, STAGE_DONE, info, outputs)

    def reset_stage(self, stage: str, r: int | None) -> None:
        """Forget every completion record of a stage and its lineage (``--force``): its units will be recomputed."""
        self.remove(f"{self.scope(stage, r)}/_done/{stage}")
        self.remove(self.lineage_rel(stage, r))


def unit_label(stage: str, r: int | None, unit: str) -> str:
    """``extract r0 shard-00003`` (``cluster r0 stage record`` for ``_stage``)."""
    return f"{stage}{'' if r is None else f' r{r}'} {'stage record' if unit == STAGE_DONE else unit}"


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

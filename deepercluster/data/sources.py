"""Data sources as streams of listing rows ``{"uri", "label", "reject", ...metadata}``, read lazily so that a
listing of 100M lines never sits in memory. ``reject`` is set when the listing alone shows a row is unusable
(a file that is not an image by its name, a malformed metadata line)."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from typing import Any

import fsspec

from deepercluster.config import DataConfig
from deepercluster.data.digits import resolve_source
from deepercluster.data.images import IMAGE_SUFFIXES
from deepercluster.data.webdataset import iter_webdataset
from deepercluster.data.yfcc import EXTRA_COLUMNS as YFCC_COLUMNS
from deepercluster.data.yfcc import iter_yfcc
from deepercluster.errors import ConfigError

LIST_SUFFIXES = (".txt", ".csv", ".tsv", ".parquet")
URI_COLUMNS = ("uri", "url", "path", "file", "filename")


def _url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return path if protocol in ("file", "local") else f"{protocol}://{path}"


def source_kind(cfg: DataConfig) -> str:
    """The kind of ``cfg.source``: the configured one, or guessed from the path (folder, list suffix, .tar)."""
    if cfg.kind != "auto":
        return cfg.kind
    source = resolve_source(cfg.source)
    name = source.lower().rstrip("/")
    if name.endswith(".tar") or (".tar" in name and "{" in name):
        return "webdataset"
    if name.endswith(LIST_SUFFIXES):
        return "list"
    fs, path = fsspec.core.url_to_fs(source)
    if fs.isdir(path):
        return "webdataset" if any(p.endswith(".tar") for p in fs.ls(path, detail=False)) else "folder"
    raise ConfigError(f"cannot tell what data source {cfg.source!r} is: set data.kind (folder, list, yfcc100m or "
                      "webdataset)")


def extra_columns(kind: str) -> dict[str, str]:
    """Metadata columns (name -> type) a source kind carries into the manifest."""
    return dict(YFCC_COLUMNS) if kind == "yfcc100m" else {}


def iter_folder(source: str) -> Iterator[dict[str, Any]]:
    """Every file under ``source``, directory by directory in sorted order; the first sub-folder is the label."""
    fs, root = fsspec.core.url_to_fs(source)
    root = root.rstrip("/")
    if not fs.isdir(root):
        raise ConfigError(f"image folder {source!r} does not exist")
    for dirpath, dirs, files in fs.walk(root, topdown=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "_")))
        rel_dir = dirpath.rstrip("/")[len(root) :].lstrip("/")
        label = rel_dir.split("/", 1)[0] if rel_dir else None
        for name in sorted(files):
            if name.startswith((".", "_")):
                continue
            uri = _url(fs, f"{dirpath.rstrip('/')}/{name}")
            known = os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES
            yield {"uri": uri, "label": label, "reject": None if known else "not an image"}


def _absolute(entry: str, base: str) -> str:
    if "://" in entry or entry.startswith("/"):
        return entry
    return f"{base}/{entry}"


def iter_file_list(source: str, label_column: str) -> Iterator[dict[str, Any]]:
    """A txt (one path or URL per line, optionally ``<TAB>label``), csv/tsv or parquet (a ``uri``/``path``
    column, an optional label column) list of images; relative paths are relative to the list's folder."""
    fs, path = fsspec.core.url_to_fs(source)
    if not fs.isfile(path):
        raise ConfigError(f"file list {source!r} does not exist")
    base = _url(fs, path.rsplit("/", 1)[0])
    suffix = path.lower().rsplit(".", 1)[-1]
    if suffix == "txt":
        with fs.open(path, "rt", encoding="utf-8", errors="replace") as f:
            for line in f:
                entry, _, label = line.rstrip("\r\n").partition("\t")
                if entry.strip():
                    yield {"uri": _absolute(entry.strip(), base), "label": label.strip() or None, "reject": None}
        return
    for batch in _table_batches(fs, path, suffix):
        uri_col = next((c for c in URI_COLUMNS if c in batch), None)
        if uri_col is None:
            raise ConfigError(f"file list {source!r} has no column named {' or '.join(URI_COLUMNS)}")
        labels = batch.get(label_column, [None] * len(batch[uri_col]))
        for entry, label in zip(batch[uri_col], labels, strict=True):
            if entry is None or not str(entry).strip():
                continue
            label = None if label is None or label != label or str(label) == "" else str(label)
            yield {"uri": _absolute(str(entry).strip(), base), "label": label, "reject": None}


def _table_batches(fs: fsspec.AbstractFileSystem, path: str, suffix: str) -> Iterator[dict[str, list]]:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as f:
        if suffix == "parquet":
            batches = pq.ParquetFile(f).iter_batches(batch_size=65536)
        else:
            delimiter = "\t" if suffix == "tsv" else ","
            data = io.BufferedReader(f) if not hasattr(f, "peek") else f
            batches = pacsv.open_csv(data, parse_options=pacsv.ParseOptions(delimiter=delimiter),
                                     convert_options=pacsv.ConvertOptions(strings_can_be_null=True))
        for batch in batches:
            yield batch.to_pydict()


def iter_source(cfg: DataConfig) -> Iterator[dict[str, Any]]:
    """The listing rows of the configured source, in a deterministic order."""
    kind = source_kind(cfg)
    source = resolve_source(cfg.source)
    if kind == "folder":
        return iter_folder(source)
    if kind == "list":
        return iter_file_list(source, cfg.label_column)
    if kind == "webdataset":
        return iter_webdataset(source)
    return iter_yfcc(source, cfg.path_template or "", cfg.id_list)

"""Data sources as streams of listing rows ``{"uri", "label", "reject", ...metadata}``, read lazily so that a
listing of 100M lines never sits in memory. ``reject`` is set when the listing alone shows a row is unusable
(a file that is not an image by its name, not a regular file, a folder that cannot be listed, a malformed list
row or metadata line): every entry a source holds is a row, so that the manifest and the rejects account for all
of them (the reasons: :data:`deepercluster.data.images.REJECT_REASONS`)."""

from __future__ import annotations

import errno
import io
import os
import stat
from collections.abc import Iterator
from typing import Any

import fsspec

from deepercluster.config import DataConfig
from deepercluster.data.digits import DIGITS_SOURCE, resolve_source
from deepercluster.data.images import IMAGE_SUFFIXES
from deepercluster.data.webdataset import iter_webdataset
from deepercluster.data.yfcc import EXTRA_COLUMNS as YFCC_COLUMNS
from deepercluster.data.yfcc import iter_yfcc
from deepercluster.errors import ConfigError

LIST_SUFFIXES = (".txt", ".csv", ".tsv", ".parquet")
URI_COLUMNS = ("uri", "url", "path", "file", "filename")
HIDDEN = "hidden (data.skip_hidden)"
DIGITS_MARKER = "_complete"  # the bundled digits folder's completion marker: not an input


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


def _hidden(name: str) -> bool:
    return name.startswith((".", "_"))


def _row(uri: str, label: str | None, reject: str | None) -> dict[str, Any]:
    return {"uri": uri, "label": label, "reject": reject}


def _file_reject(name: str, regular: bool, skip_hidden: bool) -> str | None:
    """The listing's verdict on a file from its name and type (it is never opened here)."""
    if skip_hidden and _hidden(name):
        return HIDDEN
    if not regular:
        return "not a regular file"
    return None if os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES else "not an image suffix"


def _one_line(err: BaseException) -> str:
    text = getattr(err, "strerror", None) or str(err) or err.__class__.__name__
    return text.splitlines()[0] if text.strip() else err.__class__.__name__


def _utf8(path: str) -> str | None:
    """``path`` when it is valid UTF-8 text, else None (a name of undecodable bytes, surrogate-escaped by os)."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return path


def _escaped(path: str) -> str:
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _stat_reject(err: OSError, is_link: bool) -> str:
    if isinstance(err, FileNotFoundError):
        return "dangling symlink" if is_link else "missing"
    if isinstance(err, PermissionError):
        return "permission denied"
    if err.errno == errno.ELOOP:
        return "symlink loop"
    return f"unreadable: {err.__class__.__name__}"


def _on_chain(real: str, chain: tuple | None) -> bool:
    while chain is not None:
        if chain[0] == real:
            return True
        chain = chain[1]
    return False


def _iter_local_folder(root: str, skip_hidden: bool, ignore: frozenset[str]) -> Iterator[dict[str, Any]]:
    """A local folder, depth first in sorted order (each folder's files, then its sub-folders). Symbolic links are
    followed, to files and to folders; a link back to a folder being listed (or a link cycle) is a reject
    ``symlink loop``, found by the real paths of the folders on the way down (``chain``). A folder that cannot be
    listed is one reject row; a FIFO, socket or device is a reject without ever being opened."""
    # the stack holds folders still to list (path, label, real path, chain of real paths above) and rows to yield
    # when their turn comes (folders not entered), so that rows come in depth-first sorted order
    stack: list[tuple] = [("dir", root, None, os.path.realpath(root), None)]
    while stack:
        item = stack.pop()
        if item[0] == "row":
            yield item[1]
            continue
        _, path, label, real, chain = item
        try:
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as err:
            yield _row(path, label, f"unreadable folder: {_one_line(err)}")
            continue
        chain = (real, chain)
        folders: list[tuple] = []
        for entry in entries:
            if path == root and entry.name in ignore:
                continue
            full = os.path.join(path, entry.name)
            sub_label = entry.name if label is None else label
            if _utf8(full) is None:
                if _is_dir(entry):  # a folder of such a name is not entered: its files' paths are undecodable too
                    folders.append(("row", _row(_escaped(full), _escaped(sub_label), "undecodable name")))
                else:
                    yield _row(_escaped(full), label, "undecodable name")
                continue
            try:
                st = entry.stat()  # follows symbolic links
            except OSError as err:
                yield _row(full, label, _stat_reject(err, entry.is_symlink()))
                continue
            if not stat.S_ISDIR(st.st_mode):
                yield _row(full, label, _file_reject(entry.name, stat.S_ISREG(st.st_mode), skip_hidden))
                continue
            if skip_hidden and _hidden(entry.name):
                folders.append(("row", _row(full, sub_label, HIDDEN)))
                continue
            sub_real = os.path.realpath(full) if entry.is_symlink() else os.path.join(real, entry.name)
            if _on_chain(sub_real, chain):
                folders.append(("row", _row(full, sub_label, "symlink loop")))
                continue
            folders.append(("dir", full, sub_label, sub_real, chain))
        stack.extend(reversed(folders))


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _iter_fs_folder(fs: fsspec.AbstractFileSystem, root: str, skip_hidden: bool,
                    ignore: frozenset[str]) -> Iterator[dict[str, Any]]:
    """Any other fsspec filesystem (object stores, memory): the same order and rows as a local folder; an entry
    that is neither a file nor a directory is ``not a regular file``."""
    stack: list[tuple] = [("dir", root, None)]
    while stack:
        item = stack.pop()
        if item[0] == "row":
            yield item[1]
            continue
        _, path, label = item
        try:
            infos = sorted(fs.ls(path, detail=True), key=lambda i: i["name"])
        except OSError as err:
            yield _row(_url(fs, path), label, f"unreadable folder: {_one_line(err)}")
            continue
        folders: list[tuple] = []
        for info in infos:
            full = info["name"].rstrip("/")
            if full == path.rstrip("/"):
                continue
            name = full.rsplit("/", 1)[-1]
            if path == root and name in ignore:
                continue
            sub_label = name if label is None else label
            if info.get("type") == "directory":
                hidden = skip_hidden and _hidden(name)
                folders.append(("row", _row(_url(fs, full), sub_label, HIDDEN)) if hidden
                               else ("dir", full, sub_label))
                continue
            yield _row(_url(fs, full), label, _file_reject(name, info.get("type") == "file", skip_hidden))
        stack.extend(reversed(folders))


def iter_folder(source: str, skip_hidden: bool = False, ignore: frozenset[str] = frozenset()
                ) -> Iterator[dict[str, Any]]:
    """Every entry under ``source``, folder by folder in sorted order; the first sub-folder is the label. Each one
    is a listing row: an image by its suffix, or a reject (see :func:`_iter_local_folder`). Names starting with
    ``.`` or ``_`` (``_DSC0001.jpg``) are listed like any other, unless ``skip_hidden``: then each such file, and
    each such folder (not entered), is a reject ``hidden (data.skip_hidden)``. ``ignore``: names at the top level
    that are no input (the bundled digits' marker)."""
    fs, root = fsspec.core.url_to_fs(source)
    root = root.rstrip("/") or "/"
    if not fs.isdir(root):
        raise ConfigError(f"image folder {source!r} does not exist")
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        return _iter_local_folder(root, skip_hidden, ignore)
    return _iter_fs_folder(fs, root, skip_hidden, ignore)


def _absolute(entry: str, base: str) -> str:
    if "://" in entry or entry.startswith("/"):
        return entry
    return f"{base}/{entry}"


def iter_file_list(source: str, label_column: str) -> Iterator[dict[str, Any]]:
    """A txt (one path or URL per line, optionally ``<TAB>label``), csv/tsv or parquet (a ``uri``/``path``
    column, an optional label column) list of images; relative paths are relative to the list's folder.

    A csv/tsv row with too few or too many fields, or a csv/tsv/parquet row without a path, is a reject
    ``malformed list row <n>`` (its uri ``<list>:<n>``; n counts rows of the file, a csv header being row 1);
    blank lines of a txt list are no entry. A list that cannot be parsed at all is a one-line ConfigError."""
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
    for number, entry, label in _table_rows(fs, path, suffix, source, label_column):
        if entry is None or not str(entry).strip():
            yield _row(f"{source}:{number}", None, f"malformed list row {number}")
            continue
        label = None if label is None or label != label or str(label) == "" else str(label)
        yield {"uri": _absolute(str(entry).strip(), base), "label": label, "reject": None}


def _buffered(f):
    return f if hasattr(f, "peek") else io.BufferedReader(f)


def _table_rows(fs: fsspec.AbstractFileSystem, path: str, suffix: str, source: str,
                label_column: str) -> Iterator[tuple[int, Any, Any]]:
    """``(row number, path cell, label cell)`` of each row of a csv/tsv/parquet list, streamed in batches; a
    malformed csv row is ``(n, None, None)``. Any parse failure is a one-line ConfigError naming the list."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    def columns(names: list[str]) -> tuple[str, str | None]:
        uri_col = next((c for c in URI_COLUMNS if c in names), None)
        if uri_col is None:
            raise ConfigError(f"file list {source!r} has no column named {' or '.join(URI_COLUMNS)}")
        return uri_col, (label_column if label_column in names else None)

    try:
        if suffix == "parquet":
            with fs.open(path, "rb") as f:
                pf = pq.ParquetFile(f)
                uri_col, label_col = columns(pf.schema_arrow.names)
                n = 0
                for batch in pf.iter_batches(batch_size=65536, columns=[uri_col] + ([label_col] if label_col else [])):
                    d = batch.to_pydict()
                    labels = d[label_col] if label_col else [None] * batch.num_rows
                    for i, (entry, label) in enumerate(zip(d[uri_col], labels, strict=True)):
                        yield n + i + 1, entry, label
                    n += batch.num_rows
            return
        bad: list[int] = []

        def invalid(row: Any) -> str:  # a row of another field count: a reject, not the end of the listing
            if row.number is None:
                return "error"
            bad.append(row.number)
            return "skip"

        parse = pacsv.ParseOptions(delimiter="\t" if suffix == "tsv" else ",", invalid_row_handler=invalid,
                                   newlines_in_values=True)
        read = pacsv.ReadOptions(use_threads=False)  # serial parsing: rows keep their numbers
        with fs.open(path, "rb") as f:
            uri_col, label_col = columns(pacsv.open_csv(_buffered(f), read_options=read,
                                                        parse_options=parse).schema.names)
        wanted = [uri_col] + ([label_col] if label_col else [])
        convert = pacsv.ConvertOptions(strings_can_be_null=True, include_columns=wanted,
                                       column_types={c: pa.string() for c in wanted})  # '007' stays '007'
        bad.clear()
        skipped: set[int] = set()
        number = 1  # the header
        with fs.open(path, "rb") as f:
            for batch in pacsv.open_csv(_buffered(f), read_options=read, parse_options=parse,
                                        convert_options=convert):
                d = batch.to_pydict()
                labels = d[label_col] if label_col else [None] * batch.num_rows
                skipped.update(bad)
                rows = [(b, None, None) for b in bad]
                bad.clear()
                for entry, label in zip(d[uri_col], labels, strict=True):
                    number += 1
                    while number in skipped:
                        skipped.discard(number)
                        number += 1
                    rows.append((number, entry, label))
                yield from sorted(rows, key=lambda r: r[0])
            yield from ((b, None, None) for b in sorted(bad))
    except (pa.ArrowInvalid, UnicodeDecodeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else err.__class__.__name__
        raise ConfigError(f"file list {source!r} cannot be read as {suffix}: {first}") from None


def iter_source(cfg: DataConfig) -> Iterator[dict[str, Any]]:
    """The listing rows of the configured source, in a deterministic order."""
    kind = source_kind(cfg)
    source = resolve_source(cfg.source)
    if kind == "folder":
        ignore = frozenset({DIGITS_MARKER}) if cfg.source == DIGITS_SOURCE else frozenset()
        return iter_folder(source, cfg.skip_hidden, ignore)
    if kind == "list":
        return iter_file_list(source, cfg.label_column)
    if kind == "webdataset":
        return iter_webdataset(source)
    return iter_yfcc(source, cfg.path_template or "", cfg.id_list)

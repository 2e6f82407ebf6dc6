"""The YFCC100M metadata release: one tab-separated line per photo or video.

Two layouts are read, told apart by their number of fields:

- 25 fields (the Multimedia Commons ``yfcc100m_dataset``): line number, photo/video id, photo/video hash, user
  NSID, user nickname, date taken, date uploaded, capture device, title, description, user tags, machine tags,
  longitude, latitude, accuracy, page URL, download URL, license name, license URL, server id, farm id, secret,
  original secret, original extension, marker (0 = photo, 1 = video);
- 23 fields (the original Yahoo release): the same without the line number and the hash.

Photos are kept, videos dropped; a line of any other shape (or with a non-numeric id or marker) is a reject.
Each photo is mapped to its image by ``path_template``, whose fields are ``{id}``, ``{hash}``, ``{line}``,
``{user}``, ``{server}``, ``{farm}``, ``{secret}``, ``{secret_original}`` and ``{ext}``; a field may be sliced
(``{hash[:3]}``) or formatted (``{id:08d}``).
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterator
from typing import Any

import fsspec
import numpy as np

from deepercluster.errors import ConfigError

TEMPLATE_FIELDS = ("id", "hash", "line", "user", "server", "farm", "secret", "secret_original", "ext")
_FIELD = re.compile(r"\{(\w+)(?:\[(-?\d*):(-?\d*)\])?(?::([^{}]*))?\}")
# metadata carried into the manifest, and their column types
EXTRA_COLUMNS = {"photo_id": "int64", "user_tags": "string", "longitude": "float64", "latitude": "float64",
                 "geo_accuracy": "float64"}


def check_template(template: str) -> None:
    names = [m.group(1) for m in _FIELD.finditer(template)]
    if not names:
        raise ValueError(f"path_template {template!r} uses no field: put {{id}} or {{hash}} in it")
    unknown = sorted(set(names) - set(TEMPLATE_FIELDS))
    if unknown:
        raise ValueError(f"path_template field(s) {', '.join(unknown)} unknown; "
                         f"fields are {', '.join(TEMPLATE_FIELDS)}")


def render(template: str, fields: dict[str, Any]) -> str:
    def one(m: re.Match) -> str:
        name, lo, hi, spec = m.groups()
        value = fields[name]
        if lo is not None:
            value = str(value)[int(lo) if lo else None : int(hi) if hi else None]
        return format(value, spec) if spec else str(value)

    return _FIELD.sub(one, template)


def _float(text: str) -> float | None:
    try:
        return float(text) if text else None
    except ValueError:
        return None


def parse_line(line: str) -> tuple[str, dict[str, Any] | None]:
    """``("photo", fields)``, ``("video", None)`` or ``("malformed", None)``."""
    f = line.rstrip("\r\n").split("\t")
    if len(f) == 23:
        f = ["", f[0], "", *f[1:]]
    if len(f) != 25 or not f[1].isdigit() or f[24] not in ("0", "1"):
        return "malformed", None
    if f[24] == "1":
        return "video", None
    return "photo", {
        "id": int(f[1]), "hash": f[2], "line": f[0], "user": f[3], "server": f[19], "farm": f[20], "secret": f[21],
        "secret_original": f[22], "ext": f[23] or "jpg", "user_tags": f[10], "longitude": _float(f[12]),
        "latitude": _float(f[13]), "geo_accuracy": _float(f[14]),
    }


CHUNK_IDS = 1 << 22  # ids parsed, copied or checked at a time (32 MB of int64)


def _is_sorted(ids: np.ndarray) -> bool:
    for lo in range(0, len(ids), CHUNK_IDS):
        block = np.asarray(ids[max(lo - 1, 0) : lo + CHUNK_IDS])
        if np.any(block[1:] < block[:-1]):
            return False
    return True


def _id_chunks(uri: str) -> Iterator[np.ndarray]:
    """The ids of a .txt (whitespace-separated) or .parquet (first column) list, a bounded block at a time."""
    if uri.lower().endswith(".parquet"):
        import pyarrow.parquet as pq

        with fsspec.open(uri, "rb") as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=CHUNK_IDS):
                yield batch.column(0).to_numpy(zero_copy_only=False)
        return
    with fsspec.open(uri, "rt", encoding="utf-8") as f:
        tail = ""
        while True:
            text = f.read(8 * CHUNK_IDS)
            if not text:
                break
            text = tail + text
            cut = max(text.rfind("\n"), text.rfind(" "), text.rfind("\t"))
            text, tail = (text[: cut + 1], text[cut + 1 :]) if cut >= 0 else ("", text)
            yield np.array(text.split(), dtype=np.int64)
        if tail.strip():
            yield np.array(tail.split(), dtype=np.int64)


def load_id_list(uri: str, scratch: str) -> np.ndarray:
    """The photo ids of an id list (.npy such as DeeperCluster's flickr_unique_ids.npy, .txt or .parquet with one
    id per row) as a sorted, read-only memory map, never whole in memory (95.9M ids are 770 MB): a local sorted
    .npy is mapped in place; any other list is copied block by block into ``scratch`` (a local folder), and
    sorted there in place when it is not sorted already."""
    try:
        fs, path = fsspec.core.url_to_fs(uri)
        if not fs.isfile(path):
            raise FileNotFoundError(uri)
        suffix = path.rsplit(".", 1)[-1].lower()
        if suffix == "npy":
            local = "file" in ((fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol)
            if not local:
                fs.get(path, f"{scratch}/ids.npy")
            ids = np.load(path if local else f"{scratch}/ids.npy", mmap_mode="r", allow_pickle=False)
            if ids.ndim != 1 or ids.dtype.kind not in "iu":
                raise ValueError(f"a 1-D array of integer ids was expected, found {ids.dtype} {ids.shape}")
            if _is_sorted(ids):
                return ids
            chunks: Iterator[np.ndarray] = (np.asarray(ids[lo : lo + CHUNK_IDS])
                                            for lo in range(0, len(ids), CHUNK_IDS))
        else:
            chunks = _id_chunks(uri)
        n = 0
        with open(f"{scratch}/ids.bin", "wb") as out:
            for chunk in chunks:
                out.write(np.ascontiguousarray(chunk, dtype=np.int64).tobytes())
                n += len(chunk)
    except FileNotFoundError:
        raise ConfigError(f"id list {uri!r} does not exist") from None
    except ValueError as err:
        raise ConfigError(f"id list {uri!r} is not a list of integer ids: {err}") from None
    if n == 0:
        raise ConfigError(f"id list {uri!r} holds no id")
    ids = np.memmap(f"{scratch}/ids.bin", dtype=np.int64, mode="r+", shape=(n,))
    if not _is_sorted(ids):
        ids.sort(kind="stable")  # in place, in the mapped file: pages the kernel can write back and drop
        ids.flush()
    return np.memmap(f"{scratch}/ids.bin", dtype=np.int64, mode="r", shape=(n,))


def _in(ids: np.ndarray, photo_id: int) -> bool:
    i = int(np.searchsorted(ids, photo_id))
    return i < len(ids) and int(ids[i]) == photo_id


def iter_yfcc(source: str, template: str, id_list: str | None) -> Iterator[dict[str, Any]]:
    """Listing rows of the photos of a YFCC100M metadata file (plain, .gz or .bz2), in file order."""
    with tempfile.TemporaryDirectory(prefix="deepercluster-ids-") as scratch:
        yield from _photos(source, template, load_id_list(id_list, scratch) if id_list else None)


def _photos(source: str, template: str, ids: np.ndarray | None) -> Iterator[dict[str, Any]]:
    with fsspec.open(source, "rt", compression="infer", encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            kind, fields = parse_line(line)
            if kind == "video":
                continue
            if fields is None:
                yield {"uri": f"{source}:{n}", "label": None, "reject": "malformed metadata line"}
                continue
            if ids is not None and not _in(ids, fields["id"]):
                continue
            yield {"uri": render(template, fields), "label": None, "reject": None, "photo_id": fields["id"],
                   "user_tags": fields["user_tags"], "longitude": fields["longitude"],
                   "latitude": fields["latitude"], "geo_accuracy": fields["geo_accuracy"]}

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

import io
import re
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


def load_id_list(uri: str) -> np.ndarray:
    """The sorted unique photo ids of an id list (.npy such as DeeperCluster's flickr_unique_ids.npy, .txt or
    .parquet with one id per row). It is held in memory: 8 bytes per id (770 MB for 95.9M ids)."""
    try:
        with fsspec.open(uri, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ConfigError(f"id list {uri!r} does not exist") from None
    suffix = uri.rsplit(".", 1)[-1].lower()
    try:
        if suffix == "npy":
            ids = np.load(io.BytesIO(data), allow_pickle=False)
        elif suffix == "parquet":
            import pyarrow.parquet as pq

            ids = pq.read_table(io.BytesIO(data)).column(0).to_numpy()
        else:
            ids = np.array(data.split(), dtype=np.int64)
    except ValueError as err:
        raise ConfigError(f"id list {uri!r} is not a list of integer ids: {err}") from None
    return np.unique(np.asarray(ids, dtype=np.int64).ravel())


def iter_yfcc(source: str, template: str, id_list: str | None) -> Iterator[dict[str, Any]]:
    """Listing rows of the photos of a YFCC100M metadata file (plain, .gz or .bz2), in file order."""
    ids = load_id_list(id_list) if id_list else None
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
            if ids is not None:
                i = np.searchsorted(ids, fields["id"])
                if i == len(ids) or ids[i] != fields["id"]:
                    continue
            yield {"uri": render(template, fields), "label": None, "reject": None, "photo_id": fields["id"],
                   "user_tags": fields["user_tags"], "longitude": fields["longitude"],
                   "latitude": fields["latitude"], "geo_accuracy": fields["geo_accuracy"]}

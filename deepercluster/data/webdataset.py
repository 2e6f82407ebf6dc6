"""Webdataset ``.tar`` shards, read in place.

A sample is the group of consecutive members that share a key (the member name up to the first dot of its base
name): ``000123.jpg`` + ``000123.cls``. Its image is addressed as ``tar://<member>@<offset>:<size>::<tar url>``,
so that reading it is one ranged read of the tar (local or object storage), never a scan of the archive.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterator
from typing import Any

import fsspec

from deepercluster.data.images import IMAGE_SUFFIXES, tar_member_uri
from deepercluster.errors import ConfigError

_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_CHOICE = re.compile(r"\{([^{}]*,[^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` -> a-000.tar, a-001.tar, a-002.tar; ``{x,y}`` -> x, y (the webdataset notation)."""
    m = _RANGE.search(pattern)
    if m:
        lo, hi = m.group(1), m.group(2)
        width = len(lo) if lo.startswith("0") else 0
        heads = [pattern[: m.start()] + str(i).zfill(width) + pattern[m.end() :] for i in range(int(lo), int(hi) + 1)]
        return [p for h in heads for p in expand_braces(h)]
    m = _CHOICE.search(pattern)
    if m:
        return [p for c in m.group(1).split(",") for p in expand_braces(pattern[: m.start()] + c + pattern[m.end() :])]
    return [pattern]


def tar_urls(source: str) -> list[str]:
    """The tars a source names: one tar, a brace pattern of tars, or a folder of tars (sorted)."""
    fs, path = fsspec.core.url_to_fs(source)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]

    def url(p: str) -> str:
        return p if protocol in ("file", "local") else f"{protocol}://{p}"

    if "{" in path:
        return [url(p) for p in expand_braces(path)]
    if fs.isdir(path):
        tars = sorted(p for p in fs.find(path) if p.endswith(".tar"))
        if not tars:
            raise ConfigError(f"webdataset folder {source!r} holds no .tar file")
        return [url(p) for p in tars]
    if path.endswith((".tar.gz", ".tgz")):
        raise ConfigError(f"webdataset shard {source!r} is compressed: images are read in place, use plain .tar")
    return [url(path)]


def _key_and_ext(name: str) -> tuple[str, str]:
    head, _, base = name.rpartition("/")
    key, _, ext = base.partition(".")
    return (f"{head}/{key}" if head else key), ext.lower()


def _sample_row(tar_url: str, key: str, members: list[tarfile.TarInfo], tf: tarfile.TarFile) -> dict[str, Any]:
    label = None
    image = None
    for m in members:
        ext = _key_and_ext(m.name)[1]
        if ext == "cls":
            label = tf.extractfile(m).read().decode("utf-8", "replace").strip() or None
        elif image is None and "." + ext.rsplit(".", 1)[-1] in IMAGE_SUFFIXES:
            image = m
    if image is None:
        return {"uri": f"{tar_url}#{key}", "label": label, "reject": "no image in sample"}
    return {"uri": tar_member_uri(tar_url, image.name, image.offset_data, image.size), "label": label,
            "reject": None}


def iter_webdataset(source: str) -> Iterator[dict[str, Any]]:
    """Listing rows, one per sample of every tar in order; an unreadable tar (or its unreadable tail) is a reject,
    and so is each member that is neither a file nor a folder (a symbolic or hard link)."""
    for tar_url in tar_urls(source):
        try:
            with fsspec.open(tar_url, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tf:
                key, members = None, []
                for m in tf:
                    if m.isdir():
                        continue
                    if not m.isfile():  # a link, FIFO or device member: no bytes of its own to read
                        yield {"uri": f"{tar_url}#{m.name}", "label": None, "reject": "not a regular file"}
                        continue
                    k = _key_and_ext(m.name)[0]
                    if members and k != key:
                        yield _sample_row(tar_url, key, members, tf)
                        members = []
                    key = k
                    members.append(m)
                if members:
                    yield _sample_row(tar_url, key, members, tf)
        except FileNotFoundError:
            yield {"uri": tar_url, "label": None, "reject": "missing"}
        except (tarfile.TarError, OSError, EOFError) as err:
            yield {"uri": tar_url, "label": None, "reject": f"unreadable tar: {err.__class__.__name__}"}

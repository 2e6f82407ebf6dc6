"""Node-local files derived from a run's artifacts, for memory-mapping.

A training rank needs per-image lookups (an image's URI, its target) over all N images of the run. Held as Python
objects they cost every rank and every loader worker gigabytes at N = 96M; a file on local disk that each process
memory-maps costs them nothing of their own: its pages are the OS's page cache, shared by every process of the node
and evictable. The run store may be remote (``s3://``), so such a file lives on the node, not in the store:

* its name is derived from the artifact it comes from (store URL + path: a new version of a derived file replaces
  the old one) and from everything its content depends on (the artifact's signature, parameters), so a stale file is
  never used;
* it is built once per node: under a file lock (the node's ranks start together: one builds, the others wait and
  map it), to a temporary name renamed into place when whole, so a killed build leaves nothing.

The folder is ``$DEEPERCLUSTER_LOCAL_CACHE``, else ``deepercluster-cache-<uid>`` in the system's temporary folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from deepercluster.store import RunStore

LOCAL_CACHE_ENV = "DEEPERCLUSTER_LOCAL_CACHE"


def local_cache_dir() -> Path:
    folder = os.environ.get(LOCAL_CACHE_ENV)
    return Path(folder) if folder else Path(tempfile.gettempdir()) / f"deepercluster-cache-{os.getuid()}"


def _digest(*parts: object) -> str:
    return hashlib.sha256("\0".join(map(str, parts)).encode()).hexdigest()[:20]


def cache_path(store: RunStore, rel: str, kind: str, suffix: str, *params: object) -> Path:
    """Where the file of ``kind`` derived from the store's ``rel`` (as it is now) with ``params`` lives."""
    prefix = f"{kind}-{_digest(store.url(rel))}"
    return local_cache_dir() / f"{prefix}-{_digest(store.signature(rel), *params)}{suffix}"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path.with_name(path.name + ".lock"), "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def build_once(path: Path, write: Callable[[Path], None]) -> Path:
    """``path``, written by ``write(temporary path)`` unless it exists already (by this process or another):
    renamed into place only when ``write`` returns, so a failed or killed build leaves no file. The older versions
    of the same derived file (same name prefix) are removed: a process still mapping one keeps its pages."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        if path.exists():  # another rank built it while this one waited
            return path
        tmp = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")
        try:
            write(tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    prefix = path.name.rsplit("-", 1)[0] + "-"
    for old in path.parent.glob(f"{prefix}*{path.suffix}"):
        if old != path:
            old.unlink(missing_ok=True)
            old.with_name(old.name + ".lock").unlink(missing_ok=True)
    return path


class MappedArray:
    """A read-only ``.npy`` array on local disk, memory-mapped on first use in each process. It pickles as its path,
    so a DataLoader worker receives a few bytes and maps the same pages."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)
        self._array: np.ndarray | None = None

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r")
        return self._array

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, item):  # noqa: ANN001, ANN204  (what numpy indexing takes and gives)
        return self.array[item]

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])

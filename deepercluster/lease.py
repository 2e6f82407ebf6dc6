"""The run lease: one process at a time works on a run.

``<run>/_lease.json`` holds the owner (host, pid, ``what``, a random token, start and expiry in unix seconds). A daemon
heartbeat pushes the expiry forward while the file's token is ours (else it sets ``lost``); release removes the file
if it is. A live lease stops another process with ``RunLockedError`` (one line naming the owner); a stale one
(expired, unreadable, or its pid gone from this host) is taken over, so kill-and-resume works. The holder acquires
again as a nested hold (the CLI, then its flow); the outermost release ends it. Local paths: the record is written to
a temporary file and hard-linked to ``_lease.json`` (fails if the name exists); take-over renames the stale file to a
unique name (one contender gets it), puts it back unless it is the record judged stale, and creates again. Other
fsspec stores: create with mode ``"xb"`` (a conditional put on S3), re-read after ``SETTLE_S``, keep only if the token
is ours (best-effort without conditional writes). Expiry compares clocks across hosts: keep ``ttl_s`` above skew.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from deepercluster.errors import StoreError
from deepercluster.paths import LEASE_FILE  # noqa: F401  (re-exported)
from deepercluster.store import TMP_PREFIX, RunStore

SETTLE_S = 0.2  # non-local stores: wait before re-reading a lease just written, to see a concurrent writer's
log = logging.getLogger(__name__)


class RunLockedError(StoreError):
    """The run's lease is held by another live process."""


@dataclass
class Lease:
    """A held lease; ``lost`` turns true when the heartbeat finds another owner's token in the file."""

    owner: dict[str, Any]
    store: RunStore = field(repr=False)
    ttl_s: float = 60.0
    lost: bool = False
    _depth: int = field(default=1, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread = field(init=False, repr=False)  # the heartbeat, started by acquire_lease

    def release(self) -> None:
        """End one hold; the outermost stops the heartbeat and removes the file if its token is still ours."""
        with _held_lock:
            self._depth = max(0, self._depth - 1)
            if self._depth or _held.get(self.store.uri) is not self:
                return
            del _held[self.store.uri]
        self._stop.set()
        self._thread.join()
        _remove_if(self.store, self.owner["token"])

    def _beat(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                if (_read(self.store) or {}).get("token") != self.owner["token"]:
                    self.lost = True
                    return log.warning("the lease of run %s was taken over by another process", self.store.uri)
                self.owner = {**self.owner, "expires": time.time() + self.ttl_s}
                self.store.write_bytes(LEASE_FILE, json.dumps(self.owner).encode())
            except Exception as err:  # a passing store error: try again at the next beat
                log.warning("could not renew the lease of run %s: %s", self.store.uri, err)


_held: dict[str, Lease] = {}  # store URI -> the lease this process holds there
_held_lock = threading.Lock()


def acquire_lease(store: RunStore, what: str, ttl_s: float = 60.0, heartbeat_s: float = 15.0) -> Lease:
    """Take the run's lease for ``what`` (a short label), renewed every ``heartbeat_s`` by a daemon thread; raise
    ``RunLockedError`` when another live process holds it. Call ``release()`` when done (or use ``run_lease``)."""
    if not 0 < heartbeat_s < ttl_s:
        raise ValueError(f"the lease heartbeat ({heartbeat_s}s) must be positive and shorter than its ttl ({ttl_s}s)")
    with _held_lock:
        held = _held.get(store.uri)
        if held is not None and held.owner["pid"] == os.getpid():  # a forked child does not inherit the hold
            held._depth += 1
            return held
        for _ in range(20):  # take-over rounds, each lost to another contender
            now = time.time()
            owner = {"host": socket.gethostname(), "pid": os.getpid(), "what": what, "token": uuid.uuid4().hex,
                     "started": now, "expires": now + ttl_s}
            if _create(store, owner):
                lease = _held[store.uri] = Lease(owner, store, ttl_s)
                lease._thread = threading.Thread(target=lease._beat, args=(heartbeat_s,), daemon=True)
                lease._thread.start()
                return lease
            current = _read(store)
            if current is not None and not _stale(current):  # None: released meanwhile
                since = datetime.fromtimestamp(float(current["started"])).astimezone().isoformat(timespec="seconds")
                label, left = " ".join(str(current.get("what")).split()), round(float(current["expires"]) - time.time())
                raise RunLockedError(f"run {store.uri} is in use by {label} (host {current.get('host')}, pid "
                                     f"{current['pid']}, since {since}, lease expires in {max(0, left)}s): wait for it "
                                     "to finish, or stop it")
            if current is not None:
                log.warning("taking over the stale lease of run %s: %s", store.uri, current)
                _remove_if(store, current.get("token"))
    raise StoreError(f"could not take the lease of run {store.uri}: other processes keep taking it; try again")


@contextmanager
def run_lease(store: RunStore, what: str, ttl_s: float = 60.0, heartbeat_s: float = 15.0) -> Iterator[Lease]:
    """Hold the run's lease for the block (released also when it raises)."""
    lease = acquire_lease(store, what, ttl_s, heartbeat_s)
    try:
        yield lease
    finally:
        lease.release()


def read_lease(store: RunStore) -> dict[str, Any] | None:
    """The current owner record, or None when the run has no (readable) lease."""
    return _read(store) or None


def _read(store: RunStore, path: str | None = None) -> dict[str, Any] | None:
    """The record at ``path`` (default: the lease); None when missing, ``{}`` (stale: no token) when unreadable."""
    try:
        with store.fs.open(path or store.path(LEASE_FILE), "rb") as f:
            owner = json.loads(f.read())
    except FileNotFoundError:
        return None
    except ValueError:  # also UnicodeDecodeError
        return {}
    return owner if isinstance(owner, dict) else {}


def _stale(owner: dict[str, Any]) -> bool:
    """Expired, unreadable, or held by a pid gone from this host (or our own pid, left by an earlier process)."""
    try:
        expires, pid, _ = float(owner["expires"]), int(owner["pid"]), float(owner["started"])
    except (KeyError, TypeError, ValueError):
        return True
    if not owner.get("token") or time.time() > expires or pid <= 0:
        return True
    if owner.get("host") != socket.gethostname():
        return False
    try:
        with suppress(PermissionError):  # alive, another user's
            os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return pid == os.getpid()  # not in _held, so not ours: an earlier process had our pid (containers: pid 1)


def _create(store: RunStore, owner: dict[str, Any]) -> bool:
    """Create the lease file holding ``owner`` if there is none; True when it is ours."""
    data, path = json.dumps(owner).encode(), store.path(LEASE_FILE)
    if store.is_local:
        os.makedirs(store.path(), exist_ok=True)
        tmp = store.path(f"{TMP_PREFIX}{owner['token']}-{LEASE_FILE}")
        store.fs.pipe_file(tmp, data)
        try:
            os.link(tmp, path)  # fails when the name exists: exactly one creator wins
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
    try:
        with store.fs.open(path, "xb") as f:  # S3 via s3fs: a conditional put (If-None-Match: *)
            f.write(data)
    except FileExistsError:
        return False
    except (ValueError, NotImplementedError):  # no exclusive mode here: write unless there is one, then verify
        if not store.exists(LEASE_FILE):
            store.write_bytes(LEASE_FILE, data)
    time.sleep(SETTLE_S)  # a concurrent writer's record would show now
    return (_read(store) or {}).get("token") == owner["token"]


def _remove_if(store: RunStore, token: str | None) -> None:
    """Remove the lease file if it holds ``token`` (None: an unreadable record)."""
    if not store.is_local:
        if (_read(store) or {}).get("token") == token:
            store.remove(LEASE_FILE)
        return
    moved = store.path(f"{TMP_PREFIX}{uuid.uuid4().hex}-{LEASE_FILE}")
    try:
        os.rename(store.path(LEASE_FILE), moved)  # atomic: of several contenders, one gets the file
    except FileNotFoundError:
        return
    try:
        if (_read(store, moved) or {}).get("token") != token:  # not the record judged (a new owner's): put it back
            with suppress(FileExistsError):
                os.link(moved, store.path(LEASE_FILE))
    finally:
        os.unlink(moved)

"""Several nodes launched by the train stage (``train.nnodes > 1``): one unit per node, ``node-0`` .. ``node-<n-1>``,
each running one torchrun agent on its own Dask worker, all at the same time.

The agents meet at a c10d rendezvous hosted by ``node-0``'s agent: that unit picks a free port on its own host and
publishes ``host:port`` and a rendezvous id fresh for this attempt in ``rounds/<r>/train/rdzv.json`` (written whole
by the store); the other units wait until that file names an endpoint that accepts connections (a file left by a
dead ``node-0`` names a closed port, so a relaunched one is waited for), at most :data:`RDZV_WAIT_S`.
``runtime.rdzv_endpoint``, when set, is published instead of a port of ``node-0``'s host (then torch decides which
agent hosts the store, from the host names, and the file is trusted as soon as it exists).

Losing a node: its agent dies with its Dask worker, Dask sends the unit to another worker and it joins the same
rendezvous; the surviving agents' ranks fail on the lost peer, their agents restart them (``--max-restarts``) and
wait in the rendezvous for the relaunched one, and every rank resumes from ``checkpoint.pt``. Losing ``node-0``
loses the rendezvous store with it: the other agents fail, their units are retried (the train step's retry) and meet
the relaunched ``node-0`` at the rendezvous it publishes anew.

Completion: rank 0 records ``trained`` (:data:`~deepercluster.training.checkpoint.TRAINED`); each unit records
itself (``node-<i>``: host, Dask worker, endpoint) once its agent ended well and training is recorded; the stage's
``finalize`` step records the stage done.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from deepercluster.config import PipelineConfig
from deepercluster.paths import train_rel
from deepercluster.store import RunStore
from deepercluster.training.checkpoint import STAGE, training_done
from deepercluster.training.errors import TrainError
from deepercluster.training.launch import check_train_inputs, run_train_node, train_command

RDZV_WAIT_S = 600.0  # how long a node waits for node-0's rendezvous (a relaunch on a fresh worker takes seconds)
RDZV_POLL_S = 0.5
NODE_RESTARTS = 3  # worker restarts each agent allows (each lost peer costs the survivors one)
NODE_RESOURCE = "TORCHRUN"  # the Dask resource of a worker that can hold one agent (without runtime.gpu_workers)
PORTS = (20000, 32000)  # below Linux's ephemeral range: no outgoing connection takes the port before torchrun binds it

__all__ = ["NODE_RESOURCE", "Rendezvous", "await_rendezvous", "node_index", "node_name", "node_units",
           "publish_rendezvous", "rdzv_rel", "train_node"]


def node_name(i: int) -> str:
    return f"node-{i}"


def node_index(unit: str) -> int:
    return int(unit.removeprefix("node-"))


def node_units(cfg: PipelineConfig) -> list[str]:
    return [node_name(i) for i in range(cfg.train.nnodes)]


def rdzv_rel(r: int) -> str:
    return f"{train_rel(r)}/rdzv.json"


@dataclass(frozen=True)
class Rendezvous:
    """Where this attempt's agents meet; ``is_host``: whether this node's agent hosts the store (None: torch says)."""

    endpoint: str
    rdzv_id: str
    is_host: bool | None


def _worker_address() -> str | None:
    """The address of the Dask worker this runs on (None elsewhere)."""
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return None


def this_host() -> str:
    """The host other nodes reach this one at: that of the Dask worker's own address (the scheduler reaches it
    there, so its peers can too) when on a worker, else the host name."""
    address = _worker_address()
    if address and "://" in address:
        host = address.split("://", 1)[1].rsplit(":", 1)[0].strip("[]")
        if host:
            return host
    return socket.gethostname()


def free_port() -> int:
    """A port no process of this host listens on now, in :data:`PORTS` (bound on every interface, as the
    rendezvous store binds it)."""
    rng = np.random.default_rng()
    for port in rng.integers(*PORTS, size=200).tolist():
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return port
    raise TrainError(f"no free port in {PORTS[0]}-{PORTS[1]} on {socket.gethostname()} for the rendezvous")


def _reachable(endpoint: str, timeout: float = 2.0) -> bool:
    host, _, port = endpoint.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def publish_rendezvous(store: RunStore, cfg: PipelineConfig, r: int) -> Rendezvous:
    """(``node-0``) This attempt's rendezvous: a free port of this host (or ``runtime.rdzv_endpoint``) and a fresh
    id (a rendezvous that an agent closed on failing cannot be joined again), published for the other nodes."""
    configured = cfg.runtime.rdzv_endpoint
    endpoint = configured or f"{this_host()}:{free_port()}"
    rdzv = Rendezvous(endpoint, f"deepercluster-{cfg.hash}-r{r}-{uuid.uuid4().hex[:8]}", None if configured else True)
    store.write_json(rdzv_rel(r), {"endpoint": rdzv.endpoint, "rdzv_id": rdzv.rdzv_id, "configured": bool(configured),
                                   "host": socket.gethostname(), "pid": os.getpid(), "written_at": time.time()})
    return rdzv


def await_rendezvous(store: RunStore, r: int, unit: str, timeout: float = RDZV_WAIT_S,
                     should_stop: Callable[[], bool] | None = None) -> Rendezvous:
    """(Every node but ``node-0``) The rendezvous ``node-0`` published, once its store accepts connections (one
    left by a dead ``node-0`` never does: its relaunch publishes another). A one-line :class:`TrainError` after
    ``timeout`` seconds or when ``should_stop()`` says so."""
    rel = store.url(rdzv_rel(r))
    deadline = time.monotonic() + timeout
    seen: dict[str, Any] | None = None
    while True:
        if store.exists(rdzv_rel(r)):
            try:
                seen = store.read_json(rdzv_rel(r))
            except ValueError:  # a store without atomic writes, caught mid-write: read it again
                seen = None
            if seen is not None and (seen.get("configured") or _reachable(seen["endpoint"])):
                return Rendezvous(seen["endpoint"], seen["rdzv_id"], None if seen.get("configured") else False)
        if should_stop is not None and should_stop():
            raise TrainError(f"train round {r} {unit}: stopped on request while waiting for node-0's rendezvous")
        if time.monotonic() > deadline:
            state = (f"it names {seen['endpoint']}, which accepts no connection" if seen
                     else "it was never written")
            raise TrainError(f"train round {r} {unit}: no rendezvous of node-0 within {timeout:.0f} s ({rel}: "
                             f"{state}): is node-0's unit running, and can this node reach its host?")
        time.sleep(RDZV_POLL_S)


def train_node(store: RunStore, cfg: PipelineConfig, r: int, unit: str, on_line: Callable[[str], None] | None = None,
               should_stop: Callable[[], bool] | None = None, wait_s: float = RDZV_WAIT_S) -> dict[str, Any]:
    """One node's unit: this node's torchrun agent, from the rendezvous to the end of training; records ``unit``
    done with where it ran (host, Dask worker, endpoint) and returns that. A unit relaunched once training has
    ended only records itself (its peers are gone: no rendezvous could complete)."""
    i = node_index(unit)
    where: dict[str, Any] = {"node": i, "host": this_host(), "worker": _worker_address()}
    if training_done(store, r):
        store.mark_done(STAGE, r, unit, {**where, "trained_here": False})
        return where
    check_train_inputs(store, cfg, r)
    rdzv = publish_rendezvous(store, cfg, r) if i == 0 else await_rendezvous(store, r, unit, wait_s, should_stop)
    t = cfg.train
    command = train_command(store.uri, r, t.nproc, t.nnodes, rdzv.endpoint, rdzv.rdzv_id, NODE_RESTARTS, rdzv.is_host)
    say = on_line or (lambda s: print(s, flush=True))
    say(f"train r{r} {unit}: torchrun agent on {where['host']} meets {t.nnodes} nodes at {rdzv.endpoint} "
        f"(rendezvous {rdzv.rdzv_id}{', its host' if rdzv.is_host else ''})")
    rc, detail = run_train_node(store, cfg, r, on_line, should_stop, command)
    if rc != 0 or not training_done(store, r):
        raise TrainError(f"train round {r} {unit} failed (torchrun exit {rc}):\n{detail}")
    where.update(endpoint=rdzv.endpoint, rdzv_id=rdzv.rdzv_id, trained_here=True)
    store.mark_done(STAGE, r, unit, where)
    return where

"""Multi-node training launched by the train stage itself: with ``train.nnodes = 2`` the stage flow submits two
units, ``node-0`` and ``node-1``, each a torchrun agent of one rank on its own Dask worker of a real LocalCluster
(gloo on CPU), meeting at the rendezvous node-0 publishes in the run store. Killing one agent's Dask worker
mid-training relaunches its node elsewhere: the surviving agent restarts its rank and meets it again, and training
resumes from the checkpoint, ending with the same weights as the uninterrupted training."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from conftest import torchrun_agents
from test_training import make_run

from deepercluster.config import RuntimeConfig
from deepercluster.errors import ConfigError
from deepercluster.store import RunStore
from deepercluster.training import TrainError
from deepercluster.training.checkpoint import final_rel, read_log
from deepercluster.training.nodes import await_rendezvous, free_port, rdzv_rel

EPOCHS = 2  # 200 images // (2 ranks x 8) = 12 iterations an epoch: 24 steps, a checkpoint every 2
NODES = ("node-0", "node-1")


@pytest.fixture(scope="module")
def cluster(prefect_server) -> Iterator[tuple[str, Any]]:
    """The LocalCluster the flows start (single-threaded workers, each holding one TORCHRUN), and a client. Three
    workers for two nodes: a lost node's unit goes to the spare one at once (a killed worker's nanny restarts it
    too, but on this loaded 2-core machine that took from seconds to minutes)."""
    from distributed import Client

    from flows.dask_runtime import dask_scheduler

    with dask_scheduler(RuntimeConfig(dask_workers=3), torchrun_agents=True) as address, Client(address) as client:
        yield address, client


def _run(tmp_path: Path, image_folder: Path) -> RunStore:
    store, _ = make_run(tmp_path / "run", image_folder, nnodes=2, nproc=1, epochs=EPOCHS)
    return store


def _records(store: RunStore) -> dict[str, dict]:
    return {u: store.done_record("train", 0, u) for u in store.done_units("train", 0)}


def _until(condition: Callable[[], object], alive: Callable[[], bool], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert alive(), "the stage flow ended too early"
        assert time.monotonic() < deadline, "never reached"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def uninterrupted(cluster: tuple[str, Any], image_folder: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> tuple[RunStore, dict, dict[str, int], float]:
    """One two-node training run by the stage flow, never interrupted: its store, the flow's result, the workers'
    pids by address, and its wall seconds."""
    from flows.stages import stage_flow

    address, client = cluster
    store = _run(tmp_path_factory.mktemp("nodes-a"), image_folder)
    start = time.perf_counter()
    result = stage_flow(store.uri, "train", 0, dask_address=address)
    return store, result, client.run(os.getpid), time.perf_counter() - start


def test_a_node_waits_for_a_live_rendezvous(tmp_path: Path) -> None:
    """A node waits for node-0's rendezvous file, and ignores one whose port is closed (left by a dead node-0):
    one line when none comes in time."""
    store = RunStore(tmp_path / "run")
    with pytest.raises(TrainError, match="no rendezvous of node-0 within 0 s .*it was never written"):
        await_rendezvous(store, 0, "node-1", timeout=0.2)
    store.write_json(rdzv_rel(0), {"endpoint": f"127.0.0.1:{free_port()}", "rdzv_id": "old", "configured": False})
    with pytest.raises(TrainError, match="accepts no connection"):
        await_rendezvous(store, 0, "node-1", timeout=0.2)
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        endpoint = f"127.0.0.1:{listening.getsockname()[1]}"
        store.write_json(rdzv_rel(0), {"endpoint": endpoint, "rdzv_id": "new", "configured": False})
        rdzv = await_rendezvous(store, 0, "node-1", timeout=5)
    assert (rdzv.endpoint, rdzv.rdzv_id, rdzv.is_host) == (endpoint, "new", False)


@pytest.mark.slow
def test_too_few_workers_for_the_nodes_is_one_line(cluster: tuple[str, Any]) -> None:
    from flows.dask_runtime import require_resources

    address, _ = cluster
    require_resources(address, {"TORCHRUN": 1}, "train.nnodes", workers=3)
    with pytest.raises(ConfigError, match="train.nnodes = 4 needs 4 Dask workers with --resources TORCHRUN=1"):
        require_resources(address, {"TORCHRUN": 1}, "train.nnodes", workers=4)


@pytest.mark.slow
def test_the_stage_launches_every_node(uninterrupted: tuple[RunStore, dict, dict[str, int], float]) -> None:
    store, result, pids, seconds = uninterrupted
    print(f"two-node training by the stage flow: {seconds:.1f} s")
    assert store.stage_done("train", 0)
    assert result["world_size"] == 2 and result["steps"] == 12 * EPOCHS and result["resumed_from_step"] is None
    nodes = [store.done_record("train", 0, u) for u in NODES]
    workers = [n["worker"] for n in nodes]
    assert len(set(workers)) == 2 and set(workers) <= set(pids), workers  # two distinct workers of the cluster
    assert [n["pid"] for n in nodes] == [pids[w] for w in workers]  # each unit ran in its worker's process
    assert all(n["trained_here"] for n in nodes) and nodes[0]["rdzv_id"] == nodes[1]["rdzv_id"]
    assert store.read_json(rdzv_rel(0))["endpoint"] == nodes[0]["endpoint"] == nodes[1]["endpoint"]
    assert [n["worker"] for n in result["nodes"]] == workers  # the stage record says where each node ran
    assert [row["step"] for row in read_log(store, 0)] == list(range(1, 12 * EPOCHS + 1))


@pytest.mark.slow
def test_a_lost_node_is_relaunched_and_training_resumes(
        cluster: tuple[str, Any], image_folder: Path, tmp_path: Path,
        uninterrupted: tuple[RunStore, dict, dict[str, int], float]) -> None:
    from flows.stages import stage_flow

    address, client = cluster
    store = _run(tmp_path, image_folder)
    outcome: dict[str, Any] = {}

    def flow() -> None:
        try:
            outcome["result"] = stage_flow(store.uri, "train", 0, dask_address=address)
        except BaseException as err:  # reported by the assertions below
            outcome["error"] = err

    start = time.perf_counter()
    runner = threading.Thread(target=flow, daemon=True)
    runner.start()
    _until(lambda: any(u.startswith("iter-") for u in store.done_units("train", 0)), runner.is_alive)
    agents = torchrun_agents(store.uri)
    assert len(agents) == 2
    # the agent that does not host the rendezvous: the survivor keeps the rendezvous and waits for the relaunch
    (agent,) = [a for a in agents if "--rdzv-conf=is_host=false" in a.cmdline()]
    worker_pid = agent.ppid()
    assert worker_pid in client.run(os.getpid).values()  # the agent is its Dask worker's child
    kept = _records(store)
    os.kill(worker_pid, signal.SIGKILL)
    _, alive = psutil.wait_procs([agent], timeout=60)
    assert not alive, "torchrun outlived its Dask worker"
    runner.join(timeout=400)
    seconds = time.perf_counter() - start
    print(f"two-node training with one node lost and relaunched: {seconds:.1f} s")
    assert not runner.is_alive(), "the stage flow never ended"
    assert "error" not in outcome, repr(outcome.get("error"))
    result = outcome["result"]
    assert store.stage_done("train", 0)
    assert result["steps"] == 12 * EPOCHS and result["resumed_from_step"] > 0  # resumed, not from step 0
    records = _records(store)
    assert {u: records[u] for u in kept} == kept, "checkpoints written before the kill were redone"
    nodes = {u: records[u] for u in NODES}
    assert all(rec["pid"] != worker_pid for rec in nodes.values()), "a node unit recorded the killed worker"
    assert all(rec["trained_here"] for rec in nodes.values())
    # the same rendezvous id: the survivor's agent met the relaunched node (elastic restart); two ids: it gave up
    # (torch's 60 s store timeout) and both units were retried, meeting at a new rendezvous of node-0
    print("rendezvous of the nodes:", {u: rec["rdzv_id"] for u, rec in nodes.items()})
    assert [row["step"] for row in read_log(store, 0)] == list(range(1, 12 * EPOCHS + 1))
    # a resume is bitwise: the same weights as the training that was never interrupted
    reference, _, _, _ = uninterrupted
    a, b = store.load_torch(final_rel(0)), reference.load_torch(final_rel(0))
    assert all(torch.equal(a["body"][k], b["body"][k]) for k in a["body"])
    assert all(torch.equal(a["heads"][k], b["heads"][k]) for k in a["heads"])

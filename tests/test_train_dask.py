"""The train stage sends torchrun to a Dask worker (a flow process or container never needs a GPU), as an operator
runs it: `deepercluster stage train` in its own process against an existing Dask scheduler. The torchrun agent is
the worker's child, not the flow's; it stops when the flow process is SIGKILLed (the task is released) and when the
worker itself is SIGKILLed (it dies with its parent), and the rerun resumes from the checkpoints left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from conftest import torchrun_agents
from test_training import make_run

from deepercluster.store import RunStore

pytestmark = pytest.mark.slow
CLI = str(Path(sys.executable).parent / "deepercluster")


def _until(condition: Callable[[], object], proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, "the stage ended too early:\n" + log.read_text()[-3000:]
        assert time.monotonic() < deadline, "never reached:\n" + log.read_text()[-3000:]
        time.sleep(0.05)


def _records(store: RunStore) -> dict:
    return {u: store.done_record("train", 0, u) for u in store.done_units("train", 0)}


def test_torchrun_runs_on_a_dask_worker_and_stops_with_its_task(image_folder: Path, tmp_path: Path,
                                                                prefect_server) -> None:
    from distributed import Client, LocalCluster

    from flows.dask_runtime import prefect_api_url

    store, _ = make_run(tmp_path / "run", image_folder, epochs=12)  # 144 steps, a checkpoint every 2
    api = prefect_api_url()
    worker_env = {"PREFECT_API_URL": api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
                      env=worker_env) as cluster, Client(cluster) as client:
        env = {**os.environ, **worker_env, "DEEPERCLUSTER_DASK_ADDRESS": cluster.scheduler_address}
        log = tmp_path / "log.txt"

        def start() -> subprocess.Popen:
            return subprocess.Popen([CLI, "stage", "train", "--run", store.uri, "--round", "0"], env=env,
                                    stdout=log.open("a"), stderr=subprocess.STDOUT, start_new_session=True)

        # 1. the flow process is killed mid-training: its Dask task is released and the worker stops torchrun
        proc = start()
        _until(lambda: store.done_units("train", 0), proc, log)
        (agent,) = torchrun_agents(store.uri)
        (worker_pid,) = client.run(os.getpid).values()
        assert agent.ppid() == worker_pid  # torchrun is the Dask worker's child, not the flow's
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        _, alive = psutil.wait_procs([agent], timeout=60)
        assert not alive, "torchrun kept training after its flow was killed"
        kept = _records(store)
        assert kept and not store.stage_done("train", 0)

        # 2. the worker is killed mid-training: torchrun dies with it, Dask reruns the task on the restarted
        # worker, which resumes from the checkpoints, and the stage ends
        proc = start()
        _until(lambda: len(store.done_units("train", 0)) > len(kept) + 1, proc, log)
        (agent,) = torchrun_agents(store.uri)
        (worker_pid,) = client.run(os.getpid).values()
        os.kill(worker_pid, signal.SIGKILL)
        _, alive = psutil.wait_procs([agent], timeout=60)
        assert not alive, "torchrun outlived its Dask worker"
        assert proc.wait(timeout=400) == 0, log.read_text()[-3000:]
    assert store.stage_done("train", 0)
    final = store.done_record("train", 0, "_stage")
    assert final["steps"] == 144 and final["resumed_from_step"] > 0
    records = _records(store)
    assert {u: records[u] for u in kept} == kept, "checkpoints written before the first kill were redone"
    assert "train done" in log.read_text()

"""The extract stage on real Dask clusters (the session's 2-worker LocalCluster, a `dask worker --resources GPU=1`
process, a local "GPU" cluster whose worker is SIGKILLed mid-stage) and a killed `deepercluster stage extract`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_overrides
from distributed import Client

from deepercluster.config import PipelineConfig, RuntimeConfig, build_config
from deepercluster.data.datasets import ImageList
from deepercluster.data.shard import load_manifest, shard_ids
from deepercluster.data.transforms import clustering_view
from deepercluster.device import cpu_compute
from deepercluster.features import model_loads, model_rel, open_features, unit_name
from deepercluster.models import load_body
from deepercluster.run import init_run
from deepercluster.stages import run_stage
from deepercluster.store import RunStore

pytestmark = pytest.mark.slow
CLI = str(Path(sys.executable).parent / "deepercluster")


def _new_run(path: Path, digits_dir: Path, **sections) -> tuple[RunStore, PipelineConfig]:
    cfg = build_config(tiny_overrides(digits_dir, **sections))
    store = RunStore(path)
    init_run(store, cfg)
    run_stage(store, cfg, "shard")
    return store, cfg


def _reference(store: RunStore, cfg: PipelineConfig) -> np.ndarray:
    """Single-process extraction the plain way: the dataset's view, one batch, the body in float32."""
    body = load_body(cfg.model, store.load_torch(model_rel(0))["body"]).eval()
    images = ImageList(load_manifest(store)["uri"].tolist(),
                       clustering_view(cfg.data.image_size, cfg.data.crop_ratio))
    with torch.inference_mode():
        return body(torch.stack([images[i] for i in range(len(images))])).numpy()


def _assert_every_shard_matches(store: RunStore, reference: np.ndarray) -> None:
    array = open_features(store, 0)
    manifest = load_manifest(store)
    assert array.shape == reference.shape and array.dtype == np.float16
    for s in shard_ids(manifest):
        ids = manifest["image_id"][manifest["shard"] == s]
        lo, hi = int(ids.iloc[0]), int(ids.iloc[-1]) + 1
        np.testing.assert_allclose(array[lo:hi].astype(np.float32), reference[lo:hi], rtol=4e-3, atol=4e-3,
                                   err_msg=f"shard {s}")


def _done(store: RunStore) -> list[str]:
    """Completed shards (a kill can leave the temporary file of a record being written: not a unit)."""
    return [u for u in store.done_units("extract", 0) if not u.startswith(".")]


def _records(store: RunStore) -> dict:
    return {u: store.done_record("extract", 0, u) for u in _done(store)}


def test_two_workers_match_a_single_process_reference(tmp_path: Path, digits_dir: Path, dask_address):
    from flows.stages import stage_flow

    store, cfg = _new_run(tmp_path / "run", digits_dir)
    with Client(dask_address) as client:
        before = client.run(model_loads)
        info = stage_flow(store.uri, "extract", 0, dask_address=dask_address)
        loads = {w: n - before[w] for w, n in client.run(model_loads).items() if w in before}
        worker_pids = set(client.run(os.getpid).values())
    assert info["shards"] == 6 and store.stage_done("extract", 0)
    _assert_every_shard_matches(store, _reference(store, cfg))

    pids = {rec["pid"] for rec in _records(store).values()}
    assert pids <= worker_pids and len(pids) == 2, "the shards ran on both Dask workers"
    assert set(loads.values()) <= {0, 1} and sum(loads.values()) == len(pids), "one model load per worker"


def _worker_probe() -> tuple[str | None, int, int]:
    from distributed import get_worker

    from deepercluster.device import cpu_compute

    with cpu_compute():
        inside = torch.get_num_threads()
    return os.environ.get("MALLOC_TRIM_THRESHOLD_"), get_worker().state.nthreads, inside


def test_workers_forward_on_their_task_threads_with_adaptive_malloc(dask_address):
    """Workers of our LocalCluster start without Dask's MALLOC_TRIM_THRESHOLD_ (it made every large torch tensor a
    fresh mmap: ResNet-18 30% slower), and CPU extraction runs torch on the worker's task threads."""
    with Client(dask_address) as client:
        workers = list(client.scheduler_info()["workers"])
        probes = client.gather([client.submit(_worker_probe, workers=[w], pure=False) for w in workers])
    assert [p[0] for p in probes] == [None] * len(workers)
    assert all(inside == nthreads for _, nthreads, inside in probes)
    before = torch.get_num_threads()
    with cpu_compute(3):  # in a plain process: the threads asked for, restored afterwards
        assert torch.get_num_threads() == 3
    assert torch.get_num_threads() == before


def test_gpu_annotation_sends_shards_only_to_gpu_workers(tmp_path: Path, digits_dir: Path, dask_address):
    """An existing scheduler (by address) gains a `dask worker --resources GPU=1`: with runtime.gpu_workers the
    shards go to it alone, never to the two plain workers."""
    from flows.dask_runtime import prefect_api_url
    from flows.stages import stage_flow

    store, _ = _new_run(tmp_path / "run", digits_dir, runtime={"gpu_workers": True, "dask_address": dask_address})
    env = {**os.environ, "PREFECT_API_URL": prefect_api_url()}
    worker = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", dask_address, "--nthreads", "1",
                               "--resources", "GPU=1", "--no-dashboard", "--name", "gpu-worker"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        with Client(dask_address) as client:
            client.wait_for_workers(3, timeout=60)
            gpu = [a for a, w in client.scheduler_info(n_workers=-1)["workers"].items() if w["resources"].get("GPU")]
            gpu_pid = client.run(os.getpid, workers=gpu)[gpu[0]]
            stage_flow(store.uri, "extract", 0)  # the address comes from the run's config
            client.retire_workers(gpu, close_workers=True)
    finally:
        worker.terminate()
        worker.wait(timeout=30)
    assert {rec["pid"] for rec in _records(store).values()} == {gpu_pid}


def test_stage_survives_a_killed_worker(tmp_path: Path, digits_dir: Path, prefect_server):
    """SIGKILL one worker process of a local GPU-resource cluster while it extracts a shard: the scheduler moves the
    shard to a worker that is alive, and the stage completes with every row right."""
    from flows.dask_runtime import dask_scheduler
    from flows.stages import stage_flow

    store, cfg = _new_run(tmp_path / "run", digits_dir, data={"shard_size": 10, "image_size": 32},
                          extract={"batch_size": 5}, runtime={"gpu_workers": True})
    killed: dict = {}

    def kill_a_busy_worker(address: str) -> None:
        with Client(address) as client:
            pids = client.run(os.getpid)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                busy = [w for w, keys in client.processing().items() if keys]
                if busy and _done(store):
                    killed.update(worker=busy[0], pid=pids[busy[0]], done=len(_done(store)))
                    os.kill(pids[busy[0]], signal.SIGKILL)
                    return
                time.sleep(0.01)

    with dask_scheduler(RuntimeConfig(dask_workers=2, gpu_workers=True)) as address:
        with Client(address) as client:
            assert all(w["resources"] == {"GPU": 1} for w in client.scheduler_info()["workers"].values())
        killer = threading.Thread(target=kill_a_busy_worker, args=(address,))
        killer.start()
        info = stage_flow(store.uri, "extract", 0, dask_address=address)
        killer.join()
        with Client(address) as client:
            alive = set(client.run(os.getpid).values())
    assert killed, "no worker was killed during the stage"
    assert killed["pid"] not in alive and killed["done"] < 24
    assert info["shards"] == 24 and store.stage_done("extract", 0)
    _assert_every_shard_matches(store, _reference(store, cfg))


def test_rerun_after_a_killed_flow_recomputes_only_missing_shards(tmp_path: Path, digits_dir: Path, dask_address):
    from flows.dask_runtime import prefect_api_url
    from flows.stages import stage_flow

    store, cfg = _new_run(tmp_path / "run", digits_dir, data={"shard_size": 10, "image_size": 32},
                          extract={"batch_size": 5})
    n = 24
    env = {**os.environ, "PREFECT_API_URL": prefect_api_url()}
    log = tmp_path / "stage.log"
    proc = subprocess.Popen([CLI, "stage", "extract", "--run", store.uri, "--round", "0"], env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 180
    while not 0 < len(_done(store)) < n - 2:
        assert proc.poll() is None, f"the stage ended before the kill point: {log.read_text()[-2000:]}"
        assert time.monotonic() < deadline, "kill point never reached"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the flow, its LocalCluster and its workers
    proc.wait()

    survived = _records(store)
    assert 0 < len(survived) < n and not store.stage_done("extract", 0)
    stage_flow(store.uri, "extract", 0, dask_address=dask_address)
    after = _records(store)
    recomputed = sorted(u for u in after if after[u] != survived.get(u))
    assert {u: after[u] for u in survived} == survived, "a shard finished before the kill was recomputed"
    assert recomputed == sorted(unit_name(s) for s in range(n) if unit_name(s) not in survived)
    assert len(recomputed) == n - len(survived)
    print(f"killed flow: {len(survived)}/{n} shards survived, rerun recomputed {len(recomputed)}")
    _assert_every_shard_matches(store, _reference(store, cfg))


def test_unreadable_image_fails_the_flow_in_one_line_and_keeps_the_other_shards(tmp_path: Path, digits_dir: Path,
                                                                                  dask_address):
    import shutil

    from deepercluster.errors import DataError
    from flows.stages import stage_flow

    shutil.copytree(digits_dir, tmp_path / "images")
    store, _ = _new_run(tmp_path / "run", tmp_path / "images")
    victim = load_manifest(store)["uri"].iloc[50]  # shard 1
    Path(victim).write_bytes(b"")
    with pytest.raises(DataError, match="cannot read .*rerun the shard stage with --force") as err:
        stage_flow(store.uri, "extract", 0, dask_address=dask_address)
    assert victim in str(err.value) and "\n" not in str(err.value)
    assert sorted(_done(store)) == [unit_name(s) for s in (0, 2, 3, 4, 5)] and not store.stage_done("extract", 0)

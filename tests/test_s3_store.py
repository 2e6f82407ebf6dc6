"""The run store on S3: a real S3-compatible server on loopback (moto's server mode) reached through s3fs.

The pipeline runs as a real `deepercluster run` process with its store at ``s3://...``, is killed (SIGKILL to its
process group: flow, Dask workers) in the middle of extraction, and resumed there by the same command."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import tiny_overrides

from deepercluster.config import build_config
from deepercluster.errors import ConfigError, StoreError
from deepercluster.store import RunStore, resolve_storage_options

CLI = str(Path(sys.executable).parent / "deepercluster")
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's S3 server on a free loopback port, with one bucket ``runs``."""
    port = _free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                socket.create_connection(("127.0.0.1", port), 0.5).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "moto server did not start"
                time.sleep(0.1)
        _s3_store(endpoint, "s3://runs").fs.mkdir("runs")
        yield endpoint
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _s3_store(endpoint: str, uri: str) -> RunStore:
    return RunStore(uri, {"endpoint_url": endpoint, "key": "testing", "secret": "testing"})


def test_storage_options_come_from_the_environment(monkeypatch: pytest.MonkeyPatch, s3_endpoint: str):
    for k, v in CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("DEEPERCLUSTER_STORAGE_OPTIONS", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    assert resolve_storage_options("/tmp/run") == {}
    assert resolve_storage_options("s3://runs/x")["endpoint_url"] == s3_endpoint
    monkeypatch.setenv("DEEPERCLUSTER_STORAGE_OPTIONS", '{"endpoint_url": "http://elsewhere:1"}')
    assert resolve_storage_options("s3://runs/x")["endpoint_url"] == "http://elsewhere:1"
    assert resolve_storage_options("s3://runs/x", {"endpoint_url": s3_endpoint})["endpoint_url"] == s3_endpoint
    monkeypatch.setenv("DEEPERCLUSTER_STORAGE_OPTIONS", "{endpoint")
    with pytest.raises(StoreError, match="not valid JSON"):
        RunStore("s3://runs/x")
    monkeypatch.delenv("DEEPERCLUSTER_STORAGE_OPTIONS")

    # a store opened from the URI alone (as Dask workers and torchrun ranks do) sees another process's writes
    store = RunStore("s3://runs/env-only")
    store.mark_done("extract", 0, "shard-00000", {"rows": [0, 4]})
    other = subprocess.run([sys.executable, "-c", "from deepercluster.store import RunStore; "
                            "RunStore('s3://runs/env-only').mark_done('extract', 0, 'shard-00001')"],
                           env={**os.environ}, capture_output=True, text=True)
    assert other.returncode == 0, other.stderr
    assert store.done_units("extract", 0) == ["shard-00000", "shard-00001"]
    assert store.done_record("extract", 0, "shard-00000")["rows"] == [0, 4]


def test_config_refuses_credentials_in_storage_options(digits_dir: Path):
    with pytest.raises(ConfigError, match=r"runtime.storage_options: key, secret would be saved"):
        build_config(tiny_overrides(digits_dir, runtime={"storage_options": {"key": "a", "secret": "b"}}))


def _records(store: RunStore, stages: dict) -> dict:
    out = {}
    for stage, r in stages.items():
        for unit in store.done_units(stage, r) + (["_stage"] if store.stage_done(stage, r) else []):
            out[(stage, r, unit)] = store.done_record(stage, r, unit)
    return out


@pytest.mark.slow
def test_pipeline_on_s3_is_killed_and_resumes(tmp_path: Path, digits_dir: Path, s3_endpoint: str, prefect_server):
    from prefect.settings import PREFECT_API_URL

    # the endpoint reaches the flow, its Dask workers and the torchrun ranks from the config alone
    overrides = tiny_overrides(digits_dir, rounds=1, data={"shard_size": 20},
                               eval={"linear_probe": False, "knn": False},
                               runtime={"storage_options": {"endpoint_url": s3_endpoint}})
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(overrides))
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "AWS_ENDPOINT"))},
           **CREDENTIALS, "PREFECT_API_URL": PREFECT_API_URL.value(), "COLUMNS": "200"}
    env.pop("DEEPERCLUSTER_STORAGE_OPTIONS", None)
    uri = "s3://runs/killed"
    command = [CLI, "run", "--config", str(config), "--run", uri]
    store = _s3_store(s3_endpoint, uri)
    log = tmp_path / "log.txt"
    stages = {"shard": None, "extract": 0, "cluster": 0, "train": 0, "evaluate": 0}

    proc = subprocess.Popen(command, stdout=log.open("a"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + 300
    while not 0 < len(store.done_units("extract", 0)) < 12:
        assert proc.poll() is None, "the run ended before the kill point:\n" + log.read_text()[-3000:]
        assert time.monotonic() < deadline, "kill point never reached:\n" + log.read_text()[-3000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    kept = _records(store, stages)
    assert store.stage_done("shard", None) and not store.stage_done("extract", 0)
    assert 0 < sum(k[0] == "extract" for k in kept) < 12

    resumed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "kmNMI" in resumed.stdout
    final = _records(store, stages)
    assert [k for k, v in kept.items() if final[k] != v] == [], "units finished before the kill were redone"
    assert all(store.stage_done(s, r) for s, r in stages.items())
    assert len(store.done_units("extract", 0)) == 12
    for rel in ("config.yaml", "data/manifest.parquet", "rounds/0/features.zarr/zarr.json", "rounds/0/model.pt",
                "rounds/0/clusters/assignments.parquet", "rounds/0/train/final.pt", "rounds/1/model.pt",
                "rounds/0/eval/metrics.json", "history.parquet"):
        assert store.exists(rel), rel
    assert store.read_parquet("rounds/0/clusters/assignments.parquet")["image_id"].tolist() == list(range(240))
    assert store.exists("metrics.png") and store.listdir("rounds/0/eval/gallery")  # inspection wrote to S3 too

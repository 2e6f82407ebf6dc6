"""Prefect deployments for real: a `prefect server` on PostgreSQL, a process work pool, `prefect deploy` from
deployments/prefect.yaml, a `prefect worker`, and `prefect deployment run` from the command line, as an operator
would; states are checked through the Prefect API and results in the run store.

PostgreSQL: ``$DEEPERCLUSTER_TEST_POSTGRES_URL`` (an empty database, ``postgresql+asyncpg://...``) when set, else a
throwaway cluster started here with the ``initdb`` of the system's PostgreSQL (.ci/run installs it with apt-get)."""

from __future__ import annotations

import glob
import inspect
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import tiny_overrides

from deepercluster.config import build_config
from deepercluster.run import init_run
from deepercluster.store import ROUND_STAGES, RunStore
from tasks.publish import artifact_key

ROOT = Path(__file__).resolve().parents[1]
DEPLOYMENTS = ROOT / "deployments"
BIN = Path(sys.executable).parent
PROCESS_POOL = "deepercluster-process"
STAGES = ("shard", "extract", "cluster", "train", "evaluate")
DEPLOYED = {"deepercluster/loop", "clusterfit/run", *(f"stage/{s}" for s in STAGES)}  # flow name/deployment name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def _deployments(name: str) -> list[dict]:
    return yaml.safe_load((DEPLOYMENTS / name).read_text())["deployments"]


def test_deployment_files_match_the_flows():
    """Both files deploy every flow with parameters the flow accepts; the Docker file mirrors the process one; the
    flow `stage` has one deployment per stage, named after it, fixing its `stage` parameter."""
    from prefect.cli.deploy._models import PrefectYamlModel
    from prefect.flows import load_flow_from_entrypoint

    process, docker = _deployments("prefect.yaml"), _deployments("prefect-docker.yaml")
    for name in ("prefect.yaml", "prefect-docker.yaml"):
        model = PrefectYamlModel.model_validate(yaml.safe_load((DEPLOYMENTS / name).read_text()))
        assert len(model.deployments) == 7 and all(d.work_pool and d.work_pool.name for d in model.deployments)
    flows = {}
    for d in process:
        flow = load_flow_from_entrypoint(str(ROOT / d["entrypoint"]))
        params = inspect.signature(flow.fn).parameters
        assert set(d["parameters"]) <= set(params), d["entrypoint"]
        assert "run" not in d["parameters"] and params["run"].default is inspect.Parameter.empty  # run is required
        flows[f"{flow.name}/{d['name']}"] = d
    assert set(flows) == DEPLOYED
    for s in STAGES:
        expected = {"stage": s, "force": False} | ({} if s == "shard" else {"round": 0})
        assert flows[f"stage/{s}"]["parameters"] == expected, s
    assert [(d["entrypoint"], d["parameters"]) for d in docker] == [(d["entrypoint"], d["parameters"]) for d in process]
    assert {d["work_pool"]["name"] for d in process} == {PROCESS_POOL}
    job = docker[0]["work_pool"]["job_variables"]
    assert job["image"] == f"deepercluster:{_version()}" and job["env"]["DEEPERCLUSTER_DASK_ADDRESS"].startswith("tcp://")


# ---- real servers -------------------------------------------------------------------------------------------------
def _initdb() -> Path | None:
    found = shutil.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))[::-1]), None)
    return Path(found).resolve() if found else None


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    if url := os.environ.get("DEEPERCLUSTER_TEST_POSTGRES_URL"):
        yield url
        return
    initdb = _initdb()
    if initdb is None:
        message = "PostgreSQL is not installed (apt-get install postgresql, as .ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    data = Path(tempfile.mkdtemp(prefix="deepercluster-pg-"))
    if as_postgres:
        shutil.chown(data, "postgres", "postgres")
    port = _free_port()
    pg_ctl = str(initdb.parent / "pg_ctl")
    subprocess.run([*as_postgres, str(initdb), "-D", str(data / "db"), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                    "--no-sync"], check=True, capture_output=True)
    options = f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off"
    subprocess.run([*as_postgres, pg_ctl, "-D", str(data / "db"), "-l", str(data / "log"), "-o", options, "-w",
                    "start"], check=True, capture_output=True)
    try:
        yield f"postgresql+asyncpg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_postgres, pg_ctl, "-D", str(data / "db"), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(data, ignore_errors=True)


def _env(api_url: str, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "PREFECT_SERVER_DATABASE"))}
    return {**env, "PREFECT_API_URL": api_url, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_LOGGING_LEVEL": "INFO", "COLUMNS": "200"}


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def prefect_on_postgres(postgres_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict, str]]:
    """`prefect server start` on PostgreSQL (its own process, not the test harness); yields (API URL, CLI env,
    database URL)."""
    home = tmp_path_factory.mktemp("prefect-pg")
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = _env(api, home)
    server_env = {**env, "PREFECT_SERVER_DATABASE_CONNECTION_URL": postgres_url, "PREFECT_UI_ENABLED": "false"}
    server_env.pop("PREFECT_API_URL")
    log = home / "server.log"
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=server_env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{api}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "prefect server did not come up:\n" + log.read_text()[-3000:]
            time.sleep(0.5)
        yield api, env, postgres_url
    finally:
        _stop(server)


@pytest.fixture(scope="module")
def dask_on() -> Iterator:
    """``dask_on(api)``: the address of a Dask LocalCluster (1 worker) whose workers report to the server at ``api``."""
    clusters = {}

    def address(api: str) -> str:
        if api not in clusters:
            from distributed import LocalCluster

            clusters[api] = LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
                                         env={"PREFECT_API_URL": api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
        return clusters[api].scheduler_address

    yield address
    for cluster in clusters.values():
        cluster.close()


def _prefect(env: dict, *args: str, timeout: float = 300) -> str:
    done = subprocess.run([str(BIN / "prefect"), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def _records(store: RunStore, stage: str, r: int | None) -> dict:
    return {u: store.done_record(stage, r, u) for u in [*store.done_units(stage, r), "_stage"]}


@pytest.mark.slow
def test_deployments_on_a_prefect_server_with_postgres(prefect_on_postgres, dask_on, tmp_path: Path,
                                                      digits_dir: Path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    api, env, postgres_url = prefect_on_postgres
    # pools and deployments, exactly as the header of deployments/prefect.yaml says
    _prefect(env, "work-pool", "create", PROCESS_POOL, "--type", "process")
    _prefect(env, "work-pool", "create", "deepercluster-docker", "--type", "docker")
    _prefect(env, "deploy", "--all", "--prefect-file", "deployments/prefect.yaml")
    _prefect(env, "deploy", "--all", "--prefect-file", "deployments/prefect-docker.yaml")
    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        flow_names = {f.id: f.name for f in client.read_flows()}
        deployed = {f"{flow_names[d.flow_id]}/{d.name}": d for d in client.read_deployments()}
    assert DEPLOYED | {f"{n}-docker" for n in DEPLOYED} == set(deployed)
    assert {deployed[n].work_pool_name for n in DEPLOYED} == {PROCESS_POOL}
    assert deployed["stage/cluster"].parameters == {"stage": "cluster", "round": 0, "force": False}
    assert deployed["stage/cluster"].pull_steps == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]
    assert deployed["stage/cluster-docker"].job_variables["image"] == f"deepercluster:{_version()}"

    run = str(tmp_path / "run")
    cfg = build_config(tiny_overrides(digits_dir, rounds=1, eval={"linear_probe": False, "knn": False}))
    store = RunStore(run)
    init_run(store, cfg)
    # as in docker-compose.yml: the worker's flow runs send their Dask work to one shared scheduler
    worker_log = tmp_path / "worker.log"
    worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", PROCESS_POOL, "--type", "process"],
                              cwd=tmp_path, env={**env, "DEEPERCLUSTER_DASK_ADDRESS": dask_on(api)},
                              stdout=worker_log.open("w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        # 1. one stage (the flow `deepercluster stage shard --run RUN` runs)
        with temporary_settings({PREFECT_API_URL: api}):
            shard_run = run_deployment("stage/shard", parameters={"run": run}, timeout=300, poll_interval=1)
        assert shard_run.state.is_completed(), shard_run.state
        assert store.stage_done("shard", None) and not store.stage_done("extract", 0)
        shard_records = _records(store, "shard", None)

        # 2. the loop deployment on the same run URI resumes: the shard stage is skipped, every other stage runs
        with temporary_settings({PREFECT_API_URL: api}):
            loop_run = run_deployment("deepercluster/loop", parameters={"run": run}, timeout=400, poll_interval=1)
        assert loop_run.state.is_completed(), loop_run.state
        assert _records(store, "shard", None) == shard_records
        assert all(store.stage_done(s, 0) for s in ROUND_STAGES)
        for rel in ("rounds/0/features.zarr", "rounds/0/clusters/assignments.parquet", "rounds/0/train/final.pt",
                    "rounds/1/model.pt", "rounds/0/eval/metrics.json", "history.parquet", "metrics.png"):
            assert store.exists(rel), rel
        assert store.listdir("rounds/0/eval/gallery")
        untouched = {s: _records(store, s, 0) for s in ("extract", "train", "evaluate")}
        cluster_before = store.done_record("cluster", 0, "_stage")

        # 3. rerun one stage with force from the command line: only that stage is recomputed
        _prefect(env, "deployment", "run", "stage/cluster", "--param", f"run={run}", "--param", "round=0",
                 "--param", "force=true", "--watch", "--watch-timeout", "300")
        assert store.done_record("cluster", 0, "_stage")["finished_at"] > cluster_before["finished_at"]
        assert {s: _records(store, s, 0) for s in untouched} == untouched
    finally:
        _stop(worker)

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        runs = client.read_flow_runs()
        by_deployment = {}
        for fr in runs:
            if fr.deployment_id:
                by_deployment.setdefault(fr.deployment_id, []).append(fr)
        for name in ("stage/shard", "deepercluster/loop", "stage/cluster"):
            (fr,) = by_deployment[deployed[name].id]
            assert fr.state.type == StateType.COMPLETED, (name, fr.state)
            assert fr.parameters["run"] == run
            if name.startswith("stage/"):  # the deployment's fixed stage ran: the flow `stage`, units on Dask
                assert fr.parameters["stage"] == name.split("/")[1]
                children = [c for c in runs if c.parent_task_run_id
                            and client.read_task_run(c.parent_task_run_id).flow_run_id == fr.id]
                assert [client.read_flow(c.flow_id).name for c in children] == ["stage-units"]  # its units
        # the loop's stages are subflow runs of the same server, all completed
        sub = [fr for fr in runs if fr.parent_task_run_id is not None]
        assert {f.name for f in client.read_flows()} >= {"deepercluster", "stage", "stage-units"}
        assert sub and all(fr.state.type == StateType.COMPLETED for fr in sub)
        artifacts = {a.key for a in client.read_latest_artifacts()}
        assert {artifact_key(store, "history"), artifact_key(store, "r0", "cluster-sizes"),
                artifact_key(store, "r0", "galleries")} <= artifacts
    assert _count_rows(postgres_url, "flow_run") == len(runs)  # the server's database is this PostgreSQL


def _count_rows(url: str, table: str) -> int:
    import asyncio

    import asyncpg

    async def count() -> int:
        conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            return await conn.fetchval(f"SELECT count(*) FROM {table}")
        finally:
            await conn.close()

    return asyncio.run(count())

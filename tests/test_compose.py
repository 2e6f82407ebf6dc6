"""docker-compose.yml against the Compose specification's JSON schema (no Docker engine runs here).

The schema is the one check-jsonschema ships (``vendor.compose-spec``, from compose-spec/compose-spec). The file is
validated as Docker Compose would see it: variables interpolated from .env.example, YAML anchors merged."""

from __future__ import annotations

import copy
import importlib.resources
import json
import re
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
_VAR = re.compile(r"\$(?:\$|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\})")


def compose_schema() -> dict:
    files = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    return json.loads((files / "compose-spec.json").read_text())


def dotenv(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if line.strip() and not line.startswith("#"))
    return {k.strip(): v.strip() for k, v in pairs}


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable syntax: $$, ${VAR}, ${VAR:-default}, ${VAR:?error} (an unset required one is an error)."""

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m["name"], m["op"], m["arg"]
        if env.get(name):
            return env[name]
        if op and op.endswith("?"):
            raise ValueError(f"{name}: {arg}")
        return arg if op and op.endswith("-") else ""

    return _VAR.sub(sub, text)


def load_compose(env: dict[str, str] | None = None) -> dict:
    env = dotenv(ROOT / ".env.example") if env is None else env
    return yaml.safe_load(interpolate((ROOT / "docker-compose.yml").read_text(), env))


def errors(doc: dict) -> list[str]:
    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema, format_checker=jsonschema.FormatChecker())
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def test_compose_file_is_valid_against_the_compose_schema():
    assert compose_schema()["title"] == "Compose Specification"
    doc = load_compose()
    assert errors(doc) == []
    assert set(doc["services"]) >= {"postgres", "prefect-server", "prefect-worker", "dask-scheduler",
                                    "dask-gpu-worker-0", "minio"}

    # the validation bites: a device reservation without capabilities, a misspelt key
    broken = copy.deepcopy(doc)
    broken["services"]["dask-gpu-worker-0"]["deploy"]["resources"]["reservations"]["devices"][0].pop("capabilities")
    broken["services"]["minio"]["helthcheck"] = {"test": "true"}
    found = errors(broken)
    assert len(found) == 2 and "'capabilities' is a required property" in found[0] + found[1]
    assert any(e.startswith("services/minio") and "helthcheck" in e for e in found)


def test_gpu_workers_reserve_one_gpu_each_and_advertise_it():
    services = load_compose()["services"]
    workers = {n: s for n, s in services.items() if n.startswith("dask-gpu-worker-")}
    assert workers
    device_ids = []
    for name, svc in workers.items():
        (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"], name
        assert len(device["device_ids"]) == 1 and "count" not in device, name
        device_ids += device["device_ids"]
        command = svc["command"].split()
        assert command[:3] == ["dask", "worker", "tcp://dask-scheduler:8786"], name
        assert command[command.index("--resources") + 1] == "GPU=1", name
        assert command[command.index("--nthreads") + 1] == "1", name
        assert svc["image"] == services["dask-scheduler"]["image"] == services["prefect-worker"]["image"]
    assert len(set(device_ids)) == len(device_ids), "two workers reserve the same GPU"
    # the flow runs (in the Prefect worker) get no GPU: GPU work goes to the Dask workers
    assert "deploy" not in services["prefect-worker"]
    assert services["prefect-worker"]["environment"]["DEEPERCLUSTER_DASK_ADDRESS"] == "tcp://dask-scheduler:8786"


def test_services_are_local_healthy_and_keep_their_data():
    doc = load_compose()
    env = dotenv(ROOT / ".env.example")
    for name, svc in doc["services"].items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond localhost"
        if svc.get("restart") != "no":
            assert "healthcheck" in svc, f"{name} has no health check"
    assert doc["services"]["postgres"]["volumes"] == ["postgres-data:/var/lib/postgresql/data"]
    assert doc["services"]["minio"]["volumes"] == ["minio-data:/data"]
    assert set(doc["volumes"]) == {"postgres-data", "minio-data"}

    # secrets come from .env: none is written in the compose file, and .env is never committed
    raw = (ROOT / "docker-compose.yml").read_text()
    assert not any(value in raw for key, value in env.items() if "PASSWORD" in key)
    assert ".env" in (ROOT / ".gitignore").read_text().split() and ".env" in (ROOT / ".dockerignore").read_text()
    with pytest.raises(ValueError, match="MINIO_ROOT_USER: copy .env.example to .env"):
        load_compose({k: v for k, v in env.items() if k != "MINIO_ROOT_USER"})
    worker = doc["services"]["prefect-worker"]["environment"]
    assert worker["AWS_ACCESS_KEY_ID"] == env["MINIO_ROOT_USER"] and worker["AWS_ENDPOINT_URL"] == "http://minio:9000"

    # the server image is the Prefect version the project pins
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    prefect = next(p.split("==")[1] for p in pins if p.startswith("prefect=="))
    assert doc["services"]["prefect-server"]["image"].startswith(f"prefecthq/prefect:{prefect}-")
    start = doc["services"]["prefect-worker"]["command"][-1]
    assert "prefect deploy --all --prefect-file deployments/prefect.yaml" in start and "--with-healthcheck" in start


def test_every_image_is_pinned():
    """No `latest` and no untagged image: a rebuild months later starts the same servers. This project's image is
    tagged with its version, the one deployments/prefect-docker.yaml runs flows in."""
    services = load_compose()["services"]
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    for name, svc in services.items():
        image = svc["image"]
        repo, _, tag = image.rpartition(":")
        assert repo and "/" not in tag and tag not in ("", "latest"), f"{name}: {image} is not pinned to a tag"
        if "build" in svc:
            assert image == f"deepercluster:{version}", name
    docker_pool = yaml.safe_load((ROOT / "deployments" / "prefect-docker.yaml").read_text())
    assert docker_pool["definitions"]["work_pool"]["job_variables"]["image"] == f"deepercluster:{version}"
    assert re.search(r"^FROM python:3\.11\.\d+-slim-\w+$", (ROOT / "Dockerfile").read_text(), re.M)


def test_image_workers_start_without_the_malloc_trim_threshold(monkeypatch):
    """The image installs deployments/dask.yaml in /etc/dask/: nannies then spawn workers without Dask's
    MALLOC_TRIM_THRESHOLD_ (it made torch's CPU forward 30% slower), and keep the other per-worker variables."""
    import dask
    from distributed.nanny import _get_env_variables

    assert re.search(r"^COPY deployments/dask\.yaml /etc/dask/\S+\.yaml$", (ROOT / "Dockerfile").read_text(), re.M)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    key = "distributed.nanny.pre-spawn-environ"
    with dask.config.set({f"{key}.MALLOC_TRIM_THRESHOLD_": 65536}):  # Dask's default (a session cluster may unset it)
        assert "MALLOC_TRIM_THRESHOLD_" in _get_env_variables(key)
        image = dask.config.update(copy.deepcopy(dask.config.config), yaml.safe_load((ROOT / "deployments" /
                                                                                 "dask.yaml").read_text()))
    with dask.config.set(image):  # as Dask merges /etc/dask/*.yaml over its defaults
        env = _get_env_variables(key)
    assert "MALLOC_TRIM_THRESHOLD_" not in env and env["OMP_NUM_THREADS"] == "1"

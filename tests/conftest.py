"""Shared test setup. Environment first: Prefect reads its settings when it is imported."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_TMP = Path(tempfile.mkdtemp(prefix="deepercluster-tests-"))
os.environ.update(
    {
        "PREFECT_HOME": str(_TMP / "prefect"),
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(_TMP / "prefect" / "results"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "DEEPERCLUSTER_CACHE": str(_TMP / "cache"),
        "DEEPERCLUSTER_LOCAL_CACHE": str(_TMP / "local-cache"),  # the node-local files the train inputs map
    }
)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """240 real labelled digits (24 per class) as PNG files in class folders."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("digits")
    bunch = load_digits()
    counts = dict.fromkeys(range(10), 0)
    for i, (img, label) in enumerate(zip(bunch.images, bunch.target, strict=True)):
        if counts[int(label)] >= 24:
            continue
        counts[int(label)] += 1
        (root / str(label)).mkdir(exist_ok=True)
        Image.fromarray((img * 255 / 16).astype(np.uint8), mode="L").save(root / str(label) / f"{i:04d}.png")
    return root


TRAIN_IMAGES = 200  # random 16 px RGB images for the training tests: 200 // (2 ranks x 8) = 12 iterations per epoch


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``TRAIN_IMAGES`` random 16x16 RGB PNGs (no labels), shared by the training tests."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(TRAIN_IMAGES):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i:04d}.png")
    return folder


def tiny_overrides(source: Path | str, **sections: dict) -> dict:
    """A config small enough for a test: 16 px smallnet, 40-image shards, few clusters, one short epoch."""
    base = {
        "method": "deepercluster",
        "rounds": 2,
        "data": {"source": str(source), "shard_size": 40, "image_size": 16},
        "model": {"arch": "smallnet", "feature_dim": 32},
        "extract": {"batch_size": 32},
        "cluster": {"super_clusters": 2, "k": 5, "pca_dim": 16, "niter": 10},
        "train": {"epochs": 1, "batch_size": 16, "nproc": 1, "checkpoint_every": 4},
        "runtime": {"dask_workers": 2},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values} if isinstance(values, dict) else values
    return base


@pytest.fixture(scope="session")
def prefect_server():
    """One Prefect test server for the whole session (it takes ~20 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def dask_address(prefect_server):
    """A real Dask LocalCluster (2 worker processes) whose workers report to the test Prefect server."""
    from deepercluster.config import RuntimeConfig
    from flows.dask_runtime import dask_scheduler

    with dask_scheduler(RuntimeConfig(dask_workers=2)) as address:
        yield address


def torchrun_agents(run_uri: str) -> list:
    """The torchrun agents (``psutil.Process``) training ``run_uri``: the processes to kill in the resume tests."""
    import psutil

    return [p for p in psutil.process_iter(["cmdline"])
            if "torch.distributed.run" in (cmd := p.info["cmdline"] or []) and run_uri in cmd]

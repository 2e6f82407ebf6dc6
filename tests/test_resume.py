"""Kill `deepercluster run` for real (SIGKILL to its whole process group: flow, Prefect server, Dask workers,
torchrun) in the middle of extraction and again in the middle of training; the rerun must finish without redoing
completed units and end with the same assignments as an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import tiny_overrides

from deepercluster.clustering.stage import load_assignments
from deepercluster.store import RunStore

pytestmark = pytest.mark.slow
CLI = str(Path(sys.executable).parent / "deepercluster")


def _env() -> dict[str, str]:
    """A fresh temporary Prefect server per command (as a user's laptop), and a wide table."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}, "COLUMNS": "200"}


def _start(config: Path, run: Path, log: Path) -> subprocess.Popen:
    env = _env()
    return subprocess.Popen([CLI, "run", "--config", str(config), "--run", str(run)], stdout=log.open("a"),
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _kill_when(proc: subprocess.Popen, condition, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, "the run ended before the kill point"
        assert time.monotonic() < deadline, "kill point never reached"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _all_records(store: RunStore, rounds: int) -> dict:
    out = {}
    for stage, rs in [("shard", [None]), *[(s, range(rounds)) for s in ("extract", "cluster", "train", "evaluate")]]:
        for r in rs:
            for unit in store.done_units(stage, r) + (["_stage"] if store.stage_done(stage, r) else []):
                out[(stage, r, unit)] = store.done_record(stage, r, unit)
    return out


def test_killed_run_resumes_to_the_same_result(tmp_path: Path, digits_dir: Path):
    overrides = tiny_overrides(digits_dir, data={"shard_size": 20},
                               train={"epochs": 2, "nproc": 2, "batch_size": 8, "checkpoint_every": 2})
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(overrides))
    log = tmp_path / "log.txt"

    reference = tmp_path / "reference"
    done = subprocess.run([CLI, "run", "--config", str(config), "--run", str(reference)], capture_output=True,
                          text=True, env=_env())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "kmNMI" in done.stdout and "per-round metrics" in done.stdout

    run = tmp_path / "killed"
    store = RunStore(run)
    n_shards = 12

    # 1. kill in the middle of round 0's extraction
    proc = _start(config, run, log)
    _kill_when(proc, lambda: 0 < len(store.done_units("extract", 0)) < n_shards)
    assert not store.stage_done("extract", 0)
    kept = _all_records(store, 2)
    assert any(k[0] == "extract" for k in kept)

    # 2. resume, and kill in the middle of round 0's training
    proc = _start(config, run, log)
    _kill_when(proc, lambda: len(store.done_units("train", 0)) > 0)
    assert not store.stage_done("train", 0)
    records = _all_records(store, 2)
    assert all(records[k] == v for k, v in kept.items()), "a unit finished before the first kill was redone"
    kept = records

    # 3. resume to the end
    proc = _start(config, run, log)
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    final = _all_records(store, 2)
    redone = [k for k, v in kept.items() if final[k] != v]
    assert not redone, f"units redone after resume: {redone}"
    for r in (0, 1):
        assert load_assignments(store, r).equals(load_assignments(RunStore(reference), r)), f"round {r} differs"

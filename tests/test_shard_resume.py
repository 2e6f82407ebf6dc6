"""Kill the shard stage for real (SIGKILL) in the middle of scanning, rerun it: no part is lost, none is scanned
twice, and the manifest is the one an uninterrupted run writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deepercluster.config import build_config
from deepercluster.data.shard import load_manifest
from deepercluster.stages import run_stage
from deepercluster.store import RunStore

pytestmark = pytest.mark.slow
N_IMAGES, PART_SIZE = 3000, 20
N_PARTS = N_IMAGES // PART_SIZE


def _records(store: RunStore) -> dict[str, dict]:
    # a record being written when the process died is left under a temporary name: not a record; the manifest's
    # own record is not a listing part
    units = [u for u in store.done_units("shard", None) if u.startswith("part-")]
    return {u: store.done_record("shard", None, u) for u in units}


def test_killed_shard_stage_resumes_without_losing_or_repeating_parts(tmp_path: Path):
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        (tmp_path / "images" / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(
            tmp_path / "images" / f"c{i % 3}" / f"{i:05d}.png")
    overrides = {"data": {"source": str(tmp_path / "images"), "shard_size": 64, "part_size": PART_SIZE},
                 "cluster": {"k": 1, "super_clusters": 1}}
    cfg = build_config(overrides)

    killed = RunStore(tmp_path / "killed")
    code = ("import json, sys; from deepercluster.config import build_config; "
            "from deepercluster.stages import run_stage; from deepercluster.store import RunStore; "
            "run_stage(RunStore(sys.argv[1]), build_config(json.loads(sys.argv[2])), 'shard')")
    proc = subprocess.Popen([sys.executable, "-c", code, str(killed.uri), json.dumps(overrides)],
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while len(_records(killed)) < N_PARTS // 4:
        assert proc.poll() is None, "the stage ended before the kill point"
        assert time.monotonic() < deadline, "kill point never reached"
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _records(killed)
    assert 0 < len(before) < N_PARTS and not killed.stage_done("shard", None)
    assert not killed.exists("data/manifest.parquet")

    info = run_stage(killed, cfg, "shard")
    after = _records(killed)
    assert sorted(after) == [f"part-{i:05d}" for i in range(N_PARTS)]  # none lost
    assert all(after[u] == before[u] for u in before)  # none scanned again: same record, same killed pid
    assert {after[u]["pid"] for u in set(after) - set(before)} == {os.getpid()}
    assert len(killed.listdir("data/parts")) == N_PARTS + sum(n.startswith(".tmp-") for n in
                                                              killed.listdir("data/parts"))

    reference = RunStore(tmp_path / "reference")
    assert run_stage(reference, cfg, "shard") == {k: v for k, v in info.items()}
    a, b = load_manifest(killed), load_manifest(reference)
    assert len(a) == N_IMAGES and a.equals(b)
    assert a["image_id"].tolist() == list(range(N_IMAGES)) and a["sha256"].is_unique

"""Two commands on one run: the second `deepercluster run` (or `stage`) exits at once with one line naming the
run's owner, while the first completes; the first's output, piped to a file at 80 columns, is short (no Prefect
line) and its table holds every round's metrics in full; afterwards `inspect` reads the run with its data source
moved away."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import tiny_overrides

from deepercluster.evaluation.stage import load_history
from deepercluster.store import RunStore

pytestmark = pytest.mark.slow
CLI = str(Path(sys.executable).parent / "deepercluster")


def test_a_second_command_on_a_leased_run_is_refused_and_inspect_needs_no_data(tmp_path: Path, digits_dir: Path):
    from typer.testing import CliRunner

    from deepercluster.cli import app

    source = tmp_path / "images"
    shutil.copytree(digits_dir, source)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_overrides(source, rounds=1)))
    run = tmp_path / "run"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}, "COLUMNS": "80"}
    log = tmp_path / "first.log"
    first = subprocess.Popen([CLI, "run", "--config", str(config), "--run", str(run)], stdout=log.open("w"),
                             stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while not (run / "_lease.json").exists():
            assert first.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the first run never took its lease"
            time.sleep(0.05)
        for args in (["run", "--config", str(config), "--run", str(run)], ["stage", "cluster", "--run", str(run)]):
            second = subprocess.run([CLI, *args], capture_output=True, text=True, env=env, timeout=120)
            lines = [line for line in (second.stdout + second.stderr).splitlines() if line.strip()]
            assert second.returncode == 2 and len(lines) == 1, lines
            assert f"is in use by deepercluster run (host {socket.gethostname()}, pid {first.pid}" in lines[0]
        assert first.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert not (run / "_lease.json").exists()  # released at the end

    out = log.read_text().splitlines()
    assert len(out) < 60 and not [line for line in out if "Task run" in line or "Flow run" in line], out
    assert all(len(line) <= 80 for line in out if line[:1] in "┏┃┡│└")  # the table fits (paths may not)
    table = [[c.strip() for c in line.strip("│").split("│")] for line in out if line.startswith("│")]
    history = load_history(RunStore(run))
    assert [int(row[0]) for row in table] == history["round"].tolist() == [0, 1]
    for row, (_, want) in zip(table, history.iterrows(), strict=True):
        for cell, column in zip(row[1:5], ("kmeans_nmi_labels", "probe_acc", "knn_acc", "nmi_labels"), strict=True):
            assert cell == ("-" if want[column] != want[column] else f"{want[column]:.3f}"), (column, cell)

    shutil.move(source, tmp_path / "moved-away")
    result = CliRunner().invoke(app, ["inspect", str(run)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "shard: done" in result.output and "stale:" not in result.output and "note:" not in result.output
    assert "galleries skipped: the run's images cannot be read here" in result.output

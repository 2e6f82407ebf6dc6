"""A user's error reaches the console as one line: before anything is written when it can be known from the
config, else from inside a stage (its traceback only in the run's log), and the corrected config resumes the run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import tiny_overrides

from deepercluster.store import RunStore

CLI = str(Path(sys.executable).parent / "deepercluster")


def test_a_plain_file_as_source_is_refused_before_the_run_exists(tmp_path: Path, digits_dir: Path):
    from typer.testing import CliRunner

    from deepercluster.cli import app

    image = next(digits_dir.glob("*/*.png"))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_overrides(image)))
    result = CliRunner().invoke(app, ["run", "--config", str(config), "--run", str(tmp_path / "run")])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and "cannot tell what data source" in lines[0], lines
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_user_error_in_a_stage_is_one_line_and_the_corrected_config_resumes(tmp_path: Path, digits_dir: Path):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}, "COLUMNS": "80"}
    run = tmp_path / "run"
    bad, good = tmp_path / "bad.yaml", tmp_path / "good.yaml"
    bad.write_text(yaml.safe_dump(tiny_overrides(digits_dir, rounds=1, cluster={"k": 200})))  # 2 x 200 > 240 images
    good.write_text(yaml.safe_dump(tiny_overrides(digits_dir, rounds=1)))
    failed = subprocess.run([CLI, "run", "--config", str(bad), "--run", str(run)], capture_output=True, text=True,
                            env=env, timeout=600)
    out = (failed.stdout + failed.stderr).splitlines()
    errors = [line for line in out if line.startswith("error:")]
    assert failed.returncode == 2 and errors == [
        "error: cluster.k x cluster.super_clusters = 400 exceeds the 240 images of the run"], out
    assert not [line for line in out if "Traceback" in line or "ERROR" in line], out
    logs = list((run / "logs").glob("*.log"))
    assert len(logs) == 1 and "Traceback" in logs[0].read_text()  # the details are in the run's log

    store = RunStore(run)
    made = {s: store.done_record(s, r, "_stage") for s, r in (("shard", None), ("extract", 0))}
    fixed = subprocess.run([CLI, "run", "--config", str(good), "--run", str(run)], capture_output=True, text=True,
                           env=env, timeout=600)
    assert fixed.returncode == 0, fixed.stdout[-3000:] + fixed.stderr[-3000:]
    assert "config changed: cluster.k 200 -> 5" in fixed.stdout
    assert {s: store.done_record(s, r, "_stage") for s, r in (("shard", None), ("extract", 0))} == made
    assert store.stage_done("evaluate", 1)

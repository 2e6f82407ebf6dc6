"""The train flow on a real Prefect test server: rank 0's per-iteration progress reaches Prefect as a progress
artifact of the task run, and the run's log."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_training import N_IMAGES, make_run

from tasks.train import TrainProgress


class _Logger:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, msg: str, *args: object) -> None:
        self.lines.append(msg % args if args else msg)

    def warning(self, msg: str, *args: object) -> None:
        self.lines.append("WARNING " + (msg % args if args else msg))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Artifact creation outside of a flow")  # the reporter made by hand below
def test_train_flow_reports_progress_to_prefect(image_folder: Path, tmp_path: Path, prefect_server) -> None:
    from prefect.client.orchestration import get_client

    from flows.stages import train_flow

    store, _ = make_run(tmp_path / "run", image_folder, nproc=1, epochs=1)
    info = train_flow(store.uri, 0)
    assert info["steps"] == N_IMAGES // 8 and info["world_size"] == 1
    with get_client(sync_client=True) as client:
        latest = {a.key: a for a in client.read_latest_artifacts()}
    progress = latest["train-round-0"]
    assert progress.type == "progress" and float(progress.data) == 100.0
    assert progress.task_run_id is not None  # attached to the train task's run

    # the reporter: at most one progress line per interval, always the last one, every other line as it comes,
    # and a broken Prefect never stops it
    logger = _Logger()
    reporter = TrainProgress(logger, 0, min_interval_s=3600)
    row = "train r0 step {}/3 epoch 0 iter {}/3 loss 1.0000 acc_super 0.500 acc_sub 0.500 10 img/s"
    for step in (1, 2, 3):
        reporter(row.format(step, step))
    reporter("W0000 a torch warning")
    reporter._artifact = "not-an-artifact-id"  # updates now fail
    reporter._last = float("-inf")
    reporter(row.format(3, 3))
    assert logger.lines[:3] == [row.format(1, 1), row.format(3, 3), "W0000 a torch warning"]
    assert logger.lines[-1].startswith("WARNING train progress reporting failed")

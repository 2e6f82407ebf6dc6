"""The train flow on a real Prefect test server: rank 0's per-iteration progress reaches Prefect as a progress
artifact of the task run, and the run's log."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_training import N_IMAGES, make_run

from deepercluster.stages.train import ProgressLines
from deepercluster.training.progress import describe_progress, format_progress, parse_progress
from tasks.publish import artifact_key
from tasks.units import PrefectReporter


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

    from flows.stages import stage_flow

    store, _ = make_run(tmp_path / "run", image_folder, nproc=1, epochs=1)
    info = stage_flow(store.uri, "train", 0)
    assert info["steps"] == N_IMAGES // 8 and info["world_size"] == 1
    with get_client(sync_client=True) as client:
        latest = {a.key: a for a in client.read_latest_artifacts()}
    progress = latest[artifact_key(store, "train-r0", "progress")]
    assert progress.type == "progress" and float(progress.data) == 100.0
    assert progress.task_run_id is not None  # attached to the train task's run

    # the workers' lines: at most one progress line per interval, always the last one, every other line as it comes
    collected = _Collected()
    feed = ProgressLines(collected, min_interval_s=3600)
    rows = [{"epoch": 0, "iter": s - 1, "step": s, "loss": 1.0, "acc_super": 0.5, "acc_sub": 0.5,
             "images_per_s": 10.0} for s in (1, 2, 3)]
    for row in rows:
        feed(format_progress(0, row, 3, 3))
    feed("W0000 a torch warning")
    first, last = (describe_progress(parse_progress(format_progress(0, rows[i], 3, 3))) for i in (0, 2))
    assert collected.lines == [first, last, "W0000 a torch warning"] and collected.fractions == [1 / 3, 1.0]
    # and a broken Prefect never stops the work
    logger = _Logger()
    reporter = PrefectReporter("k", "d", min_interval_s=0, logger=logger)
    reporter._artifact = "not-an-artifact-id"  # updates now fail
    reporter.progress(0.5)
    reporter.line("still logged")
    assert logger.lines[0].startswith("WARNING progress reporting failed") and logger.lines[-1] == "still logged"


class _Collected:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.fractions: list[float] = []

    def line(self, text: str) -> None:
        self.lines.append(text)

    def progress(self, fraction: float) -> None:
        self.fractions.append(fraction)

    def should_stop(self) -> bool:
        return False

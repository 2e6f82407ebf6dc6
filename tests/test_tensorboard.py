"""TensorBoard event files of a run, read back with TensorBoard's own reader: training steps, per-round metrics,
cluster-size histograms, galleries and an embedding-projector export of a seeded sample of the features."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import tiny_overrides

from deepercluster.config import build_config
from deepercluster.evaluation.stage import load_history
from deepercluster.run import init_run
from deepercluster.stages import run_all
from deepercluster.store import RunStore
from deepercluster.training.checkpoint import read_log


def test_event_files_hold_steps_metrics_and_a_projector(tmp_path: Path, digits_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    store = RunStore(tmp_path / "run")
    cfg = build_config(tiny_overrides(digits_dir, rounds=1, eval={"embedding_sample": 50}))
    init_run(store, cfg)
    run_all(store, cfg)

    r0 = EventAccumulator(str(tmp_path / "run" / "tb" / "r0"), size_guidance={"images": 0, "scalars": 0})
    r0.Reload()
    log = read_log(store, 0)
    loss = r0.Scalars("train/loss")
    assert [e.step for e in loss] == [row["step"] for row in log]
    assert [e.value for e in loss] == pytest.approx([row["loss"] for row in log], rel=1e-6)
    assert "clusters/size" in r0.Tags()["histograms"] and len(r0.Tags()["images"]) == 4

    run = EventAccumulator(str(tmp_path / "run" / "tb" / "run"), size_guidance={"scalars": 0})
    run.Reload()
    history = load_history(store)
    for r in (0, 1):
        want = history.set_index("round").loc[r, "probe_acc"]
        got = {e.step: e.value for e in run.Scalars("round/probe_acc")}[r]
        assert got == pytest.approx(want, rel=1e-6)

    config = (tmp_path / "run" / "tb" / "r0" / "projector_config.pbtxt").read_text()
    assert 'tensor_name: "features-r0' in config and "sprite" in config
    folder = tmp_path / "run" / "tb" / "r0" / config.split('tensor_path: "')[1].split('"')[0]
    assert len(folder.read_text().splitlines()) == 50  # the sample's rows
    metadata = (folder.parent / "metadata.tsv").read_text().splitlines()
    assert metadata[0] == "cluster\tlabel" and len(metadata) == 51

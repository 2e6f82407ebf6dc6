"""The train stage: the round's pseudo-labels -> torchrun training epochs -> ``rounds/<r+1>/model.pt``. One unit:
this node's torchrun agent (on a Dask worker holding GPU = ``train.nproc`` with ``runtime.gpu_workers``); a retry
resumes from the last checkpoint."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar

from deepercluster.config import PipelineConfig
from deepercluster.stages.base import Reporter, Round, Stage, Step, register
from deepercluster.store import RunStore
from deepercluster.training.checkpoint import STAGE as TRAIN
from deepercluster.training.checkpoint import reset_train
from deepercluster.training.launch import train_round
from deepercluster.training.progress import describe_progress, parse_progress

PROGRESS_EVERY_S = 2.0


def _todo(store: RunStore, cfg: PipelineConfig, r: Round) -> list[str]:
    return [] if store.stage_done(TRAIN, r) else ["train"]


class ProgressLines:
    """The workers' output as a reporter wants it: rank 0's progress records as a fraction done and a readable line
    at most every ``min_interval_s`` (and the last), every other line (a warning, a rank's error) as it comes."""

    def __init__(self, report: Reporter, min_interval_s: float = PROGRESS_EVERY_S):
        self.report, self.min_interval_s = report, min_interval_s
        self._last = float("-inf")

    def __call__(self, line: str) -> None:
        p = parse_progress(line)
        if p is None:
            self.report.line(line)
            return
        now = time.monotonic()
        if p["step"] < p["steps"] and now - self._last < self.min_interval_s:
            return
        self._last = now
        self.report.line(describe_progress(p))
        self.report.progress(p["step"] / p["steps"])


def _train(store: RunStore, cfg: PipelineConfig, r: Round, unit: Any, report: Reporter) -> dict[str, Any]:
    assert r is not None
    return train_round(store, cfg, r, on_line=ProgressLines(report), should_stop=report.should_stop)


def _resources(cfg: PipelineConfig) -> dict[str, int] | None:
    return {"GPU": cfg.train.nproc} if cfg.runtime.gpu_workers else None


@dataclass
class TrainStage(Stage):
    name: ClassVar[str] = "train"
    section: ClassVar[str] = "train"
    # the body is rebuilt from the model section; its batch-norm statistics are recalibrated on the data view
    fields: ClassVar[tuple[str, ...]] = ("train", "model", "seed", "data.image_size", "data.crop_ratio",
                                         "cluster.super_clusters", "cluster.k")

    def inputs(self, cfg: PipelineConfig, r: Round) -> list[tuple[str, Round]]:
        if cfg.method == "clusterfit":  # the labels are another network's, the model the new network's init
            return [("cluster", r)]
        return [("extract", r), ("cluster", r)]

    def steps(self) -> list[Step]:
        return [Step("train", _todo, _train, resources=_resources, retries=1, retry_user_errors=True)]

    def discard(self, store: RunStore, cfg: PipelineConfig, r: Round) -> None:
        assert r is not None
        reset_train(store, r)


STAGE = register(TrainStage())

"""The train stage: the round's pseudo-labels -> torchrun training epochs -> ``rounds/<r+1>/model.pt``.

One node (``train.nnodes = 1``): one unit, ``train``, this node's torchrun agent (on a Dask worker holding
GPU = ``train.nproc`` with ``runtime.gpu_workers``); the trainer records the stage done; a retry resumes from the
last checkpoint. Several nodes: units ``node-0`` .. ``node-<n-1>`` that run at the same time, each agent on its own
Dask worker (GPU = ``train.nproc`` with ``runtime.gpu_workers``, else the resource ``TORCHRUN`` = 1, which each
worker of a LocalCluster started for a multi-node run holds once), meeting at the rendezvous ``node-0`` publishes
(:mod:`deepercluster.training.nodes`); each records itself, then the ``finalize`` step records the stage."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar

from deepercluster.config import PipelineConfig
from deepercluster.errors import StoreError
from deepercluster.stages.base import RECORD_KEYS, Reporter, Round, Stage, Step, register
from deepercluster.store import RunStore
from deepercluster.training.checkpoint import STAGE as TRAIN
from deepercluster.training.checkpoint import TRAINED, reset_train, training_done
from deepercluster.training.launch import train_round
from deepercluster.training.nodes import NODE_RESOURCE, node_units, train_node
from deepercluster.training.progress import describe_progress, parse_progress

PROGRESS_EVERY_S = 2.0


def _todo(store: RunStore, cfg: PipelineConfig, r: Round) -> list[str]:
    """``train`` (one node), or every node's unit while training runs (none can train without all the others), then
    those not recorded yet (a unit whose worker died after training ended)."""
    if store.stage_done(TRAIN, r):
        return []
    if cfg.train.nnodes == 1:
        return ["train"]
    assert r is not None
    units = node_units(cfg)
    return [u for u in units if not store.is_done(TRAIN, r, u)] if training_done(store, r) else units


def _finalize_todo(store: RunStore, cfg: PipelineConfig, r: Round) -> list[str]:
    return [] if cfg.train.nnodes == 1 or store.stage_done(TRAIN, r) else ["finalize"]


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
    if unit == "train":
        return train_round(store, cfg, r, on_line=ProgressLines(report), should_stop=report.should_stop)
    return train_node(store, cfg, r, unit, on_line=ProgressLines(report), should_stop=report.should_stop)


def _finalize(store: RunStore, cfg: PipelineConfig, r: Round, unit: Any, report: Reporter) -> dict[str, Any]:
    """(Several nodes) The stage record: what rank 0 recorded of the training, and where each node's agent ran."""
    trained = store.done_record(TRAIN, r, TRAINED)
    nodes = store.done_records(TRAIN, r, node_units(cfg))
    missing = [u for u in node_units(cfg) if u not in nodes]
    if trained is None or missing:
        what = "training was not recorded as ended" if trained is None else f"{', '.join(missing)} recorded nothing"
        raise StoreError(f"train round {r}: every node's unit ran but {what}: rerun the stage")
    info = {k: v for k, v in trained.items() if k not in RECORD_KEYS}
    info["nodes"] = [{k: v for k, v in nodes[u].items() if k not in RECORD_KEYS} | {"pid": nodes[u]["pid"]}
                     for u in node_units(cfg)]
    store.mark_stage_done(TRAIN, r, info)
    return {"nodes": len(nodes)}


def _resources(cfg: PipelineConfig) -> dict[str, int] | None:
    """GPU = ``train.nproc`` per agent with GPU workers; else one ``TORCHRUN`` per agent with several nodes (so no
    two agents share a worker: they would wait for each other); else anywhere."""
    if cfg.runtime.gpu_workers:
        return {"GPU": cfg.train.nproc}
    return {NODE_RESOURCE: 1} if cfg.train.nnodes > 1 else None


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
        return [Step("train", _todo, _train, resources=_resources, retries=1, retry_user_errors=True, together=True),
                Step("finalize", _finalize_todo, _finalize)]

    def discard(self, store: RunStore, cfg: PipelineConfig, r: Round) -> None:
        assert r is not None
        reset_train(store, r)


STAGE = register(TrainStage())

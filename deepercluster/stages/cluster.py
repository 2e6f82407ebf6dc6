"""The cluster stage: features -> PCA-whitening -> level-1 k-means (m super-clusters) -> level-2 k-means per
super-cluster -> ``assignments.parquet``. Steps: whitening and level 1 (one unit); one unit per super-cluster
(GPU=1 each); merging the units into the assignments and the statistics (one unit). Resuming re-checks the
sizes of the done units' recorded outputs (one listing): a unit whose file is missing or resized is redone, and a
whitened shard's loss redoes level 1 (which whitens the missing shards)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from deepercluster.clustering import stage as lib
from deepercluster.config import PipelineConfig
from deepercluster.stages.base import Reporter, Round, Stage, Step, register, until_done
from deepercluster.store import RunStore


def _level1_todo(store: RunStore, cfg: PipelineConfig, r: Round) -> list[str]:
    done = store.done_units(lib.STAGE, r)
    if lib.LEVEL1_UNIT in done:
        checked = [u for u in done if u == lib.LEVEL1_UNIT or u.startswith("whiten-")]
        if store.redo_bad_units(lib.STAGE, r, checked):
            store.forget(lib.STAGE, r, lib.LEVEL1_UNIT)  # level 1 whitens what is missing, then clusters again
        else:
            return []
    return [lib.LEVEL1_UNIT]


def _supers_todo(store: RunStore, cfg: PipelineConfig, r: Round) -> list[int]:
    done = set(store.done_units(lib.STAGE, r))
    supers = [u for u in done if u.startswith("super-")]
    done -= set(store.redo_bad_units(lib.STAGE, r, supers))
    return [s for s in range(cfg.cluster.super_clusters) if lib.super_unit(s) not in done]


def _level1(store: RunStore, cfg: PipelineConfig, r: Round, unit: Any, report: Reporter) -> int:
    return len(lib.prepare_cluster(store, cfg, r))


@dataclass
class ClusterStage(Stage):
    name: ClassVar[str] = "cluster"
    section: ClassVar[str] = "cluster"
    # head_init: centroids also saves each sub-cluster's mean feature (what the train stage's heads start from)
    fields: ClassVar[tuple[str, ...]] = ("cluster", "seed", "train.head_init")

    def inputs(self, cfg: PipelineConfig, r: Round) -> list[tuple[str, Round]]:
        return [("extract", r)]

    def steps(self) -> list[Step]:
        return [
            Step(lib.LEVEL1_UNIT, _level1_todo, _level1, gpu=True),
            Step("supers", _supers_todo, lambda store, cfg, r, s, rep: lib.cluster_super(store, cfg, r, s),
                 label=lib.super_unit, gpu=True, retries=1),
            Step("finalize", until_done(lib.STAGE), lambda store, cfg, r, u, rep: lib.finalize_cluster(store, cfg, r)),
        ]

    def discard(self, store: RunStore, cfg: PipelineConfig, r: Round) -> None:
        lib.discard_cluster(store, r)

    def result(self, store: RunStore, cfg: PipelineConfig, r: Round) -> dict[str, Any]:
        return store.read_json(lib.clusters_rel(r, "stats.json"))


STAGE = register(ClusterStage())

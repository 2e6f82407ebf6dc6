"""The evaluate stage: features (+ assignments) -> NMI/ARI against labels, k-means agreement, linear probe, kNN,
cluster statistics, training figures -> ``metrics.json`` and the round's row of ``history.parquet``.

Steps, one unit each, each recorded when done (a killed stage resumes at the first unit not done): the cluster
metrics (streamed over every image) and the probes (on a labelled sample) write partial results; ``metrics``
merges them; then the TensorBoard events and the stage record. A partial whose file is lost or resized is
recomputed; ``metrics`` is redone whenever a partial it merged was."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from deepercluster.config import PipelineConfig
from deepercluster.evaluation import stage as lib
from deepercluster.stages.base import Round, Stage, Step, register, until_done
from deepercluster.stages.extract import final_round
from deepercluster.store import RunStore


def _part_todo(unit: str) -> Callable[[RunStore, PipelineConfig, Round], list[str]]:
    """The ``todo`` of a partial unit: the unit unless its record is there and its file as recorded."""

    def todo(store: RunStore, cfg: PipelineConfig, r: Round) -> list[str]:
        if store.is_done(lib.STAGE, r, unit) and not store.redo_bad_units(lib.STAGE, r, [unit]):
            return []
        return [unit]

    return todo


def _metrics_todo(store: RunStore, cfg: PipelineConfig, r: Round) -> list[str]:
    """``metrics`` unless ``metrics.json`` is there, merged from the partials as they are recorded now."""
    assert r is not None
    record = store.done_record(lib.STAGE, r, lib.METRICS_UNIT)
    if record and record.get("merged") == lib.part_ids(store, r) and store.exists(lib.metrics_rel(r)):
        return []
    return [lib.METRICS_UNIT]


def _tensorboard_todo(store: RunStore, cfg: PipelineConfig, r: Round) -> list[str]:
    return [] if not cfg.eval.tensorboard or store.is_done(lib.STAGE, r, "tensorboard") else ["tensorboard"]


def _tensorboard(store: RunStore, cfg: PipelineConfig, r: Round, unit: Any, report: Any) -> dict[str, int]:
    from deepercluster.evaluation.tensorboard import write_round

    assert r is not None
    counts = write_round(store, cfg, r)
    store.mark_done(lib.STAGE, r, "tensorboard", counts)
    return counts


@dataclass
class EvaluateStage(Stage):
    name: ClassVar[str] = "evaluate"
    section: ClassVar[str] = "eval"
    # final_round says whether round `rounds` is evaluated, not how; the k-means agreement uses cluster.niter;
    # the whitening of the final round's features is fitted with the cluster section's PCA settings
    fields: ClassVar[tuple[str, ...]] = ("eval.kmeans_nmi", "eval.kmeans_runs", "eval.linear_probe", "eval.knn",
                                         "eval.knn_k", "eval.probe_train", "eval.probe_test", "eval.split_seed",
                                         "eval.sample",
                                         "eval.probe_weight_decay", "eval.probe_max_iter", "eval.layer",
                                         "cluster.niter", "cluster.pca_dim", "cluster.pca_sample", "cluster.whiten",
                                         "data.image_size", "data.crop_ratio", "seed", "eval.tensorboard",
                                         "eval.embedding_sample")

    def inputs(self, cfg: PipelineConfig, r: Round) -> list[tuple[str, Round]]:
        assert r is not None
        if r >= cfg.rounds:  # the final model: features only
            return [("extract", r)]
        trained = [] if cfg.method == "clusterfit" else [("train", r)]  # a ClusterFit source run trains nothing
        return [("extract", r), ("cluster", r), *trained]

    def check_round(self, cfg: PipelineConfig, r: Round) -> None:
        if not final_round(cfg, r):
            super().check_round(cfg, r)

    def steps(self) -> list[Step]:
        return [
            Step(lib.CLUSTER_UNIT, _part_todo(lib.CLUSTER_UNIT),
                 lambda store, cfg, r, u, rep: lib.run_cluster_unit(store, r)),
            Step(lib.PROBES_UNIT, _part_todo(lib.PROBES_UNIT),
                 lambda store, cfg, r, u, rep: lib.run_probes_unit(store, cfg, r)),
            Step(lib.METRICS_UNIT, _metrics_todo, lambda store, cfg, r, u, rep: lib.run_metrics_unit(store, r)),
            Step("tensorboard", _tensorboard_todo, _tensorboard),
            Step("finish", until_done(lib.STAGE, "finish"),
                 lambda store, cfg, r, u, rep: lib.mark_evaluated(store, r, store.read_json(lib.metrics_rel(r)))),
        ]

    def discard(self, store: RunStore, cfg: PipelineConfig, r: Round) -> None:
        store.reset_stage(lib.STAGE, r)
        store.remove(lib.metrics_rel(r))
        for unit in lib.PART_UNITS:
            store.remove(lib.part_rel(r, unit))

    def result(self, store: RunStore, cfg: PipelineConfig, r: Round) -> dict[str, Any]:
        return store.read_json(lib.metrics_rel(r))


STAGE = register(EvaluateStage())

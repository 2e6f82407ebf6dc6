"""The evaluate stage: features (+ assignments) -> NMI/ARI against labels, k-means agreement, linear probe, kNN,
cluster statistics, training figures -> ``metrics.json`` and the round's row of ``history.parquet`` (one unit)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from deepercluster.config import PipelineConfig
from deepercluster.evaluation import stage as lib
from deepercluster.stages.base import Round, Stage, Step, register, until_done
from deepercluster.stages.extract import final_round
from deepercluster.store import RunStore


def _todo(store: RunStore, cfg: PipelineConfig, r: Round) -> list[str]:
    return [] if store.exists(lib.metrics_rel(r)) else ["evaluate"]


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
            Step("evaluate", _todo, lambda store, cfg, r, u, rep: lib.evaluate_round(store, cfg, r, mark_done=False)),
            Step("tensorboard", _tensorboard_todo, _tensorboard),
            Step("finish", until_done(lib.STAGE, "finish"),
                 lambda store, cfg, r, u, rep: lib.mark_evaluated(store, r, store.read_json(lib.metrics_rel(r)))),
        ]

    def discard(self, store: RunStore, cfg: PipelineConfig, r: Round) -> None:
        store.reset_stage(lib.STAGE, r)
        store.remove(lib.metrics_rel(r))

    def result(self, store: RunStore, cfg: PipelineConfig, r: Round) -> dict[str, Any]:
        return store.read_json(lib.metrics_rel(r))


STAGE = register(EvaluateStage())

"""The cluster stage: features -> PCA-whitening -> level 1 (m super-clusters, or the flat k-means) -> level 2 per
super-cluster -> ``assignments.parquet``. Every step is units for any worker, none of whose memory grows with the
number of images but level 2's (its super-cluster's members, within ``runtime.memory_budget_mb`` or streamed):

1. ``moments`` (one unit per shard group) and ``pca`` (their sum, the fit): the PCA-whitening;
2. ``whiten`` (one unit per ``runtime.block_rows`` rows of shards) and ``whitened``;
3. ``kmeans``: level 1, sharded Lloyd (listed again after each batch: an iteration's blocks, then its reduce, ...),
   one unit when its rows fit one block or it is fitted on a sample; checkpointed after every iteration;
4. ``assign``: level 1's labels of every image (one unit per block);
5. ``supers``: level 2, one unit per super-cluster (GPU=1 each), checkpointed after every iteration; a super-cluster
   larger than a worker's memory budget runs as sharded Lloyd too (its phases listed again after each batch), then
   its one unit files the result;
6. ``finalize``: the merge into the assignments and the statistics.

Resuming re-checks the sizes of the done units' recorded outputs (one listing): a unit whose file is missing or
resized is redone alone (the whitening and the labels are deterministic: the same bytes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from deepercluster.clustering import sharded
from deepercluster.clustering import stage as lib
from deepercluster.clustering import whitening as white
from deepercluster.config import PipelineConfig
from deepercluster.errors import DataError
from deepercluster.stages.base import Round, Stage, Step, register, until_done
from deepercluster.store import RunStore


def _supers_todo(store: RunStore, cfg: PipelineConfig, r: Round) -> list[Any]:
    """Level 2: one unit per super-cluster (its whole k-means, or, for one larger than a worker's memory budget,
    the unit that files its sharded k-means' results once the phases listed before it are done)."""
    assert r is not None
    done = set(store.done_units(lib.STAGE, r))
    supers = [u for u in done if u.startswith("super-")]
    done -= set(store.redo_bad_units(lib.STAGE, r, supers))
    m = cfg.cluster.super_clusters
    sizes = sharded.super_sizes(store, r, m) if m > 1 else None
    dim = int(white.open_whitened(store, r).shape[1]) if m > 1 else 0  # read once per listing, not per super
    out: list[Any] = []
    for s in range(m):
        if lib.super_unit(s) in done:
            continue
        phases = None if sizes is None else sharded.super_todo(store, cfg, r, s, int(sizes[s]), dim)
        out += phases or [s]
    return out


def _super(store: RunStore, cfg: PipelineConfig, r: Round, unit: Any, report: Any) -> Any:
    assert r is not None
    if isinstance(unit, tuple):
        return sharded.run_kmeans_unit(store, cfg, r, unit)
    return lib.cluster_super(store, cfg, r, unit)


def _super_label(unit: Any) -> str:
    return sharded.kmeans_label(unit) if isinstance(unit, tuple) else lib.super_unit(unit)


def _discarding(fn: Callable[[RunStore, PipelineConfig, Round, Any], Any]) -> Callable[..., Any]:
    """A unit that reads the features: non-finite features (a DataError) discard the whole stage before the
    error goes up, so that nothing half-made of them stays in the store."""

    def run(store: RunStore, cfg: PipelineConfig, r: Round, unit: Any, report: Any) -> Any:
        try:
            return fn(store, cfg, r, unit)
        except DataError:
            lib.discard_cluster(store, r)
            raise

    return run


def _kmeans(store: RunStore, cfg: PipelineConfig, r: Round, unit: Any, report: Any) -> Any:
    assert r is not None
    return sharded.run_kmeans_unit(store, cfg, r, unit)


def _block_of(unit: Any) -> Any:
    """A sharded Lloyd block's share goes to the same worker at every iteration (which keeps its rows)."""
    return (unit[0], unit[2]) if isinstance(unit, tuple) and unit[1] == "part" else None


def _pca_todo(store: RunStore, cfg: PipelineConfig, r: Round) -> list[str]:
    return [] if store.is_done(lib.STAGE, r, "pca") else ["pca"]


def _whitened_todo(store: RunStore, cfg: PipelineConfig, r: Round) -> list[str]:
    return [] if white.whitening_done(store, r) else ["whitened"]


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
            Step("moments", white.moments_todo, _discarding(white.group_moments), label=lambda g: f"group-{g:02d}"),
            Step("pca", _pca_todo, lambda store, cfg, r, u, rep: white.fit_pca_unit(store, cfg, r)),
            Step("whiten", white.whiten_todo, _discarding(white.whiten_shards), label=sharded.block_label),
            Step("whitened", _whitened_todo, lambda store, cfg, r, u, rep: white.mark_whitened(store, r)),
            Step("kmeans", sharded.kmeans_todo, _kmeans, label=sharded.kmeans_label, gpu=True, again=True,
                 affinity=_block_of),
            Step("assign", sharded.assign_todo, _kmeans, label=sharded.kmeans_label, gpu=True),
            Step("supers", _supers_todo, _super, label=_super_label, gpu=True, retries=1, again=True,
                 affinity=_block_of),
            Step("finalize", until_done(lib.STAGE), lambda store, cfg, r, u, rep: lib.finalize_cluster(store, cfg, r)),
        ]

    def discard(self, store: RunStore, cfg: PipelineConfig, r: Round) -> None:
        lib.discard_cluster(store, r)

    def result(self, store: RunStore, cfg: PipelineConfig, r: Round) -> dict[str, Any]:
        return store.read_json(lib.clusters_rel(r, "stats.json"))


STAGE = register(ClusterStage())

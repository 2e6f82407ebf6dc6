"""The shard stage: the image source -> ``data/manifest.parquet`` (kept images, numbered, cut into shards) and
``data/rejects.parquet``. Steps: list the source into parts, scan each part (one unit each), write the manifest,
then with ``data.repack`` pack each shard into a tar (one unit each) and record the stage."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from deepercluster.config import PipelineConfig
from deepercluster.data import shard as lib
from deepercluster.data.repack import repack_shard
from deepercluster.data.repack import unit_name as repack_unit
from deepercluster.stages.base import Reporter, Round, Stage, Step, register, until_done
from deepercluster.store import RunStore


def _listing_todo(store: RunStore, cfg: PipelineConfig, r: Round) -> list[str]:
    return [] if store.exists(lib.LISTING_DONE) else ["listing"]


def _parts_todo(store: RunStore, cfg: PipelineConfig, r: Round) -> list[str]:
    done = set(store.done_units(lib.STAGE, None))
    return [p for p in lib.list_source(store, cfg.data) if p not in done]


def _manifest_todo(store: RunStore, cfg: PipelineConfig, r: Round) -> list[str]:
    return [] if store.is_done(lib.STAGE, None, lib.MANIFEST_UNIT) else ["manifest"]


def _repack_todo(store: RunStore, cfg: PipelineConfig, r: Round) -> list[int]:
    if not cfg.data.repack:
        return []
    shards = store.done_record(lib.STAGE, None, lib.MANIFEST_UNIT)["shards"]
    return [s for s in range(shards) if not store.is_done(lib.STAGE, None, repack_unit(s))]


@dataclass
class ShardStage(Stage):
    name: ClassVar[str] = "shard"
    section: ClassVar[str] = "data"
    scope: ClassVar = "data"
    # image_size and crop_ratio are how the later stages read the images, not which images there are
    fields: ClassVar[tuple[str, ...]] = ("data.source", "data.kind", "data.limit", "data.shard_size",
                                         "data.max_pixels", "data.min_side", "data.label_column",
                                         "data.path_template", "data.id_list", "data.repack", "data.max_side",
                                         "data.max_aspect", "data.skip_hidden")

    def steps(self) -> list[Step]:
        return [
            Step("list", _listing_todo, lambda store, cfg, r, u, rep: len(lib.list_source(store, cfg.data))),
            Step("scan", _parts_todo, lambda store, cfg, r, u, rep: lib.scan_part(store, cfg.data, u), retries=2),
            Step("manifest", _manifest_todo, lambda store, cfg, r, u, rep: lib.finalize_manifest(store, cfg.data)),
            Step("repack", _repack_todo, lambda store, cfg, r, u, rep: repack_shard(store, cfg.data, u),
                 label=repack_unit, retries=2),
            Step("finish", until_done(lib.STAGE, "finish"), self._finish),
        ]

    @staticmethod
    def _finish(store: RunStore, cfg: PipelineConfig, r: Round, unit: Any, report: Reporter) -> dict:
        return lib.finalize_shard_stage(store, cfg.data)

    def discard(self, store: RunStore, cfg: PipelineConfig, r: Round) -> None:
        lib.reset_shard_stage(store)


STAGE = register(ShardStage())

"""The extract stage: the round's model over every image -> ``rounds/<r>/features.zarr``. Steps: the round model
(round 0: made here from the ``model`` section and the seed) and the empty array; the image shards in groups of
``extract.shards_per_task`` (one unit each, GPU=1); the stage record. Round ``rounds`` (with ``eval.final_round``)
extracts the model the last training produced."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from deepercluster import features as lib
from deepercluster.config import PipelineConfig
from deepercluster.errors import ConfigError
from deepercluster.features.array import features_rel
from deepercluster.stages.base import Reporter, Round, Stage, Step, register, until_done
from deepercluster.store import RunStore

# how the images are read and what the forward pass computes; batch_size and autocast change its rounding
READ_FIELDS = ("data.image_size", "data.crop_ratio", "extract.layer", "extract.batch_size", "extract.autocast")
# what round 0's model is made of (later rounds read the model the previous training wrote)
MODEL_FIELDS = ("model", "seed")


def _model_todo(store: RunStore, cfg: PipelineConfig, r: Round) -> list[str]:
    ready = store.exists(lib.model_rel(r)) and store.exists(f"{features_rel(r)}/zarr.json")
    return [] if ready else ["model"]


def _groups_todo(store: RunStore, cfg: PipelineConfig, r: Round) -> list[tuple[int, ...]]:
    return [tuple(g) for g in lib.shard_groups(lib.shards_todo(store, r), cfg.extract.shards_per_task)]


def _group_label(group: Any) -> str:
    return f"shards-{group[0]:05d}" + (f"-{group[-1]:05d}" if len(group) > 1 else "")


def final_round(cfg: PipelineConfig, r: Round) -> bool:
    """Round ``rounds``: the model the last training produced, extracted and evaluated, never clustered."""
    return r == cfg.rounds and cfg.eval.final_round


@dataclass
class ExtractStage(Stage):
    name: ClassVar[str] = "extract"
    section: ClassVar[str] = "extract"

    def field_names(self, cfg: PipelineConfig, r: Round) -> tuple[str, ...]:
        return READ_FIELDS + (MODEL_FIELDS if r == 0 else ())

    def inputs(self, cfg: PipelineConfig, r: Round) -> list[tuple[str, Round]]:
        assert r is not None
        return [("shard", None)] + ([("train", r - 1)] if r > 0 else [])

    def check_round(self, cfg: PipelineConfig, r: Round) -> None:
        if not final_round(cfg, r):
            super().check_round(cfg, r)

    def steps(self) -> list[Step]:
        return [
            Step("model", _model_todo, lambda store, cfg, r, u, rep: lib.prepare_features(store, cfg, r)),
            Step("shards", _groups_todo, self._extract, label=_group_label, gpu=True, retries=2),
            Step("finalize", until_done(lib.STAGE), lambda store, cfg, r, u, rep: lib.finalize_extract(store, r)),
        ]

    @staticmethod
    def _extract(store: RunStore, cfg: PipelineConfig, r: Round, group: Any, report: Reporter) -> int:
        if r is None:
            raise ConfigError("the extract stage needs a round")
        return lib.extract_shards(store, cfg, r, list(group))

    def discard(self, store: RunStore, cfg: PipelineConfig, r: Round) -> None:
        assert r is not None
        lib.discard_extract(store, r)


STAGE = register(ExtractStage())

"""Feature extraction: the round's model over every image -> ``rounds/<r>/features.zarr`` (N x D float16).

``stage``: the extract stage (prepare, one unit per image shard, finalize); ``model``: the round model as a
feature extractor (layer, device, precision; loaded once per process); ``loader``: threaded decoding ahead of the
forward pass; ``array``: the zarr layout; ``inspect``: summary statistics and nearest neighbours.
"""

from deepercluster.features.array import features_group_rel, features_rel, inner_chunk_rows, open_features
from deepercluster.features.model import (
    FeatureModel,
    ensure_round_model,
    feature_dim,
    load_round_model,
    model_loads,
    model_rel,
)
from deepercluster.features.stage import (
    STAGE,
    discard_extract,
    extract_shards,
    finalize_extract,
    prepare_features,
    shard_groups,
    shard_rows,
    shards_todo,
    unit_name,
)

__all__ = [
    "STAGE",
    "FeatureModel",
    "ensure_round_model",
    "discard_extract",
    "extract_shards",
    "feature_dim",
    "features_group_rel",
    "features_rel",
    "finalize_extract",
    "inner_chunk_rows",
    "load_round_model",
    "model_loads",
    "model_rel",
    "open_features",
    "prepare_features",
    "shard_groups",
    "shard_rows",
    "shards_todo",
    "unit_name",
]

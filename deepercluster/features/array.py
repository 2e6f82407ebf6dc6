"""``rounds/<r>/features.zarr``: a zarr group holding ``features`` (N x D float16, row i = manifest image_id i).

Each image shard is exactly one zarr shard (the write unit), so two writers never touch the same zarr shard;
inner chunks (the read unit) are smaller. The group's metadata is consolidated once every shard is written, so a
reader opens the finished array with one metadata read, from any fsspec store. The fill value is NaN (arrays made
before it: 0): a zarr shard that is missing reads as NaN rows, never as features, and every shard is written whole
(``write_empty_chunks``), so a written shard's object always exists (what its completion record lists,
:func:`shard_object_rel`).
"""

from __future__ import annotations

import warnings
from typing import Any

import zarr
from zarr.errors import ZarrUserWarning

from deepercluster.errors import StoreError
from deepercluster.paths import FEATURES_ARRAY, features_group_rel, features_rel, zarr_shard_rel
from deepercluster.store import RunStore

__all__ = ["FEATURES_ARRAY", "create_features", "features_attrs", "features_group_rel", "features_rel",
           "inner_chunk_rows", "open_features", "seal_features", "shard_object_rel"]
FILL = float("nan")  # what a row of a missing zarr shard reads as


def shard_object_rel(r: int, shard: int) -> str:
    """The object of zarr shard ``shard`` of round ``r``'s features (image shard ``shard``'s rows)."""
    return zarr_shard_rel(features_rel(r), shard)


def _opts(store: RunStore) -> dict[str, Any] | None:
    return store.storage_options or None


def inner_chunk_rows(shard_size: int) -> int:
    """Rows per zarr inner chunk (the read unit); the zarr shard (the write unit) is ``shard_size`` rows."""
    return 64 if shard_size % 64 == 0 else shard_size


def create_features(store: RunStore, r: int, n: int, dim: int, shard_size: int, attrs: dict[str, Any]) -> zarr.Array:
    """Create the group and its empty array (NaN), or check that the existing one has this layout."""
    if store.exists(f"{features_rel(r)}/zarr.json"):
        array = open_features(store, r, mode="r+")
        if array.shape != (n, dim) or array.shards != (shard_size, dim) or array.dtype != "float16":
            raise StoreError(f"{store.url(features_rel(r))} has shape {array.shape}, shards {array.shards}, expected "
                             f"{(n, dim)}, {(shard_size, dim)}: rerun the extract stage with --force")
        return array
    group = zarr.open_group(store.url(features_group_rel(r)), mode="w", storage_options=_opts(store),
                            attributes={**attrs, "complete": False})
    return group.create_array(FEATURES_ARRAY, shape=(n, dim), chunks=(inner_chunk_rows(shard_size), dim),
                              shards=(shard_size, dim), dtype="float16", fill_value=FILL, compressors=None,
                              dimension_names=("image", "feature"))


def open_features(store: RunStore, r: int, mode: str = "r") -> zarr.Array:
    """The feature array of round ``r`` (through the group's consolidated metadata when it has some); opened to
    write, it writes every chunk, even one that holds only the fill value."""
    if not store.exists(f"{features_rel(r)}/zarr.json"):
        raise StoreError(f"{store.url(features_rel(r))} is missing: run the extract stage of round {r} first")
    if mode == "r":
        return zarr.open_group(store.url(features_group_rel(r)), mode="r", storage_options=_opts(store))[FEATURES_ARRAY]
    array = zarr.open_array(store.url(features_rel(r)), mode=mode, storage_options=_opts(store))
    return array.with_config({"write_empty_chunks": True})


def features_attrs(store: RunStore, r: int) -> dict[str, Any]:
    return dict(zarr.open_group(store.url(features_group_rel(r)), mode="r", storage_options=_opts(store)).attrs)


def seal_features(store: RunStore, r: int, attrs: dict[str, Any]) -> None:
    """Mark the group complete and consolidate its metadata (once, after every shard is written)."""
    group = zarr.open_group(store.url(features_group_rel(r)), mode="r+", storage_options=_opts(store),
                            use_consolidated=False)
    group.attrs.update({**attrs, "complete": True})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ZarrUserWarning)  # consolidated metadata is not in the v3 spec yet
        zarr.consolidate_metadata(group.store, path=group.path or None)

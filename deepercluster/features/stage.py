"""The extract stage: features of every image with the round's model -> ``rounds/<r>/features.zarr``.

Unit of work: one image shard (shard ``s`` = manifest rows with ``shard == s``, contiguous image ids). A task
streams a few consecutive shards (``extract.shards_per_task``) through the batched forward pass (decoding as
:class:`~deepercluster.features.loader.BatchLoader` schedules it), and a writer thread writes each shard's rows in
one assignment (one zarr shard) and only then its completion record (with the zarr shard object's size and
checksum), while the next shard is computed: a killed worker or flow loses only the shards in flight, and a rerun
skips shards that have a record and whose zarr shard still has the recorded size.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext

import numpy as np
import pandas as pd
import torch

from deepercluster.config import PipelineConfig
from deepercluster.data.repack import packed_uris
from deepercluster.data.shard import MANIFEST
from deepercluster.device import cpu_compute, resolve_device
from deepercluster.errors import DataError, StoreError
from deepercluster.features.array import (
    create_features,
    features_group_rel,
    open_features,
    seal_features,
    shard_object_rel,
)
from deepercluster.features.loader import BatchLoader, HostView
from deepercluster.features.model import FeatureModel, ensure_round_model, feature_dim, load_round_model, model_rel
from deepercluster.store import RunStore

STAGE = "extract"


def unit_name(shard: int) -> str:
    return f"shard-{shard:05d}"


def prepare_features(store: RunStore, cfg: PipelineConfig, r: int) -> None:
    """Create the round model (round 0) and the empty feature array if needed."""
    ensure_round_model(store, cfg, r)
    n = store.done_record("shard", None, "_stage")["images"]
    attrs = {"round": r, "arch": cfg.model.arch, "layer": cfg.extract.layer, "image_size": cfg.data.image_size,
             "crop_ratio": cfg.data.crop_ratio}
    create_features(store, r, n, feature_dim(store, cfg, r), cfg.data.shard_size, attrs)


def shards_todo(store: RunStore, r: int, check_sizes: bool = True) -> list[int]:
    """The image shards of the run whose features are not recorded yet; with ``check_sizes``, also those recorded
    whose zarr shard is missing or not of the recorded size now (their records are dropped, one log line each)."""
    done = set(store.done_units(STAGE, r))
    if check_sizes and done:
        done -= set(store.redo_bad_units(STAGE, r, sorted(done)))
    n_shards = store.done_record("shard", None, "_stage")["shards"]
    return [s for s in range(n_shards) if unit_name(s) not in done]


def discard_extract(store: RunStore, r: int) -> None:
    """Forget round ``r``'s features (round 0's model stays: the next run makes it again only if the model section
    or the seed changed, see :func:`ensure_round_model`)."""
    store.reset_stage(STAGE, r)
    store.remove(features_group_rel(r))


def shard_rows(store: RunStore, shard: int) -> tuple[int, int, list[str]]:
    """First row, end row and image URIs of one shard (reads only the manifest row groups that hold it); the URIs
    are members of the shard's packed tar when there is one."""
    with store.reading(MANIFEST):
        rows = pd.read_parquet(store.url(MANIFEST), columns=["image_id", "uri"], filters=[("shard", "==", shard)],
                               storage_options=store.storage_options or None)
    if rows.empty:
        raise StoreError(f"shard {shard} is not in {store.url(MANIFEST)}")
    ids = rows["image_id"].to_numpy()
    lo, hi = int(ids[0]), int(ids[-1]) + 1
    if hi - lo != len(ids) or not np.all(np.diff(ids) == 1):
        raise StoreError(f"shard {shard} of {store.url(MANIFEST)} is not a contiguous run of image ids: "
                         "rerun the shard stage with --force")
    packed = packed_uris(store, shard)  # the shard's webdataset tar, when the shard stage repacked it
    if packed is not None and len(packed) != len(ids):
        raise StoreError(f"the packed tar of shard {shard} holds {len(packed)} images, the manifest {len(ids)}: "
                         "rerun the shard stage with --force")
    return lo, hi, packed if packed is not None else rows["uri"].tolist()


def _loader(uris: list[str], model: FeatureModel, cfg: PipelineConfig, ends: Sequence[int] = ()) -> BatchLoader:
    return BatchLoader(uris, HostView(cfg.data.image_size, cfg.data.crop_ratio), cfg.extract.batch_size,
                       cfg.extract.decode_threads, cfg.extract.prefetch_batches, on_device_normalise=model.cuda,
                       ends=ends)


def _features(model: FeatureModel, loader: BatchLoader) -> Iterator[tuple[int, torch.Tensor]]:
    """``(first_row, float16 features on the host)`` per batch; on CUDA the copy of batch k back to the host
    overlaps the forward pass of batch k + 1."""
    pending: tuple[int, torch.Tensor, torch.cuda.Event | None] | None = None
    for lo, batch in loader:
        f = model(batch)
        copied = None
        if model.cuda:
            f = f.to("cpu", non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
        if pending is not None:
            yield _landed(*pending)
        pending = (lo, f, copied)
    if pending is not None:
        yield _landed(*pending)


def _landed(lo: int, f: torch.Tensor, copied: torch.cuda.Event | None) -> tuple[int, torch.Tensor]:
    if copied is not None:
        copied.synchronize()  # the asynchronous copy of this batch to the host is complete
    return lo, f


def extract_shards(store: RunStore, cfg: PipelineConfig, r: int, shards: Sequence[int]) -> int:
    """Features of several image shards in one stream, each written as one zarr shard then recorded; returns the
    rows written (shards already recorded are skipped). The decoding of a shard's first batches overlaps the
    forward pass of the previous shard's last ones (no pipeline drain between shards), and a writer thread
    writes shard k (zarr shard, then its completion record) while shard k + 1 is computed."""
    todo = [s for s in shards if not store.is_done(STAGE, r, unit_name(s))]
    if not todo:
        return 0
    start = time.perf_counter()
    spans = [shard_rows(store, s) for s in todo]
    model = load_round_model(store, cfg, r, resolve_device(cfg.runtime.device))
    try:
        with nullcontext() if model.cuda else cpu_compute():  # on CPU: one stream per process, on all its cores
            _stream(store, cfg, r, model, spans, todo, start)
    except DataError:  # an unreadable image: the other shards of the group are still extracted, then it fails
        if len(todo) == 1:
            raise
        errors = []
        for s in todo:
            try:
                extract_shards(store, cfg, r, [s])
            except DataError as err:
                errors.append(err)
        raise errors[0] from None
    return int(sum(hi - lo for lo, hi, _ in spans))


def _stream(store: RunStore, cfg: PipelineConfig, r: int, model: FeatureModel, spans: list[tuple[int, int, list[str]]],
            shards: list[int], start: float) -> None:
    array = open_features(store, r, mode="r+")
    uris = [u for _, _, us in spans for u in us]
    ends = np.cumsum([hi - lo for lo, hi, _ in spans])  # end row of each shard in the stream
    buffers: list[np.ndarray | None] = [None] * len(shards)
    filled = [0] * len(shards)
    writes: list[Future[None]] = []

    def write(k: int) -> None:
        lo, hi, _ = spans[k]
        array[lo:hi] = buffers[k]  # the whole zarr shard in one assignment
        store.mark_done(STAGE, r, unit_name(shards[k]), {"rows": [lo, hi], "device": str(model.device),
                                                         "seconds": round(time.perf_counter() - start, 3)},
                        outputs=[shard_object_rel(r, shards[k])])
        buffers[k] = None

    with ThreadPoolExecutor(1, thread_name_prefix="zarr-write") as writer:
        for row, f in _features(model, _loader(uris, model, cfg, ends)):
            k = int(np.searchsorted(ends, row, side="right"))  # the batch's shard: no batch crosses a shard's end
            first = 0 if k == 0 else int(ends[k - 1])
            if buffers[k] is None:
                buffers[k] = np.empty((int(ends[k]) - first, f.shape[1]), dtype=np.float16)
            buffers[k][row - first : row - first + len(f)] = f.numpy()
            filled[k] += len(f)
            if filled[k] == len(buffers[k]):
                writes.append(writer.submit(write, k))
        for w in writes:
            w.result()  # a failed write fails the task (its shard has no record: a rerun redoes it)


def shard_groups(shards: Sequence[int], per_task: int) -> list[list[int]]:
    """Consecutive shards in groups of ``per_task``: the unit of one extract task."""
    shards = list(shards)
    return [shards[i : i + per_task] for i in range(0, len(shards), max(1, per_task))]


def finalize_extract(store: RunStore, r: int) -> dict[str, int]:
    """Check every shard is recorded, consolidate the array's metadata, then mark the stage done."""
    missing = shards_todo(store, r, check_sizes=False)  # the shards step has just checked them
    if missing:
        raise StoreError(f"extract round {r}: shards {missing[:5]} are not done; rerun the extract stage")
    shape = open_features(store, r, mode="r+").shape
    n_shards = store.done_record("shard", None, "_stage")["shards"]
    info = {"images": int(shape[0]), "dim": int(shape[1]), "shards": n_shards}
    seal_features(store, r, {**info, "model_signature": store.signature(model_rel(r))})
    store.mark_stage_done(STAGE, r, info)
    return info

"""The k-means over every image of a round (level 1, or the flat k-means when there is one super-cluster), and
those of level 2 whose super-cluster exceeds a worker's memory budget, split into units that run anywhere: never
a whole-N array in one process.

Its rows are the whitened features, in **blocks** of consecutive image shards of at most ``runtime.block_rows``
rows. Three ways to run it, all with the same result:

- **sampled** (level 1 with ``cluster.super_sample``): one unit fits it on a seeded random sample (memory bounded
  by the sample, not by N);
- **one unit**, when every row is in one block: Lloyd in that unit (in memory within ``runtime.memory_budget_mb``,
  else streamed shard by shard);
- **sharded Lloyd** otherwise: an iteration is one unit per block (its exact cluster sums and counts under the
  current centroids, :func:`~deepercluster.clustering.kmeans.block_sums`) and one ``reduce`` unit that adds them
  and writes the next centroids. The sums are exact, so the result is bit-identical whatever the number of blocks
  or workers, and to the one-unit run.

After every iteration the state (centroids, iteration, generator state, see :class:`LloydState`) is saved as a
checkpoint (``clusters/kmeans/<name>.npz`` with its record ``ckpt-<name>``): a killed k-means resumes at its last
saved iteration and ends bit-identical to an uninterrupted one. Then the ``assign`` step labels every row, one unit
per block, one ``level1/labels-<shard>.npy`` (and ``distance-<shard>.npy`` for the flat k-means) per image shard.
"""

from __future__ import annotations

import io
import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from deepercluster.clustering.assign import NearestCentroid, exact_sq_distances, resolve_backend
from deepercluster.clustering.kmeans import (
    ArrayVectors,
    LloydState,
    block_sums,
    initial_state,
    iterate,
    update,
)
from deepercluster.clustering.memory import bound_heap, release
from deepercluster.clustering.vectors import ShardedVectors, ShardMembers, read_rows, shard_ranges, shard_rows
from deepercluster.clustering.whitening import STAGE, _seed, open_whitened
from deepercluster.config import PipelineConfig
from deepercluster.errors import StoreError
from deepercluster.paths import clusters_rel, whitened_rel
from deepercluster.store import RunStore

LEVEL1 = "level1"
BYTES_PER_MEMBER = 20  # labels (int64) + distance (float64) + squared norm (float32) kept for every row of a unit


# ---- blocks ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Block:
    """Image shards ``first..last`` (inclusive), rows ``[lo, hi)``."""

    first: int
    last: int
    lo: int
    hi: int

    @property
    def unit(self) -> tuple[int, int]:
        return (self.first, self.last)


def blocks(n: int, rows_per_shard: int, block_rows: int) -> list[Block]:
    """Consecutive shards grouped into blocks of at most ``block_rows`` rows (at least one shard each)."""
    ranges = shard_ranges(n, rows_per_shard)
    per = max(1, block_rows // rows_per_shard)
    return [Block(a, min(a + per, len(ranges)) - 1, ranges[a][0], ranges[min(a + per, len(ranges)) - 1][1])
            for a in range(0, len(ranges), per)]


def round_blocks(store: RunStore, cfg: PipelineConfig, r: int) -> list[Block]:
    array = open_whitened(store, r)
    return blocks(int(array.shape[0]), shard_rows(array), cfg.runtime.block_rows)


def block_label(unit: tuple[int, int]) -> str:
    a, b = unit
    return f"shard-{a:05d}" if a == b else f"shards-{a:05d}-{b:05d}"


def shards_of(unit: tuple[int, int]) -> range:
    return range(unit[0], unit[1] + 1)


# ---- the job --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    """One k-means over all rows: ``k`` clusters, ``niter`` iterations, fitted on ``fit_rows`` random rows (0: all),
    exact distances in its assignment or the float32 search's."""

    name: str
    k: int
    niter: int
    seed: tuple[int, ...]  # the SeedSequence entropy
    fit_rows: int
    exact_distances: bool
    super: int | None = None  # level 2: only the rows level 1 put in this super-cluster

    def seed_sequence(self) -> np.random.SeedSequence:
        return np.random.SeedSequence(list(self.seed))

    def assign_unit(self, shard: int) -> str:
        """The record of one shard's labels under this k-means."""
        return f"assign-{shard:05d}" if self.super is None else f"assign-{self.name}-{shard:05d}"

    def labels_rel(self, r: int, shard: int, what: str = "labels") -> str:
        return clusters_rel(r, f"level1/{what}-{shard:05d}.npy" if self.super is None
                            else f"level2/{self.name}/{what}-{shard:05d}.npy")


def level1_job(cfg: PipelineConfig, r: int) -> Job:
    """Level 1 (m super-clusters, fitted on a sample), or with m = 1 the flat k-means (every row, exact distances,
    the seed the level-2 unit of super-cluster 0 would use)."""
    m = cfg.cluster.super_clusters
    if m > 1:
        return Job(LEVEL1, m, cfg.cluster.niter, tuple(_seed(cfg, r, 1).entropy), m * cfg.cluster.super_sample,
                   exact_distances=False)
    return Job(LEVEL1, cfg.cluster.k, cfg.cluster.niter, tuple(_seed(cfg, r, 2, 0).entropy), 0,
               exact_distances=True)


def super_job(cfg: PipelineConfig, r: int, s: int) -> Job:
    """Level 2 of super-cluster ``s`` (the seed its one-unit k-means uses: the same result, split or not)."""
    return Job(f"super-{s:04d}", cfg.cluster.k, cfg.cluster.niter, tuple(_seed(cfg, r, 2, s).entropy), 0,
               exact_distances=True, super=s)


def job_of(cfg: PipelineConfig, r: int, name: str) -> Job:
    return level1_job(cfg, r) if name == LEVEL1 else super_job(cfg, r, int(name.removeprefix("super-")))


def sampled(job: Job, n: int) -> bool:
    return 0 < job.fit_rows < n


def done_unit(name: str) -> str:
    return f"kmeans-{name}"


def centroids_rel(r: int, name: str) -> str:
    return clusters_rel(r, f"{name}_centroids.npy")


def labels_rel(r: int, shard: int) -> str:
    return clusters_rel(r, f"level1/labels-{shard:05d}.npy")


def distance_rel(r: int, shard: int) -> str:
    return clusters_rel(r, f"level1/distance-{shard:05d}.npy")


def assign_unit(shard: int) -> str:
    return f"assign-{shard:05d}"


# ---- checkpoints ----------------------------------------------------------------------------------------------------
def checkpoint_rel(r: int, name: str) -> str:
    return clusters_rel(r, f"kmeans/{name}.npz")


def checkpoint_unit(name: str) -> str:
    return f"ckpt-{name}"


def save_checkpoint(store: RunStore, r: int, name: str, state: LloydState) -> None:
    """The state after an iteration: the file (atomic), then its record (the iteration, for whoever inspects)."""
    buf = io.BytesIO()
    np.savez(buf, centroids=state.centroids, meta=np.frombuffer(json.dumps(state.meta()).encode(), dtype=np.uint8))
    store.write_bytes(checkpoint_rel(r, name), buf.getvalue())
    store.mark_done(STAGE, r, checkpoint_unit(name), {"iteration": state.iteration},
                    outputs=[checkpoint_rel(r, name)])


def load_checkpoint(store: RunStore, r: int, name: str) -> LloydState | None:
    """The last saved state (None: none yet). The file, written atomically, is what counts (its record may lag)."""
    rel = checkpoint_rel(r, name)
    if not store.exists(rel):
        return None
    data = store.read_bytes(rel)
    with store.reading(rel):
        z = np.load(io.BytesIO(data), allow_pickle=False)
        meta = json.loads(z["meta"].tobytes())
        return LloydState(meta["iteration"], z["centroids"], meta["rng_state"], meta["repairs"], meta["rechecked"],
                          meta["history"])


def finish(store: RunStore, r: int, job: Job, state: LloydState, info: dict) -> None:
    """Record the k-means done: its final centroids (float64 in the checkpoint, float32 for readers)."""
    save_checkpoint(store, r, job.name, state)
    store.write_npy(centroids_rel(r, job.name), state.centroids.astype(np.float32))
    store.mark_done(STAGE, r, done_unit(job.name),
                    {"k": int(len(state.centroids)), "iterations": state.iteration, "repairs": state.repairs,
                     "rechecked": state.rechecked, "history": state.history, **info},
                    outputs=[centroids_rel(r, job.name)])


# ---- the kmeans step ------------------------------------------------------------------------------------------------
def part_unit(name: str, block: Block) -> str:
    return f"part-{name}-{block.first:05d}"


def part_rel(r: int, name: str, block: Block) -> str:
    return clusters_rel(r, f"kmeans/{name}-part-{block.first:05d}.npz")


Unit = tuple[str, str, int, int]  # (k-means name, phase, first shard, last shard); -1, -1 for a whole-k-means phase


def phase_units(store: RunStore, cfg: PipelineConfig, r: int, job: Job, one_unit: bool = False) -> list[Unit]:
    """What the k-means ``job`` still needs: nothing; ``fit`` (``one_unit``: in one unit); or, sharded, ``init``, the
    blocks whose share of the current iteration is missing, or the ``reduce`` of that iteration."""
    if store.is_done(STAGE, r, done_unit(job.name)):
        return []
    if one_unit:
        return [(job.name, "fit", -1, -1)]
    state = load_checkpoint(store, r, job.name)
    if state is None:
        return [(job.name, "init", -1, -1)]
    parts = round_blocks(store, cfg, r)
    records = store.done_records(STAGE, r, [part_unit(job.name, b) for b in parts])
    missing = [(job.name, "part", b.first, b.last) for b in parts
               if not _current(records.get(part_unit(job.name, b)), state.iteration, b)]
    return missing or [(job.name, "reduce", -1, -1)]


def kmeans_todo(store: RunStore, cfg: PipelineConfig, r: int) -> list[Unit]:
    """Level 1's k-means: one unit when fitted on a sample or when its rows fit one block, else sharded Lloyd."""
    job = level1_job(cfg, r)
    parts = round_blocks(store, cfg, r)
    return phase_units(store, cfg, r, job, one_unit=sampled(job, parts[-1].hi) or len(parts) == 1)


def _current(record: dict | None, iteration: int, block: Block) -> bool:
    return record is not None and record.get("iteration") == iteration and record.get("shards") == [block.first,
                                                                                                     block.last]


def kmeans_label(unit: Unit) -> str:
    name, phase, a, b = unit
    return f"{name} {phase}" + ("" if a < 0 else f" {block_label((a, b))}")


def run_kmeans_unit(store: RunStore, cfg: PipelineConfig, r: int, unit: Unit) -> dict:
    """One unit of a k-means (level 1's or a level-2 one's), by phase."""
    name, phase, a, b = unit
    job = job_of(cfg, r, name)
    bound_heap()
    try:
        if phase == "fit":
            return _fit(store, cfg, r, job)
        if phase == "init":
            state = initial_state(_source(store, cfg, r, job), job.k, job.seed_sequence())
            save_checkpoint(store, r, job.name, state)
            return {"iteration": 0}
        if phase == "reduce":
            return _reduce(store, cfg, r, job)
        if phase == "assign":
            return _assign_block(store, cfg, r, job, (a, b))
        return _part(store, cfg, r, job, Block(a, b, *_rows(store, r, (a, b))))
    finally:
        release()


def _source(store: RunStore, cfg: PipelineConfig, r: int, job: Job, shards: range | None = None) -> ShardedVectors:
    """The job's rows (of ``shards``, default all) as a streamed source, in image order."""
    array = open_whitened(store, r)
    ranges = shard_ranges(int(array.shape[0]), shard_rows(array))
    members = []
    for i in shards if shards is not None else range(len(ranges)):
        lo, hi = ranges[i]
        rows = None if job.super is None else np.flatnonzero(read_labels(store, r, i) == job.super)
        if rows is None or len(rows):
            members.append(ShardMembers(i, lo, hi, rows))
    return ShardedVectors(array, members, threads=cfg.runtime.stream_threads, store=store, rel=whitened_rel(r))


def _rows(store: RunStore, r: int, unit: tuple[int, int]) -> tuple[int, int]:
    array = open_whitened(store, r)
    ranges = shard_ranges(int(array.shape[0]), shard_rows(array))
    return ranges[unit[0]][0], ranges[unit[1]][1]


def fits_in_memory(cfg: PipelineConfig, n: int, dim: int) -> bool:
    """Whether ``n`` whitened vectors of width ``dim`` (plus their labels and distances) fit the memory budget."""
    return n * (4 * dim + BYTES_PER_MEMBER) <= cfg.runtime.memory_budget_mb * 2**20


def _fit(store: RunStore, cfg: PipelineConfig, r: int, job: Job) -> dict:
    """The k-means in this unit, saving a checkpoint after every iteration and resuming from the last one."""
    source = _source(store, cfg, r, job)
    seed = job.seed_sequence()
    streamed = False
    if sampled(job, source.n):  # the sample and the fit draw from their own streams (as lloyd_on_sample does)
        sample_seed, seed = seed.spawn(2)
        rows = np.sort(np.random.default_rng(sample_seed).choice(source.n, size=job.fit_rows, replace=False))
        data = ArrayVectors(source.take(rows))
    elif fits_in_memory(cfg, source.n, source.dim):
        data = ArrayVectors(source.gather())
    else:
        data, streamed = source, True
    resume = load_checkpoint(store, r, job.name)
    start = 0 if resume is None else resume.iteration
    state = resume if resume is not None else initial_state(data, job.k, seed)
    state = iterate(data, state, job.niter, resolve_backend(cfg.runtime.device),
                    on_iteration=lambda s: save_checkpoint(store, r, job.name, s))
    finish(store, r, job, state, {"streamed": streamed, "resumed_at": start, "rows": int(data.n)})
    return {"iterations": state.iteration, "resumed_at": start}


def _part(store: RunStore, cfg: PipelineConfig, r: int, job: Job, block: Block) -> dict:
    """One block's share of the current iteration: exact sums and counts under the checkpoint's centroids."""
    state = load_checkpoint(store, r, job.name)
    if state is None:
        raise StoreError(f"k-means {job.name} of round {r}: no checkpoint to compute iteration shares from")
    backend = resolve_backend(cfg.runtime.device)
    sums = np.zeros_like(state.centroids)
    counts = np.zeros(len(state.centroids), dtype=np.int64)
    approx, rechecked = 0.0, 0
    for x, x_sq in _block_rows(store, cfg, r, job, block):
        s, c, a, checked = block_sums(x, state.centroids, backend, x_sq=x_sq)
        sums += s
        counts += c
        approx += a
        rechecked += checked
    buf = io.BytesIO()
    np.savez(buf, sums=sums, counts=counts, iteration=state.iteration, approx=approx, rechecked=rechecked)
    store.write_bytes(part_rel(r, job.name, block), buf.getvalue())
    store.mark_done(STAGE, r, part_unit(job.name, block),
                    {"iteration": state.iteration, "shards": [block.first, block.last]},
                    outputs=[part_rel(r, job.name, block)])
    return {"iteration": state.iteration, "rows": block.hi - block.lo}


_CACHE: OrderedDict[tuple, tuple[np.ndarray, np.ndarray]] = OrderedDict()  # this worker's blocks, last used last
_CACHE_LOCK = threading.Lock()


def _in_dask_worker() -> bool:
    """Whether this process is a Dask worker (which gets the same blocks at every iteration: the flow pins them).
    A process running every unit itself (``run_stage``) streams instead: caching there would only hold memory."""
    try:
        from distributed import get_worker

        get_worker()
        return True
    except (ImportError, ValueError):
        return False


def _block_rows(store: RunStore, cfg: PipelineConfig, r: int, job: Job, block: Block) \
        -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """The job's rows of ``block`` (with their squared norms), kept in a Dask worker's memory between iterations
    while they fit in half of ``runtime.memory_budget_mb`` (least recently used dropped first): the later
    iterations of a sharded Lloyd then read nothing. Keyed by the identity of what made the rows (the whitening,
    and level 1 for a super-cluster's members), so a recomputed input is never served stale. Blocks that do not
    fit are streamed shard by shard."""
    idents = [store.done_record(STAGE, r, "whitened") or {}]
    if job.super is not None:
        idents.append(store.done_record(STAGE, r, done_unit(LEVEL1)) or {})
    key = (store.uri, r, job.name, block.unit, *(rec.get("id") for rec in idents))
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is not None:
            _CACHE.move_to_end(key)
    if hit is not None:
        yield hit
        return
    source = _source(store, cfg, r, job, shards_of(block.unit))
    limit = cfg.runtime.memory_budget_mb * 2**20 / 2
    if not _in_dask_worker() or source.n * (4 * source.dim + 4) > limit:
        for _, x in source.blocks():
            yield x, None
        return
    x = source.gather()
    entry = (x, np.einsum("ij,ij->i", x, x))
    with _CACHE_LOCK:
        _CACHE[key] = entry
        while sum(a.nbytes + b.nbytes for a, b in _CACHE.values()) > limit:
            _CACHE.popitem(last=False)
    yield entry


def _reduce(store: RunStore, cfg: PipelineConfig, r: int, job: Job) -> dict:
    """Add every block's share (exact: any order gives the same bits; block order here) and save the next
    iteration's checkpoint; after the last iteration, the k-means is done."""
    state = load_checkpoint(store, r, job.name)
    assert state is not None
    sums = np.zeros_like(state.centroids)
    counts = np.zeros(len(state.centroids), dtype=np.int64)
    approx, rechecked = 0.0, 0
    for block in round_blocks(store, cfg, r):
        rel = part_rel(r, job.name, block)
        data = store.read_bytes(rel)
        with store.reading(rel):
            z = np.load(io.BytesIO(data), allow_pickle=False)
            if int(z["iteration"]) != state.iteration:
                raise StoreError(f"{store.url(rel)} is the share of iteration {int(z['iteration'])}, not "
                                 f"{state.iteration}: rerun the cluster stage (it recomputes it)")
            sums += z["sums"]
            counts += z["counts"]
            approx += float(z["approx"])
            rechecked += int(z["rechecked"])
    state = update(state, sums, counts, approx, rechecked)
    if state.iteration >= job.niter:
        finish(store, r, job, state, {"streamed": True, "sharded": True, "rows": int(counts.sum()),
                                      "blocks": len(round_blocks(store, cfg, r))})
    else:
        save_checkpoint(store, r, job.name, state)
    return {"iteration": state.iteration}


# ---- the assign step ------------------------------------------------------------------------------------------------
def shard_blocks_todo(store: RunStore, cfg: PipelineConfig, r: int, unit_of: Callable[[int], str]) \
        -> list[tuple[int, int]]:
    """The todo of a step with one record per shard (``unit_of(shard)``) and one unit per block: the blocks still
    holding a shard without its record, as (first, last) of those shards. A done shard whose recorded file went
    missing or changed size is forgotten first, so it is redone."""
    done = set(store.done_units(STAGE, r))
    prefix = unit_of(0).rsplit("-", 1)[0] + "-"
    done -= set(store.redo_bad_units(STAGE, r, [u for u in done if u.startswith(prefix)]))
    out = []
    for b in round_blocks(store, cfg, r):
        todo = [s for s in shards_of(b.unit) if unit_of(s) not in done]
        if todo:
            out.append((todo[0], todo[-1]))
    return out


def assign_todo(store: RunStore, cfg: PipelineConfig, r: int) -> list[Unit]:
    """Level 1's labels: the blocks holding a shard without them."""
    return [(LEVEL1, "assign", a, b) for a, b in shard_blocks_todo(store, cfg, r, assign_unit)]


def _assign_block(store: RunStore, cfg: PipelineConfig, r: int, job: Job, unit: tuple[int, int]) -> dict:
    """Label the job's rows of shards ``unit`` with its final centroids (and, for the flat k-means and level 2, their
    exact distances, the same bits whatever the batching); one file (two) and one record per shard. Level 1's
    records count the members of each super-cluster (what level 2's todo sizes its units by)."""
    state = load_checkpoint(store, r, job.name)
    if state is None or not store.is_done(STAGE, r, done_unit(job.name)):
        raise StoreError(f"cluster round {r}: the k-means {job.name} is not done: rerun the cluster stage")
    array = open_whitened(store, r)
    ranges = shard_ranges(int(array.shape[0]), shard_rows(array))
    nc = NearestCentroid(state.centroids, resolve_backend(cfg.runtime.device))
    inertia, rows = 0.0, 0
    for s in shards_of(unit):
        if store.is_done(STAGE, r, job.assign_unit(s)):
            continue
        lo, hi = ranges[s]
        x = _checked_rows(store, array, r, s, lo, hi)
        if job.super is not None:
            x = x[read_labels(store, r, s) == job.super]
        labels, dist = nc.assign(x) if len(x) else (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32))
        outputs = [job.labels_rel(r, s)]
        store.write_npy(outputs[0], labels.astype(np.int32))
        if job.exact_distances:
            dist = exact_sq_distances(x, nc.centroids, labels, np.float32) if len(x) else dist
            outputs.append(job.labels_rel(r, s, "distance"))
            store.write_npy(outputs[1], dist.astype(np.float32))
        part = float(np.asarray(dist, dtype=np.float64).sum())
        info = {"inertia": part, "rows": len(x)}
        if job.super is None and cfg.cluster.super_clusters > 1:
            info["counts"] = np.bincount(labels, minlength=cfg.cluster.super_clusters).tolist()
        store.mark_done(STAGE, r, job.assign_unit(s), info, outputs=outputs)
        inertia += part
        rows += len(x)
    return {"rows": rows, "inertia": inertia}


def super_sizes(store: RunStore, r: int, m: int) -> np.ndarray:
    """Members of each super-cluster, from level 1's per-shard records (no label file read)."""
    array = open_whitened(store, r)
    n_shards = len(shard_ranges(int(array.shape[0]), shard_rows(array)))
    records = store.done_records(STAGE, r, [assign_unit(s) for s in range(n_shards)])
    sizes = np.zeros(m, dtype=np.int64)
    for rec in records.values():
        sizes += np.asarray(rec.get("counts", np.zeros(m)), dtype=np.int64)
    return sizes


def super_todo(store: RunStore, cfg: PipelineConfig, r: int, s: int, members: int, dim: int) -> list[Unit] | None:
    """The units super-cluster ``s`` (``members`` vectors of width ``dim``) still needs when it exceeds a worker's
    budget (sharded Lloyd, then its labels per block); [] once they are all done (its one unit then files them);
    None when it fits a worker."""
    if fits_in_memory(cfg, members, dim):
        return None
    job = super_job(cfg, r, s)
    units = phase_units(store, cfg, r, job)
    if units:
        return units
    return [(job.name, "assign", a, b) for a, b in shard_blocks_todo(store, cfg, r, job.assign_unit)]


def sharded_result(store: RunStore, cfg: PipelineConfig, r: int, s: int) -> tuple[Iterator[tuple], dict]:
    """A sharded level-2 k-means' (image ids, sub-cluster, distance) shard by shard, and its figures."""
    job = super_job(cfg, r, s)
    array = open_whitened(store, r)
    ranges = shard_ranges(int(array.shape[0]), shard_rows(array))
    record = store.done_record(STAGE, r, done_unit(job.name)) or {}
    shards = store.done_records(STAGE, r, [job.assign_unit(i) for i in range(len(ranges))])

    def parts() -> Iterator[tuple]:
        for i, (lo, _) in enumerate(ranges):
            ids = lo + np.flatnonzero(read_labels(store, r, i) == s)
            yield ids, store.read_npy(job.labels_rel(r, i)).astype(np.int64), store.read_npy(
                job.labels_rel(r, i, "distance"))

    info = {"members": int(sum(rec.get("rows", 0) for rec in shards.values())), "k": record.get("k"),
            "inertia": float(sum(rec.get("inertia", 0.0) for rec in shards.values())),
            "repairs": record.get("repairs", 0), "streamed": True, "sharded": True,
            "rechecked": record.get("rechecked", 0), "resumed_at": 0}
    return parts(), info


def _checked_rows(store: RunStore, array, r: int, s: int, lo: int, hi: int) -> np.ndarray:
    x = np.asarray(read_rows(store, array, whitened_rel(r), lo, hi), dtype=np.float32)
    if not np.isfinite(x).all():
        from deepercluster.clustering.vectors import raise_if_missing

        raise_if_missing(store, whitened_rel(r), [s])
    return x


def read_labels(store: RunStore, r: int, shard: int) -> np.ndarray:
    return store.read_npy(labels_rel(r, shard))


def level1_stats(store: RunStore, r: int, n_shards: int) -> dict:
    """The k-means' record and the inertia of its assignment (the sum over its shards' records)."""
    record = store.done_record(STAGE, r, done_unit(LEVEL1)) or {}
    shards = store.done_records(STAGE, r, [assign_unit(s) for s in range(n_shards)])
    inertia = float(sum(rec.get("inertia", 0.0) for rec in shards.values()))
    return {"k": record.get("k"), "inertia": inertia, "repairs": record.get("repairs", 0),
            "streamed": record.get("streamed", False), "rechecked": record.get("rechecked", 0),
            "iterations": record.get("iterations"), "resumed_at": record.get("resumed_at", 0)}


__all__ = ["LEVEL1", "Block", "Job", "assign_todo", "blocks", "centroids_rel", "kmeans_label",
           "kmeans_todo", "level1_job", "level1_stats", "load_checkpoint", "read_labels", "run_kmeans_unit",
           "save_checkpoint", "sharded_result", "super_sizes", "super_todo"]

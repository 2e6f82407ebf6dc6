"""Does the numeric core scale out? Memory flat in N, time linear in N, sharded Lloyd as fast as one process.

For each N (default 1M and 8M images, D = 128):
  1. a real run store with synthetic float16 features (a Gaussian mixture, 10 labelled classes) written with the
     project's own writers (``features.array``: the extract stage's zarr layout; the manifest's schema), its shard
     and extract stages recorded done;
  2. the cluster stage (m = 16, k = 64) through the Prefect ``stage`` flow in a fresh process, its units on a
     2-worker LocalCluster, ``runtime.memory_budget_mb: 512``;
  3. a training rank's input setup (``training.inputs``: targets and image locations) in a fresh process;
  4. the evaluate stage through the flow, like 2.
The peak RSS of every process is its kernel high-water mark (``VmHWM``): the flow process's own, each Dask worker's
(read while it lives, every 0.2 s: it only grows), the rank's. Printed side by side for both N, with the cluster
stage's seconds per image (the flow's wall time, LocalCluster start included).

Then a sharded Lloyd iteration (N = 2M, D = 128, K = 1,024): one unit per block of shards on a 2-worker Dask
cluster (plain Dask, the stage's own unit functions) against the same iteration in one process with both cores;
the centroids after it must be bit-identical, and so must every row's label.

Ends with three lines: ``rss 8M/1M``, ``time per image 8M/1M``, ``sharded lloyd / one process``.
Targets: <= 1.15, <= 1.15, <= 1.25. Run it on a quiet machine (ratios skew under load):

    .venv/bin/python bench/scale.py [--sizes 1000000 8000000] [--lloyd-n 2000000] [--tmp DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

DIM, CLASSES, CENTERS = 128, 10, 64


# ---- the synthetic run ----------------------------------------------------------------------------------------------
def config(root: Path, args: argparse.Namespace) -> dict:
    return {"method": "deepercluster", "seed": 0, "rounds": 1,
            "data": {"source": str(root), "shard_size": args.shard},
            "cluster": {"super_clusters": args.m, "k": args.k, "pca_dim": args.pca_dim, "niter": args.niter},
            "eval": {"tensorboard": False, "final_round": False},
            "runtime": {"device": "cpu", "dask_workers": args.workers, "memory_budget_mb": args.budget_mb}}


def make_run(root: Path, n: int, args: argparse.Namespace) -> None:
    """A run store holding a synthetic round 0: manifest, features, the shard and extract stages done."""
    import pandas as pd

    from deepercluster.config import build_config
    from deepercluster.data.shard import MANIFEST
    from deepercluster.features.array import create_features, open_features, seal_features
    from deepercluster.run import init_run
    from deepercluster.store import PARQUET_ROWS, RunStore

    store = RunStore(str(root))
    root.mkdir(parents=True)  # the (unused) data source: the images exist only as the manifest's URIs
    cfg = build_config(config(root, args))
    init_run(store, cfg)
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(CENTERS, DIM)).astype(np.float32) * 3
    create_features(store, 0, n, DIM, args.shard, {"dim": DIM})
    array = open_features(store, 0, mode="r+")
    labels = np.empty(n, dtype=np.int64)
    for lo in range(0, n, args.shard):
        hi = min(lo + args.shard, n)
        comp = rng.integers(0, CENTERS, hi - lo)
        labels[lo:hi] = comp % CLASSES
        array[lo:hi] = (centers[comp] + rng.normal(size=(hi - lo, DIM)).astype(np.float32)).astype(np.float16)
    seal_features(store, 0, {"dim": DIM})

    def parts():
        for lo in range(0, n, PARQUET_ROWS):
            ids = np.arange(lo, min(lo + PARQUET_ROWS, n))
            yield pd.DataFrame({"image_id": ids, "uri": [f"/yfcc/{i // 1000:06d}/{i:09d}.jpg" for i in ids],
                                "shard": ids // args.shard, "label": labels[ids].astype(str), "width": 256,
                                "height": 256, "nbytes": 30_000, "sha256": "", "label_id": labels[ids]})

    store.write_parquet_parts(MANIFEST, parts())
    store.mark_stage_done("shard", None, {"images": n}, outputs=[MANIFEST])
    store.mark_stage_done("extract", 0, {"images": n})
    store.mark_stage_done("train", 0, {"images_per_s": None})  # evaluate reads the training's summary only


# ---- measuring processes --------------------------------------------------------------------------------------------
def hwm_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


class WorkerPeaks:
    """The peak RSS of each Dask worker process below this one (multiprocessing children), polled."""

    def __init__(self, interval: float = 0.2):
        self.peaks: dict[int, float] = {}
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            for child in me.children(recursive=True):
                try:
                    if "spawn_main" not in " ".join(child.cmdline()):
                        continue
                except psutil.Error:
                    continue
                peak = hwm_mb(child.pid)
                if peak is not None:
                    self.peaks[child.pid] = max(peak, self.peaks.get(child.pid, 0.0))
            self._stop.wait(self.interval)

    def __enter__(self) -> WorkerPeaks:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def child_stage(run: str, stage: str) -> None:
    """Run one stage through the Prefect flow (a LocalCluster started by it); print seconds and peaks as JSON."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows.stages import stage_flow

    with WorkerPeaks() as workers:
        t0 = time.perf_counter()
        stage_flow(run=run, stage=stage, round=0)
        seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "flow_mb": hwm_mb(os.getpid()),
                      "workers_mb": sorted(workers.peaks.values())}))


def child_train_inputs(run: str) -> None:
    """What a training rank sets up before its first batch: the targets and the image locations, one sample."""
    from deepercluster.run import open_run
    from deepercluster.training.inputs import load_pseudo_labels, training_dataset

    store, cfg = open_run(run)
    t0 = time.perf_counter()
    labels = load_pseudo_labels(store, cfg, 0)
    dataset = training_dataset(labels, cfg)
    rows = np.random.default_rng(0).integers(0, len(labels), 4096)
    uris = [labels.uris[int(i)] for i in rows]
    assert all(u.startswith("/yfcc/") for u in uris) and len(dataset) > 0
    print(json.dumps({"seconds": time.perf_counter() - t0, "rank_mb": hwm_mb(os.getpid())}))


def run_child(*argv: str) -> dict:
    done = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def one_size(n: int, args: argparse.Namespace, tmp: Path) -> dict:
    root = tmp / f"run-{n}"
    t0 = time.perf_counter()
    make_run(root, n, args)
    print(f"N={n:,}: synthetic run written in {time.perf_counter() - t0:.0f} s", flush=True)
    cluster = run_child("--child-stage", str(root), "cluster")
    print(f"  cluster stage: {cluster['seconds']:.1f} s ({cluster['seconds'] / n * 1e6:.2f} us/image), flow "
          f"{cluster['flow_mb']:.0f} MiB, workers {[round(w) for w in cluster['workers_mb']]} MiB", flush=True)
    train = run_child("--child-train", str(root))
    print(f"  training inputs: {train['seconds']:.1f} s, rank {train['rank_mb']:.0f} MiB", flush=True)
    evaluate = run_child("--child-stage", str(root), "evaluate")
    print(f"  evaluate stage: {evaluate['seconds']:.1f} s, flow {evaluate['flow_mb']:.0f} MiB, workers "
          f"{[round(w) for w in evaluate['workers_mb']]} MiB", flush=True)
    shutil.rmtree(root, ignore_errors=True)
    return {"n": n, "cluster_s": cluster["seconds"],
            "rss": {"cluster flow": cluster["flow_mb"], "cluster worker": max(cluster["workers_mb"]),
                    "training rank": train["rank_mb"], "evaluate flow": evaluate["flow_mb"],
                    "evaluate worker": max(evaluate["workers_mb"])}}


# ---- sharded Lloyd --------------------------------------------------------------------------------------------------
def lloyd_store(root: Path, n: int, k: int, shard: int) -> tuple:
    """A run store whose round 0 is whitened already (grid vectors in ``whitened.zarr``), level 1's checkpoint at
    iteration 0 saved: what the sharded iteration's units read."""
    import zarr

    from deepercluster.clustering.kmeans import ArrayVectors, initial_state, snap_to_grid
    from deepercluster.clustering.pca import l2_normalise
    from deepercluster.clustering.sharded import save_checkpoint
    from deepercluster.config import build_config
    from deepercluster.paths import whitened_rel
    from deepercluster.run import init_run
    from deepercluster.store import RunStore

    store = RunStore(str(root))
    root.mkdir(parents=True)
    cfg = build_config({"method": "deepcluster", "seed": 0, "data": {"source": str(root), "shard_size": shard},
                        "cluster": {"super_clusters": 1, "k": k, "niter": 2, "pca_dim": DIM},
                        "runtime": {"device": "cpu", "memory_budget_mb": 4096}})
    init_run(store, cfg)
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(CENTERS, DIM)).astype(np.float32)
    x = np.empty((n, DIM), dtype=np.float32)
    for lo in range(0, n, shard):
        hi = min(lo + shard, n)
        block = centers[rng.integers(0, CENTERS, hi - lo)] + 0.5 * rng.normal(size=(hi - lo, DIM)).astype(np.float32)
        x[lo:hi] = snap_to_grid(l2_normalise(block), exponent=0)
    array = zarr.create_array(store.url(whitened_rel(0)), shape=(n, DIM), chunks=(min(shard, 4096), DIM),
                              shards=(shard, DIM), dtype="float32", compressors=None)
    array[:] = x
    state = initial_state(ArrayVectors(x), k, np.random.SeedSequence(0))
    save_checkpoint(store, 0, "level1", state)
    return store, cfg, x, state


def bench_lloyd(args: argparse.Namespace, tmp: Path) -> float:
    from distributed import Client, LocalCluster

    from deepercluster.clustering.assign import NearestCentroid
    from deepercluster.clustering.kmeans import ArrayVectors, iterate
    from deepercluster.clustering.sharded import kmeans_todo, load_checkpoint, round_blocks, run_kmeans_unit
    from deepercluster.stages.base import pin_workers

    n, k = args.lloyd_n, args.lloyd_k
    store, cfg, x, state0 = lloyd_store(tmp / "lloyd", n, k, args.shard)
    blocks = round_blocks(store, cfg, 0)
    print(f"sharded Lloyd: N={n:,} D={DIM} K={k}, {len(blocks)} blocks of {blocks[0].hi - blocks[0].lo:,} rows, "
          f"{args.workers} workers", flush=True)

    data = ArrayVectors(x)
    one1 = iterate(data, state0, 1)  # iteration 1; then the timed one, 2
    t0 = time.perf_counter()
    one = iterate(data, one1, 2)
    t_one = time.perf_counter() - t0

    def iteration() -> float:
        """One sharded iteration as the stage's flow runs it: its blocks' units, then its reduce."""
        t0 = time.perf_counter()
        units = kmeans_todo(store, cfg, 0)  # the blocks' shares, pinned to workers as the stage's flow does
        pins = pin_workers(units, lambda u: u[2], list(client.scheduler_info(n_workers=-1)["workers"]))
        client.gather([client.submit(run_kmeans_unit, store, cfg, 0, u, pure=False, workers=[w],
                                     allow_other_workers=True) for u, w in zip(units, pins, strict=True)])
        (reduce,) = kmeans_todo(store, cfg, 0)
        client.submit(run_kmeans_unit, store, cfg, 0, reduce, pure=False).result()
        return time.perf_counter() - t0

    with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=None) as lc, \
            Client(lc) as client:
        client.run(__import__, "deepercluster.clustering.sharded")  # imported, as in the one process
        t_first = iteration()  # reads the blocks (each worker keeps its own in memory)
        t_sharded = iteration()

        def labels_of(lo: int, hi: int, centroids: np.ndarray) -> np.ndarray:
            import zarr

            from deepercluster.paths import whitened_rel

            part = zarr.open_array(store.url(whitened_rel(0)), mode="r")[lo:hi]
            return NearestCentroid(centroids).assign(np.asarray(part, dtype=np.float32))[0]

        sharded_labels = np.concatenate(client.gather([client.submit(labels_of, b.lo, b.hi, one1.centroids)
                                                       for b in blocks]))
    done = store.done_record("cluster", 0, "kmeans-level1")
    final = load_checkpoint(store, 0, "level1")
    same_centroids = done is not None and np.array_equal(final.centroids, one.centroids)
    same_labels = np.array_equal(sharded_labels, NearestCentroid(one1.centroids).assign(x)[0])
    print(f"  iteration 2 in one process (2 cores, rows in memory): {t_one:.2f} s; sharded on {args.workers} workers: "
          f"{t_sharded:.2f} s (iteration 1, reading the blocks: {t_first:.2f} s); centroids after 2 iterations "
          f"bit-identical: {same_centroids}; labels bit-identical: {same_labels}", flush=True)
    if not (same_centroids and same_labels):
        raise SystemExit("sharded Lloyd differs from one process")
    shutil.rmtree(tmp / "lloyd", ignore_errors=True)
    return t_sharded / t_one


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs=2, default=[1_000_000, 8_000_000])
    p.add_argument("--shard", type=int, default=65536, help="images per shard")
    p.add_argument("--m", type=int, default=16)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--pca-dim", type=int, default=32)
    p.add_argument("--niter", type=int, default=20)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--budget-mb", type=float, default=512)
    p.add_argument("--lloyd-n", type=int, default=2_000_000)
    p.add_argument("--lloyd-k", type=int, default=1024)
    p.add_argument("--tmp", default=None, help="where the run stores are written (default: the system's temp)")
    p.add_argument("--skip-lloyd", action="store_true")
    p.add_argument("--only-lloyd", action="store_true", help="only the sharded Lloyd comparison")
    p.add_argument("--child-stage", nargs=2, metavar=("RUN", "STAGE"), help=argparse.SUPPRESS)
    p.add_argument("--child-train", metavar="RUN", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_stage:
        return child_stage(*args.child_stage)
    if args.child_train:
        return child_train_inputs(args.child_train)

    if args.only_lloyd:
        with tempfile.TemporaryDirectory(prefix="bench-scale-", dir=args.tmp) as tmp:
            print(f"sharded lloyd / one process: {bench_lloyd(args, Path(tmp)):.2f}")
        return
    with tempfile.TemporaryDirectory(prefix="bench-scale-", dir=args.tmp) as tmp:
        small, large = (one_size(n, args, Path(tmp)) for n in args.sizes)
        lloyd = None if args.skip_lloyd else bench_lloyd(args, Path(tmp))
    a, b = small["n"], large["n"]
    label = f"{b / 1e6:g}M/{a / 1e6:g}M"
    print(f"\n{'peak RSS (MiB)':<18}{a:>12,}{b:>12,}{'ratio':>8}")
    ratios = {}
    for proc in small["rss"]:
        ratios[proc] = large["rss"][proc] / small["rss"][proc]
        print(f"{proc:<18}{small['rss'][proc]:>12.0f}{large['rss'][proc]:>12.0f}{ratios[proc]:>8.2f}")
    per_a, per_b = small["cluster_s"] / a * 1e6, large["cluster_s"] / b * 1e6
    print(f"{'cluster us/image':<18}{per_a:>12.2f}{per_b:>12.2f}{per_b / per_a:>8.2f}\n")
    worst = max(ratios, key=ratios.get)
    print(f"worst process: {worst}; targets: rss and time per image <= 1.15, sharded lloyd <= 1.25")
    print(f"rss {label}: {ratios[worst]:.2f}")
    print(f"time per image {label}: {per_b / per_a:.2f}")
    print(f"sharded lloyd / one process: {'not run' if lloyd is None else f'{lloyd:.2f}'}")

if __name__ == "__main__":
    main()

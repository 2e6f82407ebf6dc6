"""k-means speed against the matrix product it is made of, hierarchical against flat, and out-of-core memory.

Default (in memory, N=200,000 x D=128 unit vectors of a Gaussian mixture, on the k-means grid, as the stage's
whitened vectors):
  1. time of one Lloyd iteration of the stage's k-means (exact assignment + exact update, K=1,024) divided by the
     time of the matching N x D x K float32 matrix product (numpy, into a preallocated output); target <= 1.3.
  2. hierarchical k-means (m=8 super-clusters, then k=128 inside each) against flat K=1,024, same iterations;
     prints the speed-up (target >= 4x). As in the stage, level 1 is fitted first with the search threads on
     cluster.super_sample (4,096) vectors per super-cluster and then assigns every vector, then the
     level-2 units run in parallel, one thread each (the stage's Dask units), as many at once as the flat k-means
     has search threads.
Measurements are interleaved and repeated; medians are printed with the spread (max/min - 1), so noise shows, and
the ratio of the best times (other processes only ever add time).

--out-of-core: a feature store (float16, N x D) twice the size of ``--budget-mb`` is clustered by the whole cluster
stage (PCA, whitening, k-means) in a fresh child process with ``runtime.memory_budget_mb = --budget-mb``; prints
the child's peak RSS / budget (target <= 1.0), then runs it again with an unlimited budget (in memory) and checks
that both give the same assignments.

    .venv/bin/python bench/kmeans.py [--n 200000] [--dim 128] [--k 1024] [--niter 5] [--repeats 3]
    .venv/bin/python bench/kmeans.py --out-of-core [--budget-mb 512] [--k 256] [--niter 4]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from deepercluster.clustering.assign import search_threads, single_threaded_blas  # noqa: E402
from deepercluster.clustering.kmeans import ArrayVectors, lloyd, lloyd_on_sample, snap_to_grid  # noqa: E402
from deepercluster.config import ClusterConfig  # noqa: E402
from deepercluster.stages import run_stage


def unit_mixture(n: int, d: int, centers: int, seed: int = 0) -> np.ndarray:
    """L2-normalised Gaussian-mixture rows on the k-means grid (what the stage's whitening produces)."""
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centers, d)).astype(np.float32)
    x = c[rng.integers(0, centers, n)] + 0.7 * rng.normal(size=(n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return snap_to_grid(x, exponent=0)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} s (spread {max(values) / min(values) - 1:.0%})"


def bench_in_memory(args: argparse.Namespace) -> None:
    x = unit_mixture(args.n, args.dim, 4 * args.k)
    src = ArrayVectors(x)
    c_t = np.ascontiguousarray(x[: args.k].T)
    out = np.empty((args.n, args.k), dtype=np.float32)
    np.matmul(x, c_t, out=out)  # warm up (pages of ``out`` touched once)
    lloyd(src, args.k, 1, 0)
    matmul, iteration, ratio = [], [], []
    for _ in range(args.repeats):
        t_mm = timed(lambda: np.matmul(x, c_t, out=out))
        t_long = timed(lambda: lloyd(src, args.k, args.niter + 1, 0))
        t_short = timed(lambda: lloyd(src, args.k, 1, 0))
        per_iter = (t_long - t_short) / args.niter  # init and final pass cancel out
        matmul.append(t_mm)
        iteration.append(per_iter)
        ratio.append(per_iter / t_mm)
        print(f"  round: matmul {t_mm:.3f} s, Lloyd iteration {per_iter:.3f} s, ratio {per_iter / t_mm:.2f}",
              flush=True)
    print(f"N={args.n} D={args.dim} K={args.k}, {search_threads()} threads (BLAS and k-means search): "
          f"{args.n} x {args.dim} x {args.k} float32 matmul {summary(matmul)}; Lloyd iteration {summary(iteration)}")
    print(f"Lloyd iteration / matmul = {statistics.median(ratio):.2f}  (target <= 1.3; per round: "
          f"{', '.join(f'{r:.2f}' for r in ratio)}; best times: {min(iteration) / min(matmul):.2f})")

    m, k = args.super_clusters, args.k // args.super_clusters
    threads = search_threads()
    super_sample = ClusterConfig().super_sample
    out = None  # free the N x K product

    def hierarchical() -> None:
        # as the stage: level 1 fitted on cluster.super_sample vectors per super-cluster, then all assigned
        level1 = lloyd_on_sample(src, m, args.niter, 1, m * super_sample, exact_distances=False)
        order = np.argsort(level1.assign, kind="stable")
        bounds = np.searchsorted(level1.assign[order], np.arange(m + 1))

        def unit(s: int) -> None:  # a stage unit as on a Dask worker: one thread (Dask workers set BLAS threads 1)
            lloyd(ArrayVectors(x[order[bounds[s] : bounds[s + 1]]]), k, args.niter, (2, s), threads=1)

        # units in parallel, as many as the flat search's threads; BLAS held at one thread around them all, as in a
        # Dask worker (each unit's own per-call limit is not enough: the units then ran 1.7x slower)
        with single_threaded_blas(), ThreadPoolExecutor(threads) as pool:
            list(pool.map(unit, range(m)))

    flat, hier = [], []
    for _ in range(args.repeats):
        flat.append(timed(lambda: lloyd(src, args.k, args.niter, 1)))
        hier.append(timed(hierarchical))
    speedups = [f / h for f, h in zip(flat, hier, strict=True)]
    print(f"flat K={args.k}: {summary(flat)}; hierarchical m={m} x k={k}: {summary(hier)} ({args.niter} iterations; "
          f"level 1 fitted on {min(args.n, m * super_sample)} of {args.n} vectors, cluster.super_sample)")
    print(f"hierarchical speed-up over flat = {statistics.median(speedups):.1f}x  (target >= 4x; per round: "
          f"{', '.join(f'{s:.1f}' for s in speedups)}; best times: {min(flat) / min(hier):.1f}x; distance work "
          f"alone: {args.k / (m + k):.1f}x)")


# ---- out of core --------------------------------------------------------------------------------------------------
def make_store(root: Path, n: int, dim: int, shard: int, seed: int = 0) -> None:
    """A run store holding only ``rounds/0/features.zarr`` (float16, one zarr shard per image shard)."""
    import zarr

    group = zarr.open_group(str(root / "rounds/0/features.zarr"), mode="w")
    array = group.create_array("features", shape=(n, dim), chunks=(min(shard, 4096), dim), shards=(shard, dim),
                               dtype="float16", fill_value=0, compressors=None)
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(64, dim)).astype(np.float32) * 3
    for lo in range(0, n, shard):
        hi = min(lo + shard, n)
        block = centers[rng.integers(0, 64, hi - lo)] + rng.normal(size=(hi - lo, dim)).astype(np.float32)
        array[lo:hi] = block.astype(np.float16)
    from deepercluster.store import RunStore

    RunStore(str(root)).mark_stage_done("extract", 0)  # the cluster stage reads the extract stage's outputs


def child(args: argparse.Namespace) -> None:
    """Run the cluster stage on ``--store`` (in this fresh process) and print its record as JSON."""
    from deepercluster.config import build_config
    from deepercluster.store import RunStore

    cfg = build_config({"method": "deepcluster", "seed": 0,
                        "runtime": {"device": "cpu", "memory_budget_mb": args.budget_mb},
                        "cluster": {"super_clusters": 1, "k": args.k, "niter": args.niter, "pca_dim": args.dim,
                                    "pca_sample": 100_000}})
    t0 = time.perf_counter()
    stats = run_stage(RunStore(args.store), cfg, "cluster", 0)
    print(json.dumps({"seconds": time.perf_counter() - t0, "streamed": stats["level2"]["streamed"],
                      "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def run_child(store: Path, budget_mb: float, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", "--store", str(store), "--budget-mb", str(budget_mb),
           "--k", str(args.k), "--niter", str(args.niter), "--dim", str(args.dim)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_out_of_core(args: argparse.Namespace) -> None:
    import pandas as pd

    n = int(2 * args.budget_mb * 2**20 / (2 * args.dim))  # float16 features: twice the budget
    with tempfile.TemporaryDirectory(prefix="bench-kmeans-", dir=args.tmp) as tmp:
        streamed, in_memory = Path(tmp) / "streamed", Path(tmp) / "in-memory"
        t0 = time.perf_counter()
        make_store(streamed, n, args.dim, args.shard)
        print(f"feature store: {n} x {args.dim} float16 = {n * args.dim * 2 / 2**20:.0f} MiB "
              f"(budget {args.budget_mb:.0f} MiB; whitened float32 {n * args.dim * 4 / 2**20:.0f} MiB), "
              f"written in {time.perf_counter() - t0:.0f} s", flush=True)
        out = run_child(streamed, args.budget_mb, args)
        print(f"streamed (budget {args.budget_mb:.0f} MiB): units streamed {out['streamed']}, {out['seconds']:.1f} s, "
              f"peak RSS {out['rss_mb']:.0f} MiB")
        print(f"peak RSS / budget = {out['rss_mb'] / args.budget_mb:.2f}  (target <= 1.0)", flush=True)
        if args.skip_in_memory:
            return
        import shutil

        shutil.copytree(streamed / "rounds/0/features.zarr", in_memory / "rounds/0/features.zarr")
        from deepercluster.store import RunStore

        RunStore(str(in_memory)).mark_stage_done("extract", 0)
        ref = run_child(in_memory, 1e6, args)
        print(f"in memory (no budget): {ref['seconds']:.1f} s, peak RSS {ref['rss_mb']:.0f} MiB "
              f"({ref['rss_mb'] / args.budget_mb:.2f} x the budget)")
        a = pd.read_parquet(streamed / "rounds/0/clusters/assignments.parquet")
        b = pd.read_parquet(in_memory / "rounds/0/clusters/assignments.parquet")
        print(f"streamed and in-memory assignments identical: {a.equals(b)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--k", type=int, default=None, help="default 1024 (in memory), 256 (out of core)")
    p.add_argument("--super-clusters", type=int, default=8)
    p.add_argument("--niter", type=int, default=None, help="default 5 (in memory), 4 (out of core)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out-of-core", action="store_true")
    p.add_argument("--budget-mb", type=float, default=512)
    p.add_argument("--shard", type=int, default=16384, help="rows per feature shard (out of core)")
    p.add_argument("--skip-in-memory", action="store_true", help="out of core: skip the in-memory comparison")
    p.add_argument("--tmp", default=None, help="where the out-of-core feature store is written")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--store", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.k = args.k or (256 if args.out_of_core or args.child else 1024)
    args.niter = args.niter or (4 if args.out_of_core or args.child else 5)
    if args.child:
        child(args)
    elif args.out_of_core:
        bench_out_of_core(args)
    else:
        bench_in_memory(args)


if __name__ == "__main__":
    main()

"""Shard-stage throughput against a plain single-process PIL loop, and peak memory against the listing size.

1. Throughput (side by side, same files, one run): photo-like JPEGs are (a) read, hashed, decoded and written to a
   parquet manifest by a plain single-process PIL loop, and (b) run through the shard stage with its listing parts
   fanned out on a Dask LocalCluster (``--workers`` processes, one thread each: what the shard stage's flow does, less
   Prefect's bookkeeping). Prints images/s of both and their ratio (target >= 1.6x on 2 cores), and the CPU time
   per image of each (the stage's summed over its worker processes and this one): the ratio of those, times the
   number of workers, is what the wall-clock ratio tends to on idle cores (a machine shared with other jobs gives
   the workers less than their cores, the CPU times are not affected).
   The stage decodes JPEGs at 1/8 scale (DCT scaling: all entropy-coded data is still decoded, so a truncated or
   corrupt file is still caught); the plain loop decodes in full, as a naive validity check would.
2. Memory: the whole stage runs in a fresh child process over 10k and 100k listed images (tiny distinct PNGs);
   prints each child's peak RSS. Flat memory means the two are about equal.

    .venv/bin/python bench/ingest.py [--images 8192] [--workers 2] [--memory-sizes 10000,100000]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image


def photo_like(rng: np.random.Generator, w: int = 320, h: int = 240) -> Image.Image:
    """A smooth colour gradient with noise: decodes like a photo (not like flat colour or pure noise)."""
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h) + rng.uniform(0, 128)], axis=-1)
    return Image.fromarray(np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8))


def make_photos(folder: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        sub = folder / f"c{i % 10}"
        sub.mkdir(parents=True, exist_ok=True)
        photo_like(rng).save(sub / f"{i:06d}.jpg", quality=90)


def plain_pil_loop(folder: Path, out: Path) -> int:
    rows = []
    for path in sorted(folder.rglob("*.jpg")):
        data = path.read_bytes()
        img = Image.open(io.BytesIO(data))
        img.load()
        img = img.convert("RGB")
        rows.append({"uri": str(path), "label": path.parent.name, "width": img.width, "height": img.height,
                     "nbytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    df = pd.DataFrame(rows)
    df.insert(0, "image_id", range(len(df)))
    df.to_parquet(out)
    return len(df)


def _cpu_seconds() -> float:
    return time.process_time()


def stage_on_dask(folder: Path, run: Path, workers: int) -> tuple[int, float, float, float]:
    from distributed import Client, LocalCluster

    from deepercluster.config import build_config
    from deepercluster.data.shard import finalize_manifest, list_source, scan_part
    from deepercluster.store import RunStore
    from flows.dask_runtime import full_speed_malloc

    cfg = build_config({"data": {"source": str(folder)}, "cluster": {"k": 1, "super_clusters": 1}}).data
    t0 = time.perf_counter()
    with full_speed_malloc(), LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,  # as the pipeline's
                                           dashboard_address=None) as cluster, Client(cluster) as client:
        client.run(lambda: __import__("deepercluster.data.shard"))  # workers import the library once
        startup = time.perf_counter() - t0
        cpu0 = sum(client.run(_cpu_seconds).values()) + time.process_time()
        t0 = time.perf_counter()
        store = RunStore(run)
        parts = list_source(store, cfg)
        client.gather(client.map(scan_part, [store] * len(parts), [cfg] * len(parts), parts, pure=False))
        info = finalize_manifest(store, cfg)
        elapsed = time.perf_counter() - t0
        cpu = sum(client.run(_cpu_seconds).values()) + time.process_time() - cpu0
    return info["images"], elapsed, startup, cpu


def make_tiny(folder: Path, n: int) -> None:
    """n distinct 8x8 PNGs (a counter in the pixels), 1,000 per folder."""
    for i in range(n):
        sub = folder / f"d{i // 1000:04d}"
        if i % 1000 == 0:
            sub.mkdir(parents=True, exist_ok=True)
        px = np.zeros(64, np.uint8)
        px[:4] = np.frombuffer(np.uint32(i).tobytes(), np.uint8)
        Image.fromarray(px.reshape(8, 8), mode="L").save(sub / f"{i:07d}.png")


CHILD = """
import json, resource, sys, time
from deepercluster.stages import run_stage
from deepercluster.config import build_config
from deepercluster.store import RunStore
t0 = time.perf_counter()
cfg = build_config({"data": {"source": sys.argv[1]}, "cluster": {"k": 1, "super_clusters": 1}}).data
info = run_stage(RunStore(sys.argv[2]), cfg, "shard")
print(json.dumps({"images": info["images"], "seconds": time.perf_counter() - t0,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def peak_rss(folder: Path, run: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(run)], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8192, help="enough for several listing parts per worker")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--memory-sizes", default="10000,100000")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="dc-ingest-") as tmp:
        tmp = Path(tmp)
        make_photos(tmp / "photos", args.images)
        t0, cpu0 = time.perf_counter(), time.process_time()
        n_plain = plain_pil_loop(tmp / "photos", tmp / "plain.parquet")
        t_plain, cpu_plain = time.perf_counter() - t0, time.process_time() - cpu0
        n_stage, t_stage, startup, cpu_stage = stage_on_dask(tmp / "photos", tmp / "run", args.workers)
        assert n_plain == n_stage == args.images, (n_plain, n_stage)
        print(f"throughput on {args.images} JPEGs 320x240 (decode + hash + manifest):")
        print(f"  plain PIL loop, 1 process      {n_plain / t_plain:8.0f} images/s  ({t_plain:.2f} s)")
        print(f"  shard stage, {args.workers} Dask workers   {n_stage / t_stage:8.0f} images/s  ({t_stage:.2f} s; "
              f"cluster start-up {startup:.1f} s not counted)")
        print(f"  ratio stage / plain: {t_plain / t_stage:.2f}x  (target >= 1.6x on 2 cores)")
        print(f"  CPU per image: plain {cpu_plain / n_plain * 1e3:.3f} ms, stage {cpu_stage / n_stage * 1e3:.3f} ms "
              f"(all processes); on {args.workers} idle cores the ratio tends to "
              f"{args.workers * cpu_plain / n_plain / (cpu_stage / n_stage):.2f}x; load average "
              f"{__import__('os').getloadavg()[0]:.1f}")

        sizes = [int(s) for s in args.memory_sizes.split(",") if s]
        if sizes:
            print("peak RSS of a process running the whole stage (listing, scanning, dedupe, manifest):")
        for n in sizes:
            make_tiny(tmp / f"tiny-{n}", n)
            r = peak_rss(tmp / f"tiny-{n}", tmp / f"run-{n}")
            assert r["images"] == n, r
            print(f"  {n:>8} listed images: peak RSS {r['peak_rss_mb']:7.1f} MB  ({r['seconds']:.1f} s, "
                  f"{n / r['seconds']:.0f} images/s serial)")


if __name__ == "__main__":
    main()

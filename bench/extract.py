"""Extraction throughput against the network's own forward pass, measured side by side in one run.

For each network (the small CPU net and ResNet-18, 64 px by default):
  (a) pure forward: random tensors of the extract batch shape through the body in ``torch.inference_mode``,
      in this process (torch's default threads) and on the Dask workers (all at once, each with the torch threads
      the stage uses there: its task threads);
  (b) the extract stage end to end, from image files to ``features.zarr`` (decode, clustering view, forward,
      float16, zarr write, completion records): in this process (``run_stage``), on the Dask
      LocalCluster (``extract_shards`` per group of shards, no Prefect) and as the Prefect flow on that cluster;
and prints b/a = (images/s of b) / (images/s of the faster of the two (a)): the ratio of medians, and the ratio
within each repeat (a and b measured back to back). Both count the same images; b's time includes everything the
stage does (model load, array creation, reading, decoding, forward, zarr writes, records, consolidation), so the
image count must be large enough for its fixed costs to weigh as little as at real scale (default 8192 images:
16 shards of 512, 4 tasks of 4 shards). Medians are printed with the spread (max/min - 1) of each, so a noisy
machine shows.

    .venv/bin/python bench/extract.py [--images 8192] [--repeats 2] [--archs smallnet,resnet18] [--size 64]
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from deepercluster.config import PipelineConfig, RuntimeConfig, build_config  # noqa: E402
from deepercluster.device import cpu_compute  # noqa: E402
from deepercluster.features import (  # noqa: E402
    extract_shards,
    finalize_extract,
    prepare_features,
    shard_groups,
    shards_todo,
)
from deepercluster.features.model import LayerFeatures  # noqa: E402
from deepercluster.models import build_body  # noqa: E402
from deepercluster.run import init_run  # noqa: E402
from deepercluster.stages import begin, get_stage, run_stage  # noqa: E402
from deepercluster.store import RunStore  # noqa: E402

CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-test"


def image_source(n: int, tmp: Path) -> str:
    """CIFAR-10 test PNGs when present (real photos), else ``n`` generated 32x32 PNGs."""
    if CIFAR.is_dir():
        return str(CIFAR)
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp / "images"
    for i in range(n):
        (root / str(i % 10)).mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((32, 32), Image.BILINEAR)
        img.save(root / str(i % 10) / f"{i:05d}.png")
    return str(root)


def pure_forward(cfg_json: str, batch: int, n_images: int) -> tuple[int, float, int]:
    """Images through the body on random tensors of the extract batch shape: (images, seconds, torch threads)."""
    cfg = PipelineConfig.model_validate_json(cfg_json)
    net = LayerFeatures(build_body(cfg.model, seed=0), cfg.extract.layer).eval()
    x = torch.randn(batch, 3, cfg.data.image_size, cfg.data.image_size)
    with cpu_compute(), torch.inference_mode():  # the torch threads the stage uses here (a Dask worker's cores)
        net(x)
        start = time.perf_counter()
        done = 0
        while done < n_images:
            net(x).to(torch.float16)
            done += batch
        threads = torch.get_num_threads()
    return done, time.perf_counter() - start, threads


def stage_in_process(store: RunStore, cfg: PipelineConfig) -> float:
    start = time.perf_counter()
    run_stage(store, cfg, "extract", 0, force=True)
    return time.perf_counter() - start


def stage_on_dask(client, store: RunStore, cfg: PipelineConfig) -> float:
    start = time.perf_counter()
    begin(store, cfg, get_stage("extract"), 0, force=True)
    prepare_features(store, cfg, 0)
    groups = shard_groups(shards_todo(store, 0), cfg.extract.shards_per_task)  # what the stage flow submits
    futures = [client.submit(extract_shards, store, cfg, 0, g, pure=False) for g in groups]
    client.gather(futures)
    finalize_extract(store, 0)
    return time.perf_counter() - start


def stage_as_flow(store: RunStore, address: str) -> float:
    from flows.stages import stage_flow

    start = time.perf_counter()
    stage_flow(store.uri, "extract", 0, force=True, dask_address=address)
    return time.perf_counter() - start


def forward_on_workers(client, cfg: PipelineConfig, n_images: int) -> tuple[float, int]:
    workers = list(client.scheduler_info()["workers"])
    per = -(-n_images // len(workers))
    futures = [client.submit(pure_forward, cfg.model_dump_json(), cfg.extract.batch_size, per, workers=[w],
                             pure=False) for w in workers]
    results = client.gather(futures)
    return sum(r[0] for r in results) / max(r[1] for r in results), results[0][2]


def spread(xs: list[float]) -> str:
    return f"+-{(max(xs) / min(xs) - 1) * 100:.0f}%"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=8192)
    p.add_argument("--shard-size", type=int, default=512)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--archs", default="smallnet,resnet18")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--workers", type=int, default=RuntimeConfig().dask_workers,
                   help="LocalCluster workers (default: the pipeline's default layout)")
    p.add_argument("--no-flow", action="store_true", help="skip the Prefect flow measurement")
    args = p.parse_args()

    from distributed import Client
    from prefect.testing.utilities import prefect_test_harness

    from flows.dask_runtime import dask_scheduler

    tmp = Path(tempfile.mkdtemp(prefix="bench-extract-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # the images and runs go when the bench ends
    source = image_source(args.images, tmp)
    print(f"images: {args.images} from {source}, {args.size} px, batch {args.batch}, shards of {args.shard_size}; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    rows = []
    with prefect_test_harness(server_startup_timeout=180), \
            dask_scheduler(RuntimeConfig(dask_workers=args.workers)) as address, Client(address) as client:
        for arch in args.archs.split(","):
            cfg = build_config({"method": "deepcluster", "data": {"source": source, "limit": args.images,
                                                                  "shard_size": args.shard_size,
                                                                  "image_size": args.size},
                                "model": {"arch": arch}, "extract": {"batch_size": args.batch},
                                "cluster": {"k": 10}, "runtime": {"dask_address": address}})
            store = RunStore(tmp / f"run-{arch}")
            init_run(store, cfg)
            run_stage(store, cfg, "shard")
            n = len(store.read_parquet("data/manifest.parquet", columns=["image_id"]))
            run_stage(store, cfg, "extract", 0)  # warm: model written, page cache filled
            t: dict[str, list[float]] = {k: [] for k in ("a_proc", "a_dask", "b_proc", "b_dask", "b_flow")}
            for _ in range(args.repeats):
                done, secs, threads = pure_forward(cfg.model_dump_json(), args.batch, n)
                t["a_proc"].append(done / secs)
                t["b_proc"].append(n / stage_in_process(store, cfg))
                rate, worker_threads = forward_on_workers(client, cfg, n)
                t["a_dask"].append(rate)
                t["b_dask"].append(n / stage_on_dask(client, store, cfg))
                if not args.no_flow:
                    t["b_flow"].append(n / stage_as_flow(store, address))
            med = {k: statistics.median(v) for k, v in t.items() if v}
            a = max(med["a_proc"], med["a_dask"])
            print(f"\n{arch} @ {args.size}px  (in-process torch threads {threads}, Dask workers {args.workers} x "
                  f"{worker_threads} torch threads)")
            print(f"  (a) pure forward, this process   {med['a_proc']:8.1f} img/s {spread(t['a_proc'])}")
            print(f"  (a) pure forward, Dask workers   {med['a_dask']:8.1f} img/s {spread(t['a_dask'])}")
            for k, label in (("b_proc", "stage in this process"), ("b_dask", "stage on Dask (library)"),
                             ("b_flow", "stage as Prefect flow on Dask")):
                if k in med:
                    paired = [b / max(p, d) for b, p, d in zip(t[k], t["a_proc"], t["a_dask"], strict=True)]
                    print(f"  (b) {label:<30} {med[k]:8.1f} img/s {spread(t[k])}   b/a = {med[k] / a:.3f} "
                          f"(per repeat: {', '.join(f'{x:.2f}' for x in paired)})")
            if "b_flow" in med:
                cost = statistics.median(n / f - n / d for f, d in zip(t["b_flow"], t["b_dask"], strict=True))
                print(f"  Prefect's own cost per stage run (flow - library on Dask): {cost:.1f} s")
            rows.append((arch, med, a))
    print(f"\nload average at end {os.getloadavg()[0]:.1f}")
    print("summary: b/a = stage images/s / pure-forward images/s (a = the faster of in-process and on the Dask "
          "workers), medians: " + "; ".join(
        f"{arch}: proc {m['b_proc'] / a:.2f}, dask {m['b_dask'] / a:.2f}"
        + (f", flow {m['b_flow'] / a:.2f}" if "b_flow" in m else "") for arch, m, a in rows))


if __name__ == "__main__":
    main()

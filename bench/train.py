"""Train-stage throughput against pure forward+backward on random tensors, side by side in one run.

For each network (default: smallnet and ResNet-18, 64 px):
  (a) pure: in this process, the body and fresh heads of the stage (same config), SGD, random input tensors and
      random targets: forward + loss + backward + step at the stage's global batch, every core. Measured just
      before and just after (b); their mean is the reference.
  (b) real: the train stage itself, ``train_round`` (torchrun, image files read and decoded, random crops,
      flips and rotations, pseudo-labels through the uniform-over-clusters sampler, checkpoints every
      ``train.checkpoint_every`` steps, the per-iteration log), on a run made here. Its throughput is taken from
      the log's timestamps after ``--warmup`` steps, so it counts everything but torchrun's start and model build.
Prints images/s of both and real / pure (target >= 0.85 on CPU), and how busy the machine was (load average).
On a machine shared with other work, wall-clock rates swing with the others' load, so two steadier estimates are
printed beside the ratio of means: ``best/best``, the best ``--window``-step stretch of the stage (its log's
timestamps; a stretch holds a checkpoint) over the best burst of as many pure steps (the least disturbed moments of
each), and ``cpu ratio``, images per CPU-second of the training process(es) over the same for the pure loop (it
does not see time spent waiting, e.g. for I/O).

    .venv/bin/python bench/train.py [--archs smallnet,resnet18] [--image-size 64] [--batch 32] [--nproc 1]
                                     [--steps 30] [--warmup 5] [--source FOLDER]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from deepercluster.config import PipelineConfig, build_config
from deepercluster.features import ensure_round_model
from deepercluster.models import SubHeads, build_body, super_head
from deepercluster.run import init_run
from deepercluster.stages import run_stage
from deepercluster.store import RunStore
from deepercluster.training import train_round
from deepercluster.training.checkpoint import read_log
from deepercluster.training.groups import n_super_classes
from deepercluster.training.inputs import assignments_rel
from deepercluster.training.loss import hierarchical_loss
from deepercluster.training.trainer import TrainNet


def photo_like(rng: np.random.Generator, side: int) -> Image.Image:
    """A smooth colour gradient with noise: decodes like a photo (not like flat colour or pure noise)."""
    y, x = np.mgrid[0:side, 0:side]
    base = np.stack([x * 255 / side, y * 255 / side, (x + y) * 127 / side + rng.uniform(0, 128)], axis=-1)
    return Image.fromarray(np.clip(base + rng.normal(0, 12, (side, side, 3)), 0, 255).astype(np.uint8))


def make_images(folder: Path, n: int, side: int) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        photo_like(rng, side).save(folder / f"{i:06d}.jpg", quality=90)


def bench_config(source: Path, arch: str, args: argparse.Namespace, n_images: int) -> PipelineConfig:
    return build_config({
        "data": {"source": str(source), "image_size": args.image_size, "limit": n_images},
        "model": {"arch": arch},
        "train": {"epochs": 1, "batch_size": args.batch, "nproc": args.nproc, "loader_workers": args.loader_workers},
        "runtime": {"device": "cpu"},
    }, method="deepercluster")


def pure_bursts(cfg: PipelineConfig, bursts: int, window: int, warmup: int) -> tuple[list[float], float]:
    """Forward + loss + backward + SGD step of the stage's network on random tensors, one process, every core:
    images/s of each of ``bursts`` runs of ``window`` steps, and images per CPU-second over all of them."""
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    torch.manual_seed(0)
    body = build_body(cfg.model, seed=0)
    n_super, k = n_super_classes(cfg), cfg.cluster.k
    net = TrainNet(body, super_head(body.feature_dim, n_super, 0))
    sub = SubHeads(body.feature_dim, n_super, k, seed=0)
    params = [*net.parameters(), *sub.parameters()]
    t = cfg.train
    opt = torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    batch, size = t.batch_size * t.nproc, cfg.data.image_size
    net.train()
    x = torch.randn(batch, 3, size, size)
    super_class, sub_class = torch.randint(0, n_super, (batch,)), torch.randint(0, k, (batch,))

    def step() -> None:
        h, super_logits = net(x)
        loss, _ = hierarchical_loss(super_logits, sub(h, super_class), super_class, sub_class)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    rates, cpu = [], time.process_time()
    for _ in range(bursts):
        start = time.perf_counter()
        for _ in range(window):
            step()
        rates.append(window * batch / (time.perf_counter() - start))
    return rates, bursts * window * batch / (time.process_time() - cpu)


def real_stage(root: Path, cfg: PipelineConfig, warmup: int, window: int) -> tuple[float, float, float, float]:
    """Train the stage on a run made here. From its log after ``warmup`` steps: images/s over the whole timed
    part, the best ``window``-step stretch, images per CPU-second (rank 0's CPU time x ranks); and the wall time."""
    store = RunStore(root)
    init_run(store, cfg)
    run_stage(store, cfg, "shard")
    ensure_round_model(store, cfg, 0)
    n, m, k = cfg.data.limit, cfg.cluster.super_clusters, cfg.cluster.k
    rng = np.random.default_rng(0)
    sup, sub = rng.integers(0, m, n), rng.integers(0, k, n)
    store.write_parquet(assignments_rel(0), pd.DataFrame({
        "image_id": np.arange(n), "super": sup, "sub": sub, "target": sup * k + sub,
        "distance": np.zeros(n, np.float32)}))
    start = time.perf_counter()
    train_round(store, cfg, 0, on_line=lambda line: None)
    wall = time.perf_counter() - start
    rows = read_log(store, 0)[warmup:]
    g = cfg.train.batch_size * cfg.train.nproc * cfg.train.nnodes
    times = [row["time"] for row in rows]
    mean = (len(rows) - 1) * g / (times[-1] - times[0])
    best = max(window * g / (times[i + window] - times[i]) for i in range(len(rows) - window))
    cpu = (rows[-1]["cpu_s"] - rows[0]["cpu_s"]) * cfg.train.nproc * cfg.train.nnodes
    return mean, best, (len(rows) - 1) * g / cpu, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", default="smallnet,resnet18")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32, help="images per rank per step")
    parser.add_argument("--nproc", type=int, default=1, help="ranks of the real stage")
    parser.add_argument("--loader-workers", type=int, default=0, help="train.loader_workers of the real stage")
    parser.add_argument("--steps", type=int, default=30, help="timed steps (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--window", type=int, default=10, help="steps of a burst / stretch (>= checkpoint_every)")
    parser.add_argument("--source", type=Path, help="a folder of images (default: photo-like JPEGs made here)")
    parser.add_argument("--image-side", type=int, default=80, help="side of the JPEGs made here")
    args = parser.parse_args()
    n_images = (args.steps + args.warmup + 1) * args.batch * args.nproc
    print(f"train stage vs pure forward+backward: {args.image_size} px, {args.nproc} rank(s) x {args.batch} images, "
          f"{args.steps} timed steps after {args.warmup}, {len(os.sched_getaffinity(0))} cores, "
          f"torch {torch.__version__}")
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        source = args.source
        if source is None:
            source = Path(tmp) / "images"
            make_images(source, n_images, args.image_side)
        for arch in args.archs.split(","):
            cfg = bench_config(source, arch, args, n_images)
            load_before = os.getloadavg()[0]
            half = max(1, args.steps // args.window // 2)
            before, cpu_a = pure_bursts(cfg, half, args.window, args.warmup)
            real, real_best, real_cpu, wall = real_stage(Path(tmp) / f"run-{arch}", cfg, args.warmup, args.window)
            after, cpu_b = pure_bursts(cfg, half, args.window, args.warmup)
            pure, pure_best, pure_cpu = float(np.mean(before + after)), max(before + after), (cpu_a + cpu_b) / 2
            print(f"{arch:>9}: pure {pure:6.1f} img/s (best {args.window}-step burst {pure_best:6.1f}; before "
                  f"{np.mean(before):.1f}, after {np.mean(after):.1f})  real stage {real:6.1f} img/s (best "
                  f"{args.window}-step stretch {real_best:6.1f}; stage wall {wall:.0f} s)\n{'':>11}"
                  f"ratio {real / pure:.3f}  best/best {real_best / pure_best:.3f}  cpu ratio "
                  f"{real_cpu / pure_cpu:.3f}  (target >= 0.85)  load avg {load_before:.1f} -> "
                  f"{os.getloadavg()[0]:.1f}", flush=True)

if __name__ == "__main__":
    main()

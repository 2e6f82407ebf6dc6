"""Every CUDA path of the pipeline on one GPU, each against its CPU result, in a few minutes (issue 16).

The CPU test suite cannot reach these paths, so this script is what says they work on a given GPU machine:

  extract          the extract stage's forward loop (``features.stage._features`` over ``FeatureModel``: uint8
                   NHWC batches normalised on the device, channels-last, bf16/fp16 autocast, float16 features copied
                   back while the next batch runs) on synthetic images, against float32 CPU features of the same
                   images: max row-wise relative L2 error, and images/s.
  search-<backend> the k-means nearest-centroid search on CUDA (torch; faiss-gpu when installed) against the CPU
                   backend on random data (N=200k, D=128, K=1024, with duplicate centroids, so exact ties must go to
                   the lower index): labels identical, rows/s.
  lloyd-<backend>  one whole k-means (``clustering.kmeans.kmeans``) on CUDA against the CPU run: assignments,
                   centroids and inertia bit-identical; seconds.
  train-step       one training step as ``training.trainer.Trainer`` makes it (body + super head + sub-heads,
                   SyncBatchNorm, channels-last, bf16 autocast, the NCCL all-reduce of the metrics, SGD) in a
                   1-process NCCL group; the loss is finite and the step time is printed. With one rank torch's
                   SyncBatchNorm normalises locally, so its synchronised kernel is also run directly through the
                   NCCL group and compared with plain batch norm.

It prints the device, then one line per check, ``PASS|FAIL <name>: <figure>``; the exit code is the number of
failures. Without CUDA it prints one line and exits with 2.

    .venv/bin/python bench/gpu_check.py [--arch vgg16]
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from functools import cache
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from deepercluster.clustering.kmeans import KMeansResult

REL_TOL = 0.05  # bf16 autocast keeps ~8 bits per product: a row's features within 5% of float32's (L2)


@dataclass(frozen=True)
class Sizes:
    """Problem sizes: the issue's on a GPU; small ones for the CPU dry run (``--device cpu``), which only shows
    that the code of each check runs."""

    arch: str
    image: int  # side of the synthetic images
    ref_images: int  # images compared with the float32 CPU features
    timed_images: int  # images of the throughput run
    batch: int  # images per forward pass (the extract stage's default)
    n: int  # rows of the nearest-centroid search
    dim: int
    k: int
    lloyd_n: int  # rows of the k-means run
    niter: int
    train_batch: int
    n_super: int  # super-classes (super head) and sub-clusters per super-class (sub-heads) of the training step
    sub_k: int


CUDA_SIZES = Sizes("vgg16", 224, 64, 2048, 256, 200_000, 128, 1024, 100_000, 10, 64, 4, 256)
CPU_SIZES = Sizes("smallnet", 32, 16, 64, 32, 20_000, 32, 128, 5_000, 4, 8, 4, 16)


def pick_port() -> int:
    """A free TCP port on loopback for the 1-process group's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- (a) feature extraction ------------------------------------------------------------------------------------
def check_extract(device: torch.device, s: Sizes, arch: str) -> str:
    from deepercluster.config import ExtractConfig, ModelConfig
    from deepercluster.features.model import OUTPUT_LAYER, FeatureModel
    from deepercluster.features.stage import _features
    from deepercluster.models import build_body

    body = build_body(ModelConfig(arch=arch), seed=0)
    autocast = ExtractConfig().autocast
    gpu = FeatureModel(body, OUTPUT_LAYER, device, autocast)
    ref = FeatureModel(build_body(ModelConfig(arch=arch), seed=0), OUTPUT_LAYER, torch.device("cpu"), "off")
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (s.ref_images, s.image, s.image, 3), dtype=torch.uint8, generator=gen)

    def batches(x: torch.Tensor, repeat: int = 1) -> Iterator[tuple[int, torch.Tensor]]:
        """The loader's output: (first row, uint8 NHWC batch, pinned on a CUDA machine)."""
        pinned = [x[lo : lo + s.batch] for lo in range(0, len(x), s.batch)]
        if device.type == "cuda":
            pinned = [b.pin_memory() for b in pinned]
        row = 0
        for _ in range(repeat):
            for b in pinned:
                yield row, b
                row += len(b)

    got = torch.cat([f for _, f in _features(gpu, batches(images))]).float()
    want = torch.cat([ref(b).float() for _, b in batches(images)])
    if got.shape != want.shape:
        raise AssertionError(f"features {tuple(got.shape)} on {device} vs {tuple(want.shape)} on cpu")
    rel = float(((got - want).norm(dim=1) / want.norm(dim=1).clamp_min(1e-12)).max())
    timed = torch.randint(0, 256, (s.batch, s.image, s.image, 3), dtype=torch.uint8, generator=gen)
    for _ in _features(gpu, batches(timed)):  # warm-up: cuDNN picks its kernels for this batch shape
        pass
    repeat = max(1, s.timed_images // s.batch)
    sync(device)
    t0 = time.perf_counter()
    rows = sum(len(f) for _, f in _features(gpu, batches(timed, repeat)))
    seconds = time.perf_counter() - t0
    ok = math.isfinite(rel) and rel <= REL_TOL
    precision = autocast if device.type == "cuda" else "float32"
    figure = (f"{arch} {s.image}px {precision}{', channels-last' if device.type == 'cuda' else ''}: max relative "
              f"error {rel:.2e} vs float32 CPU (tolerance {REL_TOL}), {rows / seconds:.0f} images/s")
    if not ok:
        raise AssertionError(figure)
    return figure


# ---- (b) nearest-centroid search, (c) Lloyd ---------------------------------------------------------------------
def device_backends(device: torch.device) -> list[str]:
    """The search backends of ``device``: torch and, with faiss-gpu, faiss on CUDA; on the CPU dry run the CPU
    backend against itself (with a faiss-cpu index standing in for faiss-gpu's)."""
    from deepercluster.clustering import assign

    if device.type == "cpu":
        return [assign.CPU, assign.FAISS_GPU]
    return [assign.TORCH_CUDA] + ([assign.FAISS_GPU] if assign.faiss_gpus() > 0 else [])


def search_data(n: int, dim: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian rows; centroids drawn among them, 8 of them duplicated (exact ties: the lower index must win)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, dim), dtype=np.float32)
    c = x[np.sort(rng.choice(n, k, replace=False))].copy()
    c[-8:] = c[:8]
    return x, c


@cache
def cpu_search(n: int, dim: int, k: int) -> tuple[np.ndarray, float]:
    """The CPU backend's labels of :func:`search_data` and its seconds (after a warm-up: numba compiles the top-2
    scan at its first call), computed once for every device backend."""
    from deepercluster.clustering.assign import CPU, NearestCentroid

    x, c = search_data(n, dim, k)
    NearestCentroid(c, CPU).assign(x[:1024])
    t0 = time.perf_counter()
    labels, _ = NearestCentroid(c, CPU).assign(x)
    return labels, time.perf_counter() - t0


def check_search(backend: str, s: Sizes) -> str:
    from deepercluster.clustering.assign import NearestCentroid

    x, c = search_data(s.n, s.dim, s.k)
    want, cpu_s = cpu_search(s.n, s.dim, s.k)
    NearestCentroid(c, backend).assign(x[:1024])  # warm-up: CUDA context, cuBLAS handle, faiss resources
    nc = NearestCentroid(c, backend)
    t0 = time.perf_counter()
    got, dist = nc.assign(x)
    seconds = time.perf_counter() - t0
    differ = int((got != want).sum())
    if differ or not np.isfinite(dist).all():
        raise AssertionError(f"{differ} of {s.n} labels differ from the CPU backend's")
    return (f"{s.n} x {s.dim} rows, K={s.k}: labels identical to CPU, {s.n / seconds:,.0f} rows/s "
            f"(cpu {s.n / cpu_s:,.0f} rows/s), {nc.rechecked} near-ties re-decided in float64")


@cache
def cpu_kmeans(n: int, dim: int, k: int, niter: int) -> tuple[KMeansResult, float]:
    """The CPU backend's k-means of :func:`search_data` rows and its seconds, computed once for every backend."""
    from deepercluster.clustering.assign import CPU
    from deepercluster.clustering.kmeans import kmeans

    x, _ = search_data(n, dim, k)
    t0 = time.perf_counter()
    result = kmeans(x, k, niter, 0, backend=CPU)
    return result, time.perf_counter() - t0


def check_lloyd(backend: str, s: Sizes) -> str:
    from deepercluster.clustering.kmeans import kmeans

    x, _ = search_data(s.lloyd_n, s.dim, s.k)
    want, cpu_s = cpu_kmeans(s.lloyd_n, s.dim, s.k, s.niter)
    t0 = time.perf_counter()
    got = kmeans(x, s.k, s.niter, 0, backend=backend)
    seconds = time.perf_counter() - t0
    same = (np.array_equal(got.assign, want.assign), np.array_equal(got.centroids, want.centroids),
            got.inertia == want.inertia)
    if not all(same):
        raise AssertionError(f"not bit-identical to CPU (assignments, centroids, inertia equal: {same}; "
                             f"{int((got.assign != want.assign).sum())} assignments differ)")
    return (f"N={s.lloyd_n} D={s.dim} K={s.k} {s.niter} iterations: bit-identical to CPU, {seconds:.3g} s "
            f"(cpu {cpu_s:.3g} s), {got.rechecked} rows re-decided in float64")


# ---- (d) one training step -------------------------------------------------------------------------------------
def check_train_step(device: torch.device, s: Sizes, arch: str) -> str:
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    from deepercluster.config import ModelConfig
    from deepercluster.data.transforms import normalize_batch
    from deepercluster.models import GlobalBatchNorm, build_body, convert_global_batchnorm
    from deepercluster.models.heads import SubHeads, super_head
    from deepercluster.training.loss import METRICS, hierarchical_loss
    from deepercluster.training.trainer import TrainNet

    cuda = device.type == "cuda"
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{pick_port()}", rank=0, world_size=1,
                            timeout=timedelta(seconds=120))
    try:
        torch.manual_seed(0)
        body = build_body(ModelConfig(arch=arch), seed=0)
        net: nn.Module = TrainNet(body, super_head(body.feature_dim, s.n_super, 0))
        sub = SubHeads(body.feature_dim, s.n_super, s.sub_k, None, 0)
        # the trainer's conversion when batch norm is synchronised: torch's SyncBatchNorm on CUDA, ours on CPU
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net) if cuda else convert_global_batchnorm(net)
        bn_type = nn.SyncBatchNorm if cuda else GlobalBatchNorm
        n_bn = sum(isinstance(m, bn_type) for m in net.modules())
        net.to(device)
        sub.to(device)
        if cuda:
            net = net.to(memory_format=torch.channels_last)
        ids = [device.index if device.index is not None else torch.cuda.current_device()] if cuda else None
        ddp = DistributedDataParallel(net, device_ids=ids)  # the trainer skips DDP for 1 rank: here it all-reduces
        opt = torch.optim.SGD([*net.parameters(), *sub.parameters()], lr=0.01, momentum=0.9, weight_decay=1e-5)
        gen = torch.Generator().manual_seed(1)
        pixels = torch.randint(0, 256, (s.train_batch, s.image, s.image, 3), dtype=torch.uint8, generator=gen)
        super_class = torch.randint(0, s.n_super, (s.train_batch,), generator=gen)
        sub_class = torch.randint(0, s.sub_k, (s.train_batch,), generator=gen)

        def step() -> tuple[float, float]:
            """Trainer.forward_backward + update: (loss, seconds)."""
            sync(device)
            t0 = time.perf_counter()
            x = normalize_batch(pixels.to(device, non_blocking=True))
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                h, super_logits = ddp(x)
                sub_logits = sub(h, super_class.to(device))
            loss, metrics = hierarchical_loss(super_logits, sub_logits, super_class.to(device), sub_class.to(device))
            stats = torch.stack([loss.detach(), *(metrics[name] for name in METRICS)])
            dist.all_reduce(stats)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            value = float(stats[0])
            sync(device)
            return value, time.perf_counter() - t0

        ddp.train()
        sub.train()
        first_loss, first_s = step()
        loss, seconds = step()
        finite = all(math.isfinite(float(p.detach().float().abs().sum())) for p in net.parameters())
        sync_err = forced_sync_bn(device)
        figure = (f"{arch} {s.image}px batch {s.train_batch}, {backend} world 1, {n_bn} {bn_type.__name__} layers: "
                  f"loss {first_loss:.4f} -> {loss:.4f}, step {seconds * 1e3:.0f} ms (first {first_s * 1e3:.0f} ms), "
                  f"synchronised BN kernel vs batch_norm max error {sync_err:.1e}")
        if not (math.isfinite(first_loss) and math.isfinite(loss) and finite and sync_err < 1e-3):
            raise AssertionError(figure)
        return figure
    finally:
        dist.destroy_process_group()


def forced_sync_bn(device: torch.device) -> float:
    """A training-mode batch norm through the synchronised kernel over the 1-process group (torch's SyncBatchNorm
    function on CUDA, :class:`~deepercluster.models.sync_bn.GlobalBatchNorm`'s on CPU), forward and backward,
    against plain batch norm: max abs difference of outputs, input gradients and running statistics. With one
    rank the modules skip this path, so it is called directly: the statistics gather goes through the backend."""
    import torch.distributed as dist
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(8, 16, 5, 5, generator=gen).to(device)
    w = (1 + torch.rand(16, generator=gen)).to(device)
    b = torch.randn(16, generator=gen).to(device)
    outs = []
    for synced in (True, False):
        xi = x.clone().requires_grad_(True)
        rm, rv = torch.zeros(16, device=device), torch.ones(16, device=device)
        if not synced:
            y = F.batch_norm(xi, rm, rv, w, b, training=True, momentum=0.1, eps=1e-5)
        elif device.type == "cuda":
            from torch.nn.modules._functions import SyncBatchNorm as SyncBatchNormFunction

            y = SyncBatchNormFunction.apply(xi, w, b, rm, rv, 1e-5, 0.1, dist.group.WORLD, 1)
        else:
            from deepercluster.models.sync_bn import _GlobalBatchNorm

            y = _GlobalBatchNorm.apply(xi, w, b, rm, rv, 1e-5, 0.1, None)
        (y * y.detach().sin()).sum().backward()
        outs.append((y.detach(), xi.grad, rm, rv))
    return max(float((a - b).abs().max()) for a, b in zip(*outs, strict=True))


# ---- driver ------------------------------------------------------------------------------------------------------
def run(name: str, fn: Callable[[], str]) -> bool:
    """One check: its PASS line, or FAIL with the error's message (the traceback goes to stderr)."""
    try:
        figure = fn()
    except Exception as err:
        traceback.print_exc(file=sys.stderr)
        lines = [part.strip() for part in str(err).splitlines() if part.strip()]
        line = " | ".join(lines[:3])[:300]  # the head of the message (pydantic's spans lines)
        print(f"FAIL {name}: {type(err).__name__}: {line}", flush=True)
        return False
    print(f"PASS {name}: {figure}", flush=True)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", help="body of the extraction and training checks (default: vgg16 on CUDA, "
                        "DeeperCluster's; smallnet in the CPU dry run)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help=argparse.SUPPRESS)  # dry run
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device visible to torch: nothing to check here (run on a GPU machine; exit 2)", flush=True)
        return 2
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    s = CUDA_SIZES if args.device == "cuda" else CPU_SIZES
    arch = args.arch or s.arch
    backends = device_backends(device)  # never raises: a faiss that cannot search on the GPU means torch only
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        print(f"device: {torch.cuda.get_device_name(device)} ({props.total_memory / 2**30:.0f} GiB), torch "
              f"{torch.__version__}, CUDA {torch.version.cuda}, search backends: {', '.join(backends)}", flush=True)
    else:
        print(f"device: cpu dry run ({os.cpu_count()} cores), torch {torch.__version__}: small sizes, gloo, "
              "faiss-cpu standing in for faiss-gpu", flush=True)
        from deepercluster.clustering import assign

        def cpu_index(centroids: np.ndarray):  # faiss-cpu's flat index, same search API as faiss-gpu's
            import faiss

            index = faiss.IndexFlatL2(centroids.shape[1])
            index.add(centroids)
            return index

        assign._faiss_gpu_index = cpu_index
    checks: list[tuple[str, Callable[[], str]]] = [("extract", lambda: check_extract(device, s, arch))]
    for backend in backends:
        checks.append((f"search-{backend}", lambda b=backend: check_search(b, s)))
    for backend in backends:
        checks.append((f"lloyd-{backend}", lambda b=backend: check_lloyd(b, s)))
    checks.append(("train-step", lambda: check_train_step(device, s, arch)))
    return sum(not run(name, fn) for name, fn in checks)


if __name__ == "__main__":
    sys.exit(main())

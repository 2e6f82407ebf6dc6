"""The torchrun entry point: ``python -m deepercluster.training.worker --run URI --round R``.

(``--run-uri`` is the same option: torchrun's own parser rejects ``--run`` as an ambiguous abbreviation of its
``--run-path``, so the launcher passes ``--run-uri``.)

Every rank builds the round's body and fresh heads, wraps them in DDP (gloo on CPU, NCCL on CUDA with
SyncBatchNorm and bf16 autocast), and trains for ``cfg.train.epochs`` epochs over the uniform-over-clusters sampler.
Rank 0 checkpoints; a rerun continues from the checkpoint at the same sample, bitwise on CPU.
"""

from __future__ import annotations

import argparse
import ctypes
import math
import os
import signal
import socket
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from deepercluster.config import PipelineConfig
from deepercluster.data.datasets import PseudoLabelled
from deepercluster.data.transforms import N_ROTATIONS, TrainingView
from deepercluster.device import resolve_device
from deepercluster.errors import DeeperClusterError
from deepercluster.features import model_rel
from deepercluster.models import Body, HierarchicalHeads, load_body
from deepercluster.run import load_run_config
from deepercluster.store import RunStore
from deepercluster.training import checkpoint as ckpt_io
from deepercluster.training.checkpoint import STAGE, Position
from deepercluster.training.errors import ERROR_PREFIX, TrainError
from deepercluster.training.inputs import check_inputs, load_pseudo_labels
from deepercluster.training.launch import cpu_threads_per_rank
from deepercluster.training.loss import METRICS, hierarchical_loss
from deepercluster.training.sampler import UniformClusterSampler, derive_seed

HEADS_KEY, TORCH_KEY, LOADER_KEY = 1, 2, 3
PR_SET_PDEATHSIG = 1


class TrainNet(nn.Module):
    """Body and heads as one module, so that DDP sees every parameter."""

    def __init__(self, body: Body, heads: HierarchicalHeads):
        super().__init__()
        self.body, self.heads = body, heads

    def forward(self, x: torch.Tensor, super_class: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return self.heads(self.body(x), super_class)


def n_rotations(cfg: PipelineConfig) -> int:
    return N_ROTATIONS if cfg.train.rotations else 1


def build_heads(cfg: PipelineConfig, feature_dim: int, r: int) -> HierarchicalHeads:
    """New heads for round ``r`` (the old cluster ids mean nothing after re-clustering), seeded by (seed, r)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, r, HEADS_KEY))
        return HierarchicalHeads(feature_dim, cfg.cluster.super_clusters * n_rotations(cfg), cfg.cluster.k)


def die_with_parent() -> None:
    """Linux: have the kernel SIGKILL this worker when its parent (the torchrun agent) dies, so that killing the
    launcher's process group cannot leave orphan ranks training (torchrun starts each rank in its own session)."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request was in place
        os._exit(1)


def _env_rank() -> tuple[int, int, int]:
    """RANK, WORLD_SIZE, LOCAL_RANK from torchrun; a single process run by hand gets a one-rank group."""
    if "WORLD_SIZE" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])


class Trainer:
    """One rank's training of round ``r``."""

    def __init__(self, store: RunStore, cfg: PipelineConfig, r: int, rank: int, world: int, device: torch.device):
        self.store, self.cfg, self.r = store, cfg, r
        self.rank, self.world, self.device = rank, world, device
        self.batch = cfg.train.batch_size
        torch.manual_seed(derive_seed(cfg.seed, r, TORCH_KEY, rank))

        body = load_body(cfg.model, store.load_torch(model_rel(r))["body"])
        net = TrainNet(body, build_heads(cfg, body.feature_dim, r))
        ckpt = ckpt_io.load_checkpoint(store, r, cfg, world)
        self.pos = ckpt_io.position(ckpt)
        if ckpt is not None:
            net.body.load_state_dict(ckpt["body"])
            net.heads.load_state_dict(ckpt["heads"])
        net.to(device)
        if device.type == "cuda":
            net = net.to(memory_format=torch.channels_last)
            if world > 1:
                net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        self.net = net
        self.ddp = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
        t = cfg.train
        self.optimizer = torch.optim.SGD(net.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
        if ckpt is not None:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            ckpt_io.set_rng_state(ckpt["rng"][rank])
        self.resumed_from = self.pos.step if ckpt is not None else None
        self.log_rows = ckpt_io.read_log(store, r, self.pos.step) if rank == 0 else []

        labels = load_pseudo_labels(store, cfg, r)
        self.n_images = len(labels)
        self.sampler = UniformClusterSampler(labels.targets, self.batch, world, rank, cfg.seed, r)
        self.iters_per_epoch = self.sampler.per_rank // self.batch
        if self.iters_per_epoch == 0:
            raise TrainError(f"{self.n_images} images make no whole global batch of {world} x {self.batch}: "
                             "lower train.batch_size or train.nproc")
        view = TrainingView(cfg.data.image_size, cfg.train.crop_scale, cfg.train.hflip)
        dataset = PseudoLabelled(labels.uris, labels.super_ids, labels.sub_ids, view, n_rotations(cfg))
        self.loader = DataLoader(
            dataset, batch_size=self.batch, sampler=self.sampler, num_workers=t.loader_workers, drop_last=True,
            pin_memory=device.type == "cuda",
            generator=torch.Generator().manual_seed(derive_seed(cfg.seed, r, LOADER_KEY, rank)),
        )

    # ---- one iteration ----------------------------------------------------------------------------------------
    def _step(self, x: torch.Tensor, super_class: torch.Tensor, sub_class: torch.Tensor) -> list[float]:
        """Forward, loss, global metrics (checked finite before any update), backward, SGD step."""
        cuda = self.device.type == "cuda"
        x = x.to(self.device, non_blocking=True)
        super_class = super_class.to(self.device, non_blocking=True)
        sub_class = sub_class.to(self.device, non_blocking=True)
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            super_logits, sub_logits = self.ddp(x, super_class)
        loss, metrics = hierarchical_loss(super_logits, sub_logits, super_class, sub_class)
        stats = torch.stack([loss.detach(), *(metrics[name] for name in METRICS)])
        dist.all_reduce(stats)
        values = (stats / self.world).tolist()
        if not math.isfinite(values[0]):
            raise TrainError(f"round {self.r}: the loss became {values[0]} at step {self.pos.step + 1}: "
                             "lower train.lr")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return values

    # ---- checkpoints ------------------------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        return {"body": self.net.body.state_dict(), "heads": self.net.heads.state_dict(),
                "optimizer": self.optimizer.state_dict()}

    def _checkpoint(self) -> None:
        states: list[Any] = [None] * self.world
        dist.all_gather_object(states, ckpt_io.rng_state())
        if self.rank == 0:
            ckpt_io.save_checkpoint(self.store, self.r, self.cfg, _to_cpu(self._state()), self.pos, states,
                                    self.log_rows)

    def _report(self, row: dict[str, Any]) -> None:
        print(f"train r{self.r} epoch {row['epoch']} iter {row['iter'] + 1}/{self.iters_per_epoch} "
              f"step {row['step']} loss {row['loss']:.4f} acc_super {row['acc_super']:.3f} "
              f"acc_sub {row['acc_sub']:.3f} {row['images_per_s']:.0f} img/s", flush=True)

    # ---- the loop ---------------------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        every, epochs = self.cfg.train.checkpoint_every, self.cfg.train.epochs
        global_batch = self.world * self.batch
        self.ddp.train()
        for epoch in range(self.pos.epoch, epochs):
            first = self.pos.iteration if epoch == self.pos.epoch else 0
            self.sampler.set_epoch(epoch, first * self.batch)
            tick = time.perf_counter()
            for it, (x, super_class, sub_class) in enumerate(self.loader, start=first):
                values = self._step(x, super_class, sub_class)
                done = it + 1 == self.iters_per_epoch
                step = self.pos.step + 1
                self.pos = Position(epoch + 1, 0, step) if done else Position(epoch, it + 1, step)
                now = time.perf_counter()
                if self.rank == 0:
                    row = {"epoch": epoch, "iter": it, "step": step, "loss": values[0],
                           **dict(zip(METRICS, values[1:], strict=True)),
                           "images_per_s": global_batch / max(now - tick, 1e-9)}
                    self.log_rows.append(row)
                if step % every == 0 or done:
                    self._checkpoint()
                    if self.rank == 0:
                        self._report(self.log_rows[-1])
                tick = time.perf_counter()
        return self._finish()

    def _finish(self) -> dict[str, Any]:
        rows = self.log_rows
        seconds = sum(self.world * self.batch / row["images_per_s"] for row in rows)
        info = {
            "steps": self.pos.step, "epochs": self.cfg.train.epochs, "iters_per_epoch": self.iters_per_epoch,
            "world_size": self.world, "images": self.n_images, "resumed_from_step": self.resumed_from,
            "final_loss": rows[-1]["loss"] if rows else None,
            "images_per_s": len(rows) * self.world * self.batch / seconds if seconds else None,
        }
        if self.rank == 0:
            state = _to_cpu(self._state())
            ckpt_io.save_final(self.store, self.r, self.cfg, state["body"], state["heads"], rows, info)
        return info


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj


def train_round(store: RunStore, cfg: PipelineConfig, r: int) -> dict[str, Any]:
    """This rank's whole training of round ``r``, inside an initialised process group."""
    check_inputs(store, r)
    device = resolve_device(cfg.runtime.device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    return Trainer(store, cfg, r, dist.get_rank(), dist.get_world_size(), device).train()


@record  # an unexpected exception's traceback goes into torchrun's failure summary
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deepercluster.training.worker", description=__doc__)
    parser.add_argument("--run", "--run-uri", required=True, dest="run", help="run store URI")
    parser.add_argument("--round", type=int, required=True, dest="round_")
    args = parser.parse_args(argv)
    if "TORCHELASTIC_RUN_ID" in os.environ:
        die_with_parent()
    store = RunStore(args.run)
    if store.stage_done(STAGE, args.round_):
        return 0
    rank, world, local_rank = _env_rank()
    try:
        cfg = load_run_config(store)
        cuda = resolve_device(cfg.runtime.device).type == "cuda"
        if cuda:
            torch.cuda.set_device(local_rank)
        elif world > 1:  # ranks share the cores: a fixed count, also what keeps CPU results bitwise reproducible
            torch.set_num_threads(cpu_threads_per_rank(int(os.environ.get("LOCAL_WORLD_SIZE", world))))
        dist.init_process_group("nccl" if cuda else "gloo")
        train_round(store, cfg, args.round_)
    except DeeperClusterError as err:
        print(f"{ERROR_PREFIX} (rank {rank}): {err}", file=sys.stderr, flush=True)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

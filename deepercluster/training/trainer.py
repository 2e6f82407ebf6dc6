"""One rank's training of a round, inside an initialised process group (see :mod:`deepercluster.training.worker`).

Every rank builds the round's body and fresh heads. The body and the super-class head are wrapped in one DDP over
every rank; the sub-heads in a DDP over the rank's communication group (:mod:`deepercluster.training.groups`):
the world when every rank holds every head, else the ranks of one super-class. With groups, batch normalisation
uses the statistics of the global batch (torch's SyncBatchNorm on CUDA, :class:`GlobalBatchNorm` on CPU), as on
CUDA with several ranks. CUDA also gets bf16 autocast and channels-last. A group of one rank needs no DDP and gets none.

Checkpoints are snapshots written by a background thread of each rank (training goes on meanwhile): rank 0 writes
the body, each group's first rank its sub-heads, and ``checkpoint.pt`` is committed only once every file is whole.
A rerun continues from the last committed checkpoint at the same sample, bitwise on CPU.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from deepercluster.clustering.means import head_temperature, load_cluster_means, means_rel
from deepercluster.clustering.stage import STAGE as CLUSTER_STAGE
from deepercluster.clustering.stage import super_unit
from deepercluster.config import PipelineConfig
from deepercluster.data.transforms import normalize_batch
from deepercluster.features import model_rel
from deepercluster.features.calibrate import calibrate_round_model
from deepercluster.models import Body, load_body
from deepercluster.models.heads import SubHeads, init_heads_from_means, super_head
from deepercluster.models.sync_bn import convert_global_batchnorm
from deepercluster.store import RunStore
from deepercluster.training import checkpoint as ckpt_io
from deepercluster.training.checkpoint import Position
from deepercluster.training.errors import TrainError
from deepercluster.training.groups import check_group_data, head_groups, n_rotations, n_super_classes
from deepercluster.training.inputs import load_pseudo_labels, training_dataset
from deepercluster.training.loss import METRICS, hierarchical_loss
from deepercluster.training.progress import format_progress
from deepercluster.training.sampler import GroupClusterSampler, UniformClusterSampler, derive_seed

HEADS_KEY, TORCH_KEY, LOADER_KEY = 1, 2, 3


class TrainNet(nn.Module):
    """What every rank holds and all-reduces over the world: the body and the super-class head.

    Returns ``ReLU(features)`` (what the heads read, as in both papers) and the super-class logits (or None)."""

    def __init__(self, body: Body, head: nn.Linear | None):
        super().__init__()
        self.body, self.super_head = body, head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = torch.relu(self.body(x))
        return h, self.super_head(h) if self.super_head is not None else None


def heads_seed(cfg: PipelineConfig, r: int) -> int:
    """New heads for round ``r`` (old cluster ids mean nothing after re-clustering), seeded by (seed, r)."""
    return derive_seed(cfg.seed, r, HEADS_KEY)


def init_sub_heads(store: RunStore, cfg: PipelineConfig, r: int, sub: SubHeads) -> int:
    """The sub-heads of round ``r`` as the nearest-mean classifiers of its clusters (the cluster stage's
    ``sub-<s>_means.npy`` of the super-clusters ``sub`` holds, at the temperature of every unit's records)."""
    n_rot = n_rotations(cfg)
    supers = sorted({c // n_rot for c in sub.owned})
    missing = [s for s in supers if not store.exists(means_rel(r, s))]
    if missing:
        raise TrainError(f"round {r}'s clusters have no feature means ({store.url(means_rel(r, missing[0]))}: they "
                         f"were made with train.head_init: random): rerun the cluster stage with --force, or set "
                         "train.head_init: random")
    means = {s: torch.from_numpy(load_cluster_means(store, r, s)) for s in supers}
    records = [store.done_record(CLUSTER_STAGE, r, super_unit(s)) for s in range(cfg.cluster.super_clusters)]
    return init_heads_from_means(sub, means, head_temperature(records), n_rot)


def _to_cpu(obj: Any, copy: bool = False) -> Any:
    """Tensors of ``obj`` (nested dicts/lists) on the CPU; with ``copy``, always new tensors (a snapshot that
    training can no longer change)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=copy)
    if isinstance(obj, dict):
        return {k: _to_cpu(v, copy) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v, copy) for v in obj]
    return obj


class BackgroundWriter:
    """Runs checkpoint writes in a thread, one at a time and in order: ``submit`` first waits for the previous
    one; ``wait`` re-raises the error of a failed one."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def _run(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except BaseException as err:  # handed to the training thread by wait()
            self._error = err

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        self.wait()
        self._thread = threading.Thread(target=self._run, args=(fn, *args), name="checkpoint-writer", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err


def _ddp(module: nn.Module, ranks: int, group: Any, device_ids: list[int] | None) -> nn.Module:
    """``module`` all-reduced over ``group`` (``ranks`` processes); a group of one needs no DDP at all."""
    if ranks == 1:
        return module
    return DistributedDataParallel(module, device_ids=device_ids, process_group=group, gradient_as_bucket_view=True)


class Trainer:
    """One rank's training of round ``r``."""

    def __init__(self, store: RunStore, cfg: PipelineConfig, r: int, rank: int, world: int, device: torch.device):
        self.store, self.cfg, self.r = store, cfg, r
        self.rank, self.world, self.device = rank, world, device
        self.batch = cfg.train.batch_size
        self.quiet = False
        t = cfg.train
        torch.manual_seed(derive_seed(cfg.seed, r, TORCH_KEY, rank))

        # ---- who holds what: process groups (every rank creates every group, in the same order)
        self.plan = head_groups(cfg, world)
        self.group = self.plan.group_of(rank)
        self.group_rank = rank - self.plan.ranks(self.group)[0]
        self.owned = self.plan.owned(self.group)
        head_pg = None
        if self.plan.grouped:
            pgs = [dist.new_group(self.plan.ranks(g)) for g in range(self.plan.n_groups)]
            head_pg = pgs[self.group]
        sync_bn = world > 1 and (self.plan.grouped or device.type == "cuda")
        bn_pg = dist.new_group(list(range(world))) if sync_bn and device.type != "cuda" else None

        # ---- the network: body + super head (all ranks), this group's sub-heads
        body = load_body(cfg.model, store.load_torch(model_rel(r))["body"])
        seed, n_super = heads_seed(cfg, r), n_super_classes(cfg)
        net = TrainNet(body, super_head(body.feature_dim, n_super, seed))
        sub = SubHeads(body.feature_dim, n_super, cfg.cluster.k, self.owned, seed) if cfg.cluster.k > 1 else None
        ckpt = ckpt_io.load_checkpoint(store, r, cfg, world)
        if sub is not None and ckpt is None and t.head_init == "centroids":
            init_sub_heads(store, cfg, r, sub)
        self.pos = ckpt_io.position(ckpt)
        group_state = None
        if ckpt is not None:
            net.body.load_state_dict(ckpt["body"])
            if net.super_head is not None:
                net.super_head.load_state_dict(ckpt["super_head"])
            if sub is not None:
                group_state = ckpt_io.load_group_heads(store, r, self.pos.step, self.group)
                sub.load_state_dict(group_state["sub"])
        if sync_bn:
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net) if device.type == "cuda" else \
                convert_global_batchnorm(net, bn_pg)
        net.to(device)
        if sub is not None:
            sub.to(device)
        if device.type == "cuda":
            net = net.to(memory_format=torch.channels_last)
        self.net, self.sub = net, sub
        ids = [device.index] if device.type == "cuda" else None
        self.ddp = _ddp(net, world, None, ids)
        self.ddp_sub = _ddp(sub, self.plan.group_size, head_pg, ids) if sub is not None else None
        # checkpoints are written by a thread of each rank, which meet on a gloo group of their own
        self.ckpt_pg = dist.new_group(list(range(world)), backend="gloo")
        self.writer = BackgroundWriter()

        def sgd(params: Any) -> torch.optim.SGD:
            return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)

        self.optimizer = sgd(net.parameters())
        self.head_optimizer = sgd(sub.parameters()) if sub is not None else None
        if ckpt is not None:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            if self.head_optimizer is not None and group_state is not None:
                self.head_optimizer.load_state_dict(group_state["optimizer"])
            ckpt_io.set_rng_state(ckpt["rng"][rank])
        self.resumed_from = self.pos.step if ckpt is not None else None
        self.log_rows = ckpt_io.read_log(store, r, self.pos.step) if rank == 0 else []

        # ---- the data: uniform over clusters; with groups, over the sub-clusters of the group's super-cluster
        labels = load_pseudo_labels(store, cfg, r)
        check_group_data(cfg, self.plan, labels)
        self.n_images = len(labels)
        n_rot = n_rotations(cfg)
        rotation = None
        if self.plan.grouped:
            rows = np.flatnonzero(labels.super_ids == self.group // n_rot)
            self.sampler: UniformClusterSampler = GroupClusterSampler(
                rows, labels.targets[rows] % labels.k, t.epoch_images or self.n_images, self.batch, world, self.group,
                self.plan.group_size, self.group_rank, cfg.seed, r)
            rotation = self.group % n_rot
        else:
            self.sampler = UniformClusterSampler(labels.targets, self.batch, world, rank, cfg.seed, r, t.epoch_images)
        self.iters_per_epoch = self.sampler.per_rank // self.batch
        if self.iters_per_epoch == 0:
            raise TrainError(f"{self.n_images} images make no whole global batch of {world} x {self.batch}: "
                             "lower train.batch_size or train.nproc")
        self.total_steps = self.iters_per_epoch * t.epochs
        dataset = training_dataset(labels, cfg, rotation)
        self.loader = DataLoader(
            dataset, batch_size=self.batch, sampler=self.sampler, num_workers=t.loader_workers, drop_last=True,
            pin_memory=device.type == "cuda", persistent_workers=False,
            generator=torch.Generator().manual_seed(derive_seed(cfg.seed, r, LOADER_KEY, rank)),
        )

    # ---- one iteration ----------------------------------------------------------------------------------------
    def forward_backward(self, x: torch.Tensor, super_class: torch.Tensor, sub_class: torch.Tensor) -> list[float]:
        """Forward (``x``: the loader's uint8 pixels), loss, global metrics (checked finite before any gradient),
        backward: gradients are averaged over every rank for the body and super head, over the group for the
        sub-heads. Returns the metrics."""
        cuda = self.device.type == "cuda"
        x = normalize_batch(x.to(self.device, non_blocking=True))
        super_class = super_class.to(self.device, non_blocking=True)
        sub_class = sub_class.to(self.device, non_blocking=True)
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            h, super_logits = self.ddp(x)
            sub_logits = self.ddp_sub(h, super_class) if self.ddp_sub is not None else None
        loss, metrics = hierarchical_loss(super_logits, sub_logits, super_class, sub_class)
        stats = torch.stack([loss.detach(), *(metrics[name] for name in METRICS)])
        dist.all_reduce(stats)
        values = (stats / self.world).tolist()
        if not math.isfinite(values[0]):
            raise TrainError(f"round {self.r}: the loss became {values[0]} at step {self.pos.step + 1}: "
                             "lower train.lr")
        self.optimizer.zero_grad(set_to_none=True)
        if self.head_optimizer is not None:
            self.head_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return values

    def update(self) -> None:
        self.optimizer.step()
        if self.head_optimizer is not None:
            self.head_optimizer.step()

    # ---- checkpoints ------------------------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        head = self.net.super_head
        return {"body": self.net.body.state_dict(), "super_head": head.state_dict() if head is not None else None,
                "optimizer": self.optimizer.state_dict()}

    def _checkpoint(self) -> None:
        """Snapshot what this rank writes (its group's sub-heads if it leads the group; body, super head, optimizer
        and log on rank 0) and every rank's RNG state; a background thread writes them while training goes on."""
        heads = None
        if self.sub is not None and self.group_rank == 0:
            heads = _to_cpu({"classes": self.owned, "sub": self.sub.state_dict(),
                             "optimizer": self.head_optimizer.state_dict() if self.head_optimizer else None}, copy=True)
        main = _to_cpu(self._state(), copy=True) if self.rank == 0 else None
        self.writer.submit(self._write_checkpoint, self.pos, heads, main, ckpt_io.rng_state(), list(self.log_rows))

    def _write_checkpoint(self, pos: Position, heads: dict[str, Any] | None, main: dict[str, Any] | None,
                          rng: dict[str, Any], log_rows: list[dict[str, Any]]) -> None:
        """(Writer thread, every rank.) Group leaders write their sub-heads; the ranks then exchange RNG states and
        errors, so that rank 0 commits ``checkpoint.pt`` only once every group's file is whole."""
        error = None
        if heads is not None:
            try:
                ckpt_io.save_group_heads(self.store, self.r, pos.step, self.group, heads)
            except Exception as err:  # told to every rank below, raised by each
                error = f"rank {self.rank} could not write its sub-heads: {err}"
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, (rng, error), group=self.ckpt_pg)
        errors = [e for _, e in gathered if e]
        if errors:
            raise TrainError(errors[0])
        if self.rank == 0:
            ckpt_io.save_checkpoint(self.store, self.r, self.cfg, main, pos, [s for s, _ in gathered], log_rows)

    # ---- the loop ---------------------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        every, epochs = self.cfg.train.checkpoint_every, self.cfg.train.epochs
        global_batch = self.world * self.batch
        self.ddp.train()
        if self.ddp_sub is not None:
            self.ddp_sub.train()
        for epoch in range(self.pos.epoch, epochs):
            first = self.pos.iteration if epoch == self.pos.epoch else 0
            self.sampler.set_epoch(epoch, first * self.batch)
            tick = time.perf_counter()
            for it, (x, super_class, sub_class) in enumerate(self.loader, start=first):
                values = self.forward_backward(x, super_class, sub_class)
                self.update()
                done = it + 1 == self.iters_per_epoch
                step = self.pos.step + 1
                self.pos = Position(epoch + 1, 0, step) if done else Position(epoch, it + 1, step)
                now = time.perf_counter()
                if self.rank == 0:
                    row = {"epoch": epoch, "iter": it, "step": step, "loss": values[0],
                           **dict(zip(METRICS, values[1:], strict=True)),
                           "images_per_s": global_batch / max(now - tick, 1e-9), "time": time.time(),
                           "cpu_s": time.process_time()}
                    self.log_rows.append(row)
                    if not self.quiet:
                        print(format_progress(self.r, row, self.iters_per_epoch, self.total_steps), flush=True)
                if step % every == 0 or done:
                    self._checkpoint()
                tick = time.perf_counter()
        return self._finish()

    def _finish(self) -> dict[str, Any]:
        self.writer.wait()
        rows = self.log_rows
        seconds = sum(self.world * self.batch / row["images_per_s"] for row in rows)
        info = {
            "steps": self.pos.step, "epochs": self.cfg.train.epochs, "iters_per_epoch": self.iters_per_epoch,
            "world_size": self.world, "groups": self.plan.n_groups, "images": self.n_images,
            "resumed_from_step": self.resumed_from, "final_loss": rows[-1]["loss"] if rows else None,
            "images_per_s": len(rows) * self.world * self.batch / seconds if seconds else None,
        }
        if self.rank == 0:
            state = _to_cpu(self._state())
            body = load_body(self.cfg.model, state["body"])
            calibrate_round_model(self.store, self.cfg, self.r + 1, body, self.device)
            state["body"] = body.state_dict()
            groups = [ckpt_io.load_group_heads(self.store, self.r, self.pos.step, g)
                      for g in range(self.plan.n_groups)] if self.sub is not None else []
            heads = ckpt_io.assemble_heads(state["super_head"], groups)
            ckpt_io.save_final(self.store, self.r, self.cfg, state["body"], heads, rows, info)
        return info

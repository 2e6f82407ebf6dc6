"""The training stage: uniform-over-clusters sampler, hierarchical loss, and real 2-rank torchrun runs (train,
kill -9 mid-run, resume bitwise)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TRAIN_IMAGES
from scipy.stats import chisquare

from deepercluster.config import PipelineConfig, build_config
from deepercluster.errors import StoreError
from deepercluster.features import ensure_round_model, model_rel
from deepercluster.models import HierarchicalHeads, SubHeads, super_head
from deepercluster.run import init_run
from deepercluster.stages import get_stage, run_stage
from deepercluster.store import RunStore
from deepercluster.training import TrainError, train_command, train_env, train_round
from deepercluster.training.checkpoint import checkpoint_rel, final_rel, read_log
from deepercluster.training.inputs import assignments_rel
from deepercluster.training.loss import hierarchical_loss
from deepercluster.training.sampler import UniformClusterSampler, samples_per_rank, uniform_epoch
from deepercluster.training.trainer import TrainNet

# ---- sampler ------------------------------------------------------------------------------------------------------
# very unequal clusters (600, 120, 25, 4, 1 images) and empty ones (ids 1, 3, 4, 6, 8, 9 have no image)
SIZES = {0: 600, 2: 120, 5: 25, 7: 4, 10: 1}
TARGETS = np.random.default_rng(1).permutation(np.concatenate([np.full(n, t) for t, n in SIZES.items()]))


def rank_streams(world: int, batch: int, seed: int = 0, round_: int = 0, epoch: int = 0) -> list[list[tuple]]:
    streams = []
    for rank in range(world):
        s = UniformClusterSampler(TARGETS, batch, world, rank, seed, round_)
        s.set_epoch(epoch)
        streams.append(list(s))
    return streams


def test_sampler_draws_non_empty_clusters_uniformly() -> None:
    counts = {t: 0 for t in SIZES}
    for epoch in range(5):
        for stream in rank_streams(2, 8, epoch=epoch):
            for row, _ in stream:
                counts[int(TARGETS[row])] += 1
    assert set(counts) == set(SIZES)  # only non-empty clusters are drawn (a KeyError above otherwise)
    observed = np.array(list(counts.values()))
    assert chisquare(observed).pvalue > 0.01, counts  # proportional-to-size draws would give p ~ 0
    assert observed.min() > 0.9 * observed.mean()


def test_sampler_replacement_only_for_small_clusters() -> None:
    rows, seeds = uniform_epoch(TARGETS, seed=3, round_=0, epoch=0)
    assert len(rows) == len(TARGETS) == len(seeds)
    big = rows[TARGETS[rows] == 0]
    assert len(np.unique(big)) == len(big)  # 600 >= 150 draws: without replacement
    assert (TARGETS[rows] == 10).sum() > 100  # the one-image cluster is drawn ~150 times
    assert seeds.min() >= 0 and len(np.unique(seeds)) == len(seeds)


def test_sampler_splits_ranks_without_overlap() -> None:
    world, batch = 3, 8
    streams = rank_streams(world, batch, seed=5)
    per_rank = samples_per_rank(len(TARGETS), world, batch)
    assert per_rank == 750 // 24 * 8 and all(len(s) == per_rank for s in streams)
    sample_ids = [{seed for _, seed in s} for s in streams]
    assert all(not (sample_ids[a] & sample_ids[b]) for a in range(world) for b in range(a + 1, world))
    rows, seeds = uniform_epoch(TARGETS, seed=5, round_=0, epoch=0)
    interleaved = [pair for batch_of_ranks in zip(*streams, strict=True) for pair in batch_of_ranks]
    assert interleaved == list(zip(rows[: per_rank * world].tolist(), seeds[: per_rank * world].tolist(), strict=True))


def test_sampler_is_deterministic_and_changes_with_epoch_seed_round() -> None:
    base = rank_streams(2, 8, seed=0, round_=1, epoch=2)
    assert base == rank_streams(2, 8, seed=0, round_=1, epoch=2)
    assert base != rank_streams(2, 8, seed=0, round_=1, epoch=3)
    assert base != rank_streams(2, 8, seed=1, round_=1, epoch=2)
    assert base != rank_streams(2, 8, seed=0, round_=2, epoch=2)


def test_sampler_start_resumes_the_same_sequence() -> None:
    s = UniformClusterSampler(TARGETS, 8, 2, 1, seed=4, round_=2)
    s.set_epoch(3)
    full = list(s)
    s.set_epoch(3, start=48)
    assert len(s) == len(full) - 48
    assert list(s) == full[48:]
    with pytest.raises(ValueError):
        s.set_epoch(3, start=len(full) + 1)


def test_sampler_epoch_images_fixes_the_epoch_size_and_stays_uniform() -> None:
    world, batch, size = 2, 8, 2000  # more samples than images: every cluster drawn with replacement
    streams = []
    for rank in range(world):
        s = UniformClusterSampler(TARGETS, batch, world, rank, seed=2, epoch_images=size)
        s.set_epoch(0)
        streams.append(list(s))
    assert all(len(st) == samples_per_rank(size, world, batch) == 1000 for st in streams)
    counts = np.bincount([int(TARGETS[row]) for st in streams for row, _ in st], minlength=11)[list(SIZES)]
    assert chisquare(counts).pvalue > 0.01, counts
    small = UniformClusterSampler(TARGETS, batch, world, 0, seed=2, epoch_images=100)
    assert len(small) == samples_per_rank(100, world, batch) == 48


# ---- loss ---------------------------------------------------------------------------------------------------------
def manual_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return -(logits.log_softmax(dim=1)[torch.arange(len(target)), target]).mean()


class TrainerHeads:
    """The heads as the trainer builds and calls them: ``TrainNet`` (here around an identity body: its output is
    ReLU(features) and the super-class logits) and ``SubHeads`` fed that output and the super-classes."""

    def __init__(self, in_dim: int, n_super: int, k: int, seed: int = 0):
        self.net = TrainNet(torch.nn.Identity(), super_head(in_dim, n_super, seed))
        self.sub = SubHeads(in_dim, n_super, k, None, seed) if k > 1 else None

    def __call__(self, feats: torch.Tensor, super_class: torch.Tensor):
        h, super_logits = self.net(feats)
        return super_logits, self.sub(h, super_class) if self.sub is not None else None


def test_loss_is_super_plus_own_sub_cross_entropy() -> None:
    g = torch.Generator().manual_seed(0)
    heads = TrainerHeads(6, n_super=8, k=5)
    feats = torch.randn(32, 6, generator=g)
    super_class = torch.randint(0, 8, (32,), generator=g)
    sub_class = torch.randint(0, 5, (32,), generator=g)
    super_logits, sub_logits = heads(feats, super_class)
    loss, metrics = hierarchical_loss(super_logits, sub_logits, super_class, sub_class)
    h = feats.relu()
    own_sub = torch.stack([heads.sub.weight[c] @ h[i] + heads.sub.bias[c] for i, c in enumerate(super_class)])
    expected = manual_ce(heads.net.super_head(h), super_class) + manual_ce(own_sub, sub_class)
    assert torch.allclose(loss, expected, atol=1e-6)
    loss.backward()
    assert heads.net.super_head.weight.grad.abs().sum() > 0 and heads.sub.weight.grad.abs().sum() > 0
    right_super = super_logits.argmax(1) == super_class
    right_sub = sub_logits.argmax(1) == sub_class
    assert metrics["acc_super"].item() == pytest.approx(right_super.float().mean().item())
    assert metrics["acc_sub"].item() == pytest.approx(right_sub.float().mean().item())
    assert metrics["acc_joint"].item() == pytest.approx((right_super & right_sub).float().mean().item())


def test_loss_metrics_on_known_predictions() -> None:
    super_logits = torch.tensor([[5.0, 0.0], [5.0, 0.0], [0.0, 5.0], [0.0, 5.0]])
    sub_logits = torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 5.0], [5.0, 0.0, 0.0]])
    super_class, sub_class = torch.tensor([0, 1, 1, 1]), torch.tensor([0, 1, 2, 2])
    _, m = hierarchical_loss(super_logits, sub_logits, super_class, sub_class)
    assert (m["acc_super"].item(), m["acc_sub"].item(), m["acc_joint"].item()) == (0.75, 0.75, 0.5)


def test_loss_with_a_missing_level() -> None:
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(16, 4, generator=g)
    # RotNet: k = 1, only the (rotation x super-cluster) head
    rot_heads = TrainerHeads(4, n_super=4, k=1)
    rot = torch.randint(0, 4, (16,), generator=g)
    super_logits, sub_logits = rot_heads(feats, rot)
    assert sub_logits is None
    loss, m = hierarchical_loss(super_logits, sub_logits, rot, torch.zeros(16, dtype=torch.long))
    assert torch.allclose(loss, manual_ce(super_logits, rot), atol=1e-6)
    assert m["acc_sub"].item() == 1.0 and m["acc_joint"].item() == m["acc_super"].item()
    # DeepCluster: one super-class, only the k-way head
    dc_heads = TrainerHeads(4, n_super=1, k=7)
    target = torch.randint(0, 7, (16,), generator=g)
    zeros = torch.zeros(16, dtype=torch.long)
    super_logits, sub_logits = dc_heads(feats, zeros)
    assert super_logits is None
    loss, m = hierarchical_loss(super_logits, sub_logits, zeros, target)
    assert torch.allclose(loss, manual_ce(sub_logits, target), atol=1e-6)
    assert m["acc_super"].item() == 1.0
    with pytest.raises(TrainError):
        hierarchical_loss(None, None, zeros, zeros)


# ---- real torchrun runs ---------------------------------------------------------------------------------------------
N_IMAGES = TRAIN_IMAGES  # 200 // (2 ranks x 8) = 12 iterations per epoch, 24 steps in all


def tiny_config(folder: Path, **train: object) -> PipelineConfig:
    """2 super-clusters (no rotation: 2 super-classes) and 2 ranks: two communication groups of one rank, each
    holding its own sub-head, the body batch-normalised over both. Random heads: the assignments below are made up,
    with no cluster stage to compute the clusters' means (test_training_targets covers head_init: centroids)."""
    return build_config({
        "seed": 7,
        "data": {"source": str(folder), "image_size": 16, "shard_size": 64},
        "model": {"arch": "smallnet", "feature_dim": 16},
        "cluster": {"super_clusters": 2, "k": 3},
        "train": {"epochs": 2, "batch_size": 8, "nproc": 2, "checkpoint_every": 2, "rotations": False,
                  "head_init": "random", **train},
        "runtime": {"device": "cpu"},
    }, method="deepercluster")


def make_run(root: Path, folder: Path, **train: object) -> tuple[RunStore, PipelineConfig]:
    """A run ready to train round 0: manifest, round-0 model and synthetic, very unequal assignments."""
    cfg = tiny_config(folder, **train)
    store = RunStore(root)
    init_run(store, cfg)
    run_stage(store, cfg, "shard")
    ensure_round_model(store, cfg, 0)
    rng = np.random.default_rng(0)
    n, k = N_IMAGES, cfg.cluster.k
    sup = (rng.random(n) < 0.8).astype(np.int64)
    sub = np.where(rng.random(n) < 0.7, 0, rng.integers(1, k, n))
    store.write_parquet(assignments_rel(0), pd.DataFrame({
        "image_id": np.arange(n), "super": sup, "sub": sub, "target": sup * k + sub,
        "distance": rng.random(n).astype(np.float32),
    }))
    for stage in ("extract", "cluster"):  # the synthetic assignments stand in for these stages' outputs
        store.mark_stage_done(stage, 0)
    return store, cfg


@pytest.fixture(scope="module")
def trained(image_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[RunStore, PipelineConfig, dict]:
    """One uninterrupted 2-rank run: the reference the resumed run must match bitwise."""
    store, cfg = make_run(tmp_path_factory.mktemp("run-a"), image_folder)
    info = train_round(store, cfg, 0, on_line=lambda line: None)
    return store, cfg, info


def test_train_stage_runs_two_ranks(trained: tuple[RunStore, PipelineConfig, dict]) -> None:
    store, cfg, info = trained
    assert info["steps"] == 24 and info["world_size"] == 2 and info["groups"] == 2 and info["resumed_from_step"] is None
    assert np.isfinite(info["final_loss"]) and info["images_per_s"] > 0
    before = store.load_torch(model_rel(0))["body"]
    after = store.load_torch(model_rel(1))
    assert after["arch"] == "smallnet" and after["round"] == 1
    assert before.keys() == after["body"].keys()
    assert any(not torch.equal(before[name], after["body"][name]) for name in before)
    final = store.load_torch(final_rel(0))
    assert all(torch.equal(final["body"][name], after["body"][name]) for name in before)
    assert final["heads"]["super_head.weight"].shape == (2, 16)  # 2 super-clusters, no rotation
    assert final["heads"]["sub.weight"].shape == (2, 3, 16)  # assembled from the two groups' files
    HierarchicalHeads(16, n_super=2, k=3).load_state_dict(final["heads"])  # final.pt's documented heads format
    assert store.listdir("rounds/0/train/heads") == ["step-000024"]  # older sub-head files are pruned
    assert store.listdir("rounds/0/train/heads/step-000024") == ["group-000.pt", "group-001.pt"]
    rows = read_log(store, 0)
    assert [row["step"] for row in rows] == list(range(1, 25))
    assert {"epoch", "iter", "loss", "acc_super", "acc_sub", "images_per_s"} <= rows[0].keys()
    units = store.done_units("train", 0)
    assert units == [f"iter-{s:06d}" for s in range(2, 25, 2)]
    ckpt = store.load_torch(checkpoint_rel(0))
    assert (ckpt["epoch"], ckpt["iteration"], ckpt["step"]) == (2, 0, 24) and len(ckpt["rng"]) == 2
    # done: the stage's step has nothing left to do
    assert get_stage("train").step("train").todo(store, cfg, 0) == []


def wait_gone(pid: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return
        if state in ("Z", "X"):
            return
        time.sleep(0.05)
    raise AssertionError(f"worker {pid} still runs after its torchrun was killed")


def test_kill_and_resume_is_bitwise_identical(trained: tuple[RunStore, PipelineConfig, dict], image_folder: Path,
                                              tmp_path: Path) -> None:
    ref_store, _, _ = trained
    store, cfg = make_run(tmp_path / "run-b", image_folder)
    proc = subprocess.Popen(train_command(store.uri, 0, cfg.train.nproc), env=train_env(cfg),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not store.is_done("train", 0, "iter-000004"):
            assert proc.poll() is None, "torchrun ended before its 2nd checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 60 s"
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert not store.stage_done("train", 0), "the kill landed after the end: make the run longer"
    worker_pid = store.done_record("train", 0, "iter-000004")["pid"]
    wait_gone(worker_pid)  # workers die with their torchrun (no orphan keeps training)
    killed_at = store.load_torch(checkpoint_rel(0))["step"]
    assert 4 <= killed_at < 24, "an orphan rank went on training after its torchrun was killed"
    early = store.done_record("train", 0, "iter-000002")

    info = train_round(store, cfg, 0, on_line=lambda line: None)

    assert info["resumed_from_step"] == killed_at and info["steps"] == 24
    assert store.done_record("train", 0, "iter-000002") == early  # resumed, not restarted
    assert [row["step"] for row in read_log(store, 0)] == list(range(1, 25))
    ref, got = ref_store.load_torch(final_rel(0)), store.load_torch(final_rel(0))
    for part in ("body", "heads"):
        assert ref[part].keys() == got[part].keys()
        for name in ref[part]:
            assert torch.equal(ref[part][name], got[part][name]), f"{part}.{name} differs after resume"
    assert read_log(store, 0)[-1]["loss"] == read_log(ref_store, 0)[-1]["loss"]


def test_missing_inputs_worker_error_and_force(trained: tuple[RunStore, PipelineConfig, dict], tmp_path: Path,
                                              image_folder: Path) -> None:
    ref_store, _, _ = trained
    store, cfg = make_run(tmp_path / "run-c", image_folder)
    assignments = store.read_bytes(assignments_rel(0))
    store.remove(assignments_rel(0))
    with pytest.raises(StoreError, match="assignments.parquet is missing: run the cluster stage"):
        train_round(store, cfg, 0)
    store.write_bytes(assignments_rel(0), assignments)
    # a checkpoint of another lineage of the stage: the ranks refuse it, the launcher reports their one-line reason
    store.save_torch(checkpoint_rel(0), {"fingerprint": "0123456789abcdef", "world_size": 2})
    with pytest.raises(TrainError, match="written for another lineage") as err:
        train_round(store, cfg, 0, on_line=lambda line: None)
    assert "torchrun exit" in str(err.value) and not store.stage_done("train", 0)
    # force: forget it and train from scratch, the same weights as the reference run
    get_stage("train").discard(store, cfg, 0)
    info = train_round(store, cfg, 0, on_line=lambda line: None)
    assert info["resumed_from_step"] is None and info["steps"] == 24
    ref, got = ref_store.load_torch(model_rel(1))["body"], store.load_torch(model_rel(1))["body"]
    assert all(torch.equal(ref[name], got[name]) for name in ref)

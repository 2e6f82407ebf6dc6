"""DeeperCluster's distribution: communication groups (4 real torchrun ranks, 2 super-classes), the group sampler,
sub-heads held by groups, several nodes meeting at a rendezvous, and the per-iteration progress line."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.stats import chisquare
from test_training import make_run
from torchvision import transforms as T

from deepercluster.data.datasets import PseudoLabelled
from deepercluster.data.transforms import MEAN, STD, TrainingView, normalize_batch, rotate
from deepercluster.features import model_rel
from deepercluster.models import SubHeads, load_body, super_head
from deepercluster.run import init_run
from deepercluster.training import TrainError, check_train_inputs, train_round
from deepercluster.training.checkpoint import final_rel, read_log
from deepercluster.training.groups import plan_groups
from deepercluster.training.launch import node_command
from deepercluster.training.progress import PREFIX, describe_progress, format_progress, parse_progress
from deepercluster.training.sampler import GroupClusterSampler, samples_per_rank
from deepercluster.training.trainer import TrainNet

PROBE = Path(__file__).with_name("training_group_probe.py")


# ---- layout, sampler, heads, dataset, progress line (no process group) ---------------------------------------------
def test_plan_groups() -> None:
    plan = plan_groups(world=4, n_super=2)
    assert plan.grouped and plan.n_groups == 2 and plan.group_size == 2
    assert [plan.group_of(r) for r in range(4)] == [0, 0, 1, 1]
    assert plan.ranks(1) == [2, 3] and plan.owned(1) == [1]
    every = plan_groups(world=2, n_super=8)  # fewer ranks than super-classes: every rank holds every head
    assert not every.grouped and every.n_groups == 1 and every.owned(0) == list(range(8))
    assert not plan_groups(world=4, n_super=2, enabled=False).grouped
    assert not plan_groups(world=4, n_super=1).grouped  # DeepCluster: one super-class, nothing to split
    with pytest.raises(TrainError, match="cannot be split into 4 equal communication groups"):
        plan_groups(world=6, n_super=4)


def test_group_sampler_draws_its_super_cluster_uniformly_over_sub_clusters() -> None:
    rng = np.random.default_rng(0)
    n = 1000
    super_ids = (rng.random(n) < 0.7).astype(int)
    sub_ids = np.where(rng.random(n) < 0.8, 0, rng.integers(1, 5, n))  # very unequal sub-clusters
    sub_ids[(super_ids == 1) & (sub_ids == 3)] = 4  # sub-cluster 3 of super-cluster 1 is empty
    world, batch, group_size = 4, 8, 2
    streams = {}
    for group in (0, 1):
        rows = np.flatnonzero(super_ids == group)
        for group_rank in range(group_size):
            s = GroupClusterSampler(rows, sub_ids[rows], n, batch, world, group, group_size, group_rank, seed=3)
            s.set_epoch(0)
            streams[group, group_rank] = list(s)
    per_rank = samples_per_rank(n, world, batch)
    assert all(len(v) == per_rank for v in streams.values())  # every rank runs the same number of iterations
    for group in (0, 1):
        picked = [row for g_rank in range(group_size) for row, _ in streams[group, g_rank]]
        assert set(super_ids[picked]) == {group}
        seeds = [{seed for _, seed in streams[group, g]} for g in range(group_size)]
        assert not seeds[0] & seeds[1]  # the group's ranks share no sample
        counts = np.bincount(sub_ids[picked], minlength=5)
        nonempty = counts[np.unique(sub_ids[super_ids == group])]
        assert (group == 1) == (counts[3] == 0)  # the empty sub-cluster is never drawn
        assert chisquare(nonempty).pvalue > 0.01, counts
    again = GroupClusterSampler(np.flatnonzero(super_ids == 1), sub_ids[super_ids == 1], n, batch, world, 1, 2, 0,
                                seed=3)
    again.set_epoch(0)
    assert list(again) == streams[1, 0]


def test_sub_heads_are_the_same_whoever_holds_them() -> None:
    every = SubHeads(6, n_super=4, k=3, seed=11)
    one = SubHeads(6, n_super=4, k=3, owned=[2], seed=11)
    assert torch.equal(one.weight[0], every.weight[2])
    h = torch.randn(10, 6)
    classes = torch.tensor([0, 1, 2, 3, 2, 2, 0, 3, 1, 1])
    manual = torch.stack([every.weight[c] @ h[i] + every.bias[c] for i, c in enumerate(classes)])
    assert torch.allclose(every(h, classes), manual, atol=1e-6)
    assert torch.allclose(one(h[classes == 2], classes[classes == 2]), manual[classes == 2], atol=1e-6)
    with pytest.raises(ValueError, match="other than 2"):
        one(h, classes)


def test_a_group_trains_one_rotation(image_folder: Path) -> None:
    uris = [str(image_folder / "0000.png")]
    view = TrainingView(16, (0.5, 1.0), hflip=True)
    free = PseudoLabelled(uris, [1 * 3 + 2], 3, view, n_rotations=4)  # super 1, sub 2 of k = 3
    fixed = PseudoLabelled(uris, [1 * 3 + 2], 3, view, n_rotations=4, rotation=3)
    seed = 4 * 1000  # seed % 4 == 0: no rotation when it is free
    x0, super0, _ = free[0, seed]
    x3, super3, sub3 = fixed[0, seed]
    assert x0.dtype == torch.uint8 and x0.shape == (16, 16, 3)
    assert torch.equal(x3.permute(2, 0, 1), rotate(x0.permute(2, 0, 1), 3)) and (super0, super3, sub3) == (4, 7, 2)
    assert torch.equal(fixed[0, seed][0], x3)  # the seed alone fixes the crop and the flip
    # a batch is normalised at once, as ToTensor + Normalize would one image at a time
    one = T.Normalize(MEAN, STD)(T.ToTensor()(Image.fromarray(x0.numpy())))
    assert torch.allclose(normalize_batch(torch.stack([x0, x3]))[0], one, atol=1e-5)


def test_progress_line_round_trip() -> None:
    row = {"epoch": 1, "iter": 4, "step": 17, "loss": 2.345678, "acc_super": 0.5, "acc_sub": 0.25,
           "images_per_s": 812.4}
    line = format_progress(3, row, iters_per_epoch=12, total_steps=24)
    got = parse_progress(line)
    assert got == {"round": 3, "step": 17, "steps": 24, "epoch": 1, "iter": 5, "iters": 12, "loss": 2.345678,
                   "acc_super": 0.5, "acc_sub": 0.25, "images_per_s": 812.4}  # the log row itself, not a rounding
    assert describe_progress(got) == ("train r3 step 17/24 epoch 1 iter 5/12 loss 2.3457 acc_super 0.500 "
                                      "acc_sub 0.250 812 img/s")
    assert parse_progress("W0101 some warning from torch") is None
    assert parse_progress(PREFIX + "{not json") is None


def test_inputs_that_cannot_train_in_groups(image_folder: Path, tmp_path: Path) -> None:
    store, cfg = make_run(tmp_path / "run", image_folder, nproc=3)
    with pytest.raises(TrainError, match="3 ranks cannot be split into 2 equal communication groups"):
        check_train_inputs(store, cfg, 0)
    store, cfg = make_run(tmp_path / "run-2", image_folder, nnodes=2, nproc=1)
    check_train_inputs(store, cfg, 0)  # the train stage launches every node: no rendezvous to configure
    with pytest.raises(TrainError, match="set runtime.rdzv_endpoint"):  # by hand, a node must be told where
        node_command(store, cfg, 0)
    store, cfg = make_run(tmp_path / "run-3", image_folder)
    a = store.read_parquet("rounds/0/clusters/assignments.parquet")
    a["super"] = 1
    store.write_parquet("rounds/0/clusters/assignments.parquet", a)
    with pytest.raises(TrainError, match="super-cluster 0 has no image"):
        check_train_inputs(store, cfg, 0)


# ---- 4 real torchrun ranks in 2 groups ------------------------------------------------------------------------------
PROBE_STEPS = 3


@pytest.fixture(scope="module")
def probed(image_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    store, cfg = make_run(tmp_path_factory.mktemp("run-groups"), image_folder, nproc=4)
    out = tmp_path_factory.mktemp("probe")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc-per-node=4",
           str(PROBE), store.uri, str(out), str(PROBE_STEPS)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(out / f"rank-{r}.pt", weights_only=False) for r in range(4)]
    return [{**ranks[r], "store": store, "cfg": cfg} for r in range(4)]


def test_body_is_identical_on_every_rank_and_heads_within_a_group(probed: list[dict]) -> None:
    assert [p["group"] for p in probed] == [0, 0, 1, 1] and [p["owned"] for p in probed] == [[0], [0], [1], [1]]
    body0 = probed[0]["net"]
    assert any("running_mean" in name for name in body0)  # batch-norm statistics are compared too
    initial = probed[0]["records"][0]["net"]
    assert any(not torch.equal(body0[name], initial[name]) for name in body0)  # it did train
    for p in probed[1:]:
        for name, value in p["net"].items():
            assert torch.equal(value, body0[name]), f"rank {p['rank']}: {name} differs from rank 0"
    for a, b in ((0, 1), (2, 3)):
        for name in probed[a]["sub"]:
            assert torch.equal(probed[a]["sub"][name], probed[b]["sub"][name]), f"ranks {a}, {b}: sub.{name}"
    assert not torch.equal(probed[0]["sub"]["weight"], probed[2]["sub"]["weight"])


def test_each_group_trains_on_its_super_class_and_its_head_gets_only_its_gradients(probed: list[dict]) -> None:
    cfg, store = probed[0]["cfg"], probed[0]["store"]
    for p in probed:
        for rec in p["records"]:
            assert set(rec["super"].tolist()) == {p["group"]}, f"rank {p['rank']} saw another super-class"
    for step in range(PROBE_STEPS):
        # the gradient the group's sub-head should get: the global batch through the body (batch norm over every
        # rank's samples, as SyncBatchNorm), then the cross-entropy of the group's own samples only
        recs = [p["records"][step] for p in probed]
        body = load_body(cfg.model, store.load_torch(model_rel(0))["body"])
        body.load_state_dict({k[len("body."):]: v for k, v in recs[0]["net"].items() if k.startswith("body.")})
        body.train()
        h = torch.relu(body(normalize_batch(torch.cat([rec["x"] for rec in recs]))))
        batch = len(recs[0]["x"])
        for ranks in ([0, 1], [2, 3]):
            rows = torch.cat([torch.arange(r * batch, (r + 1) * batch) for r in ranks])
            w = recs[ranks[0]]["sub"]["weight"].clone().requires_grad_(True)
            b = recs[ranks[0]]["sub"]["bias"].clone().requires_grad_(True)
            target = torch.cat([recs[r]["sub_class"] for r in ranks])
            loss = F.cross_entropy(F.linear(h[rows].detach(), w[0], b[0]), target)
            gw, gb = torch.autograd.grad(loss, [w, b])
            for r in ranks:
                got = recs[r]["sub_grad"]
                assert torch.allclose(got["weight"], gw, rtol=1e-4, atol=1e-7), f"step {step} rank {r}: weight grad"
                assert torch.allclose(got["bias"], gb, rtol=1e-4, atol=1e-7), f"step {step} rank {r}: bias grad"
            # what the rank would hold without the group all-reduce (its own samples only) is not that
            own = rows[:batch]
            alone = torch.autograd.grad(F.cross_entropy(F.linear(h[own].detach(), w[0], b[0]),
                                                        recs[ranks[0]]["sub_class"]), [w])[0]
            assert not torch.allclose(alone, gw, rtol=1e-4, atol=1e-7)


def test_body_gradient_is_that_of_the_global_batch(probed: list[dict]) -> None:
    """Every rank's body (and super head) gradient is the gradient of the mean of the ranks' losses over the global
    batch, batch norm included: what DDP plus a batch norm synchronised across ranks (forward and backward) give."""
    cfg, store = probed[0]["cfg"], probed[0]["store"]
    recs = [p["records"][0] for p in probed]
    body = load_body(cfg.model, store.load_torch(model_rel(0))["body"])
    net = TrainNet(body, super_head(body.feature_dim, 2))
    net.load_state_dict(recs[0]["net"])
    net.train()
    h, super_logits = net(normalize_batch(torch.cat([rec["x"] for rec in recs])))
    batch, losses = len(recs[0]["x"]), []
    for r, rec in enumerate(recs):
        rows = slice(r * batch, (r + 1) * batch)
        w, b = rec["sub"]["weight"][0], rec["sub"]["bias"][0]
        losses.append(F.cross_entropy(super_logits[rows], rec["super"])
                      + F.cross_entropy(F.linear(h[rows], w, b), rec["sub_class"]))
    names = [name for name, _ in net.named_parameters()]
    grads = torch.autograd.grad(torch.stack(losses).mean(), list(net.parameters()))
    for p in probed:
        got = p["records"][0]["net_grad"]
        for name, expected in zip(names, grads, strict=True):
            assert torch.allclose(got[name], expected, rtol=1e-3, atol=1e-6), f"rank {p['rank']}: {name}"


# ---- several nodes ------------------------------------------------------------------------------------------------
def _free_port() -> int:
    """A free port below Linux's ephemeral range (32768+), so that no other process's outgoing connection or
    port-0 bind can take it before the rendezvous binds it."""
    rng = np.random.default_rng()
    for port in rng.integers(20000, 32000, size=200).tolist():
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32000")


@pytest.mark.slow
def test_two_nodes_meet_at_the_rendezvous(image_folder: Path, tmp_path: Path) -> None:
    """Two torchrun agents of one rank each (as on two machines), every rank holding every head (rotations:
    8 super-classes > 2 ranks); the second agent joins through ``python -m deepercluster.training.launch``."""
    store, cfg = make_run(tmp_path / "run", image_folder, nnodes=2, nproc=1, rotations=True, epochs=1)
    cfg = cfg.model_copy(update={"runtime": cfg.runtime.model_copy(
        update={"rdzv_endpoint": f"127.0.0.1:{_free_port()}"})})
    init_run(store, cfg)  # the runtime section (not hashed) now names the rendezvous
    other_log = tmp_path / "other-node.log"
    with other_log.open("w") as log:
        other = subprocess.Popen([sys.executable, "-m", "deepercluster.training.launch", "--run-uri", store.uri,
                                  "--round", "0"], stdout=log, stderr=subprocess.STDOUT)
    lines: list[str] = []
    try:
        info = train_round(store, cfg, 0, on_line=lines.append)
        other.wait(timeout=120)
    finally:
        if other.poll() is None:
            other.kill()
            other.wait()
        print(other_log.read_text()[-3000:])
    assert other.returncode == 0
    assert info["world_size"] == 2 and info["groups"] == 1 and info["steps"] == 12
    final = store.load_torch(final_rel(0))
    assert final["heads"]["super_head.weight"].shape == (8, 16) and final["heads"]["sub.weight"].shape == (8, 3, 16)
    progress = [p for p in map(parse_progress, lines) if p is not None]
    assert [p["step"] for p in progress] == list(range(1, 13)) and progress[-1]["steps"] == 12
    assert [row["loss"] for row in read_log(store, 0)] == [p["loss"] for p in progress]

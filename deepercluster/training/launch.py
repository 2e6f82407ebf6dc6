"""Launching the train stage: checks its inputs, then runs torchrun over ``deepercluster.training.worker`` as a
real subprocess and turns a failure into a :class:`TrainError` carrying the end of its output.

One node: ``torchrun --standalone``. Several nodes (``train.nnodes > 1``): every node runs the same torchrun agent
against a c10d rendezvous. The train stage launches them itself, one Dask unit per node
(:mod:`deepercluster.training.nodes`: the first agent hosts the rendezvous and publishes where); by hand,
:func:`train_round` runs this node's agent against ``runtime.rdzv_endpoint`` and
``python -m deepercluster.training.launch --run-uri URI --round R`` joins from each other node (the run store must
be reachable from every node, as it already is for reading images).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, TextIO

import torch

from deepercluster.config import PipelineConfig
from deepercluster.device import resolve_device
from deepercluster.errors import DeeperClusterError
from deepercluster.run import load_run_config
from deepercluster.store import RunStore
from deepercluster.training.checkpoint import STAGE, TRAINED, training_done
from deepercluster.training.errors import ERROR_PREFIX, TrainError
from deepercluster.training.groups import check_group_data, head_groups, world_size
from deepercluster.training.inputs import check_inputs, load_pseudo_labels
from deepercluster.training.sampler import samples_per_rank

__all__ = ["TrainError", "check_train_inputs", "cpu_threads_per_rank", "dies_with_parent", "node_command",
           "run_train_node", "train_command", "train_env", "train_round", "trained_record"]
TAIL_LINES = 30
STOP_TIMEOUT_S = 30
POLL_S = 1.0
# Linux: the torchrun agent gets SIGTERM when the thread that started it dies (a killed flow process or Dask worker),
# so no orphaned training keeps writing the run's checkpoints; torchrun then stops its ranks. Set before exec: a
# parent that died in between is caught by comparing the parent's pid.
_DIE_WITH_PARENT = ("import ctypes, os, signal, sys\n"
                    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\n"
                    "sys.exit(1) if os.getppid() != int(sys.argv[1]) else os.execv(sys.argv[2], sys.argv[2:])")


def train_command(run_uri: str, r: int, nproc: int, nnodes: int = 1, rdzv_endpoint: str | None = None,
                  rdzv_id: str = "deepercluster", max_restarts: int = 0, is_host: bool | None = None) -> list[str]:
    """The torchrun command line that trains round ``r`` of the run at ``run_uri`` on this node: standalone on one
    node, else one of ``nnodes`` agents meeting at the c10d rendezvous ``rdzv_endpoint`` (host:port).

    ``max_restarts``: how often the agent restarts its workers and meets the others again after a failure (a lost
    peer agent is one: the survivors wait in the rendezvous for its relaunch, then every rank resumes from the
    checkpoint). ``is_host``: whether this agent hosts the rendezvous store (None: torch guesses from the host name,
    and of two agents on one machine the first to bind hosts it, so the agent that must outlive the others should
    say true and the others false)."""
    if nnodes == 1:
        where = ["--standalone", "--nnodes=1"]
    elif not rdzv_endpoint:
        raise TrainError(f"train.nnodes is {nnodes}: set runtime.rdzv_endpoint (host:port of the rendezvous, on the "
                         "first node) so that the nodes can meet, or let the train stage launch every node")
    else:
        where = [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}",
                 f"--rdzv-id={rdzv_id}", f"--max-restarts={max_restarts}"]
        if is_host is not None:
            where.append(f"--rdzv-conf=is_host={str(is_host).lower()}")
    return [sys.executable, "-m", "torch.distributed.run", *where, f"--nproc-per-node={nproc}",
            "-m", "deepercluster.training.worker", "--run-uri", run_uri, "--round", str(r)]


def node_command(store: RunStore, cfg: PipelineConfig, r: int) -> list[str]:
    """:func:`train_command` for the run's config (the rendezvous id names the run's config and the round)."""
    t = cfg.train
    return train_command(store.uri, r, t.nproc, t.nnodes, cfg.runtime.rdzv_endpoint, f"deepercluster-{cfg.hash}-r{r}")


def cpu_threads_per_rank(nproc: int) -> int:
    """CPU threads each of ``nproc`` ranks may use without oversubscribing this machine's cores (at least 1)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // nproc)


def train_env(cfg: PipelineConfig, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for :func:`train_command`: on CPU, OpenMP threads = cores // nproc (1 on a 2-core machine
    with 2 ranks); the worker sets torch's intra-op threads to the same number."""
    env = dict(os.environ if base is None else base)
    if resolve_device(cfg.runtime.device).type == "cpu":
        env["OMP_NUM_THREADS"] = str(cpu_threads_per_rank(cfg.train.nproc))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def check_train_inputs(store: RunStore, cfg: PipelineConfig, r: int) -> int:
    """Raise a one-line error when round ``r`` cannot be trained; return the number of images."""
    run_cfg = load_run_config(store)
    if run_cfg.hashed_dict() != cfg.hashed_dict():
        raise TrainError(f"train round {r}: the config given is not the run's config.yaml, which the ranks train "
                         "with: save it into the run first")
    check_inputs(store, r)
    labels = load_pseudo_labels(store, cfg, r)
    n, world = cfg.train.epoch_images or len(labels), world_size(cfg)
    if samples_per_rank(n, world, cfg.train.batch_size) == 0:
        raise TrainError(f"train round {r}: {n} images make no whole global batch of {world} ranks x "
                         f"{cfg.train.batch_size}: lower train.batch_size or train.nproc")
    check_group_data(cfg, head_groups(cfg, world), labels)
    if resolve_device(cfg.runtime.device).type == "cuda" and cfg.train.nproc > torch.cuda.device_count():
        raise TrainError(f"train.nproc is {cfg.train.nproc} but only {torch.cuda.device_count()} GPUs are visible: "
                         "lower train.nproc")
    if cfg.cluster.super_clusters == 1 and cfg.cluster.k == 1 and not cfg.train.rotations:
        raise TrainError("nothing to learn: one super-class and one sub-cluster (raise cluster.k or train.rotations)")
    return n


class _Output:
    """The end of the workers' stderr, and every line a rank wrote to report an error (those come first)."""

    def __init__(self) -> None:
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self.errors: list[str] = []

    def add(self, line: str) -> None:
        self.tail.append(line)
        if ERROR_PREFIX in line and len(self.errors) < TAIL_LINES:
            self.errors.append(line)

    def detail(self) -> str:
        return "\n".join(self.errors or self.tail)


def _pump(stream: TextIO, sink: Callable[[str], None], keep: Callable[[str], None] | None) -> None:
    """Drain ``stream`` to its end whatever ``sink`` does: a reader that stops would block the workers' prints."""
    broken = False
    for raw in stream:
        line = raw.rstrip("\n")
        if keep is not None:
            keep(line)
        if broken:
            continue
        try:
            sink(line)
        except Exception as err:  # the sink is the caller's (a logger, a progress bar): training goes on
            broken = True
            print(f"train output handler failed ({err!r}); its lines are dropped from now on", file=sys.stderr)


def train_round(store: RunStore, cfg: PipelineConfig, r: int, on_line: Callable[[str], None] | None = None,
                should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Train round ``r`` on this node, resuming from its checkpoint when there is one (the train stage's unit).

    Output lines of the workers go to ``on_line`` (default: this process's stdout/stderr); rank 0 prints one
    progress record per iteration (:func:`~deepercluster.training.progress.parse_progress` reads it). ``should_stop``
    is polled every second: when it says so, torchrun is stopped and a :class:`TrainError` raised (the checkpoints
    stay, a rerun resumes from them). Returns the stage record: steps, final_loss, images_per_s, ...
    """
    check_train_inputs(store, cfg, r)
    command = node_command(store, cfg, r)  # several nodes by hand: a config without a rendezvous fails here
    rc, detail = run_train_node(store, cfg, r, on_line, should_stop, command)
    if rc != 0 or not training_done(store, r):
        raise TrainError(f"train stage of round {r} failed (torchrun exit {rc}):\n{detail}")
    return trained_record(store, r)


def trained_record(store: RunStore, r: int) -> dict[str, Any]:
    """What the ended training recorded: the stage record (one node) or rank 0's ``trained`` record (several)."""
    return store.done_record(STAGE, r, "_stage") or store.done_record(STAGE, r, TRAINED) or {}


def dies_with_parent(command: list[str]) -> list[str]:
    """``command``, started so that it gets SIGTERM when the thread starting it dies (Linux; elsewhere unchanged)."""
    if not sys.platform.startswith("linux"):
        return command
    return [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *command]


def run_train_node(store: RunStore, cfg: PipelineConfig, r: int, on_line: Callable[[str], None] | None = None,
                   should_stop: Callable[[], bool] | None = None,
                   command: list[str] | None = None) -> tuple[int, str]:
    """Run this node's torchrun agent (``command``, default :func:`node_command`) to its end; return its exit code
    and the workers' error lines (or the end of their stderr). The agent dies with the thread that started it;
    ``should_stop`` (polled every second) stops it early with a :class:`TrainError`."""
    output = _Output()
    command = command or node_command(store, cfg, r)
    proc = subprocess.Popen(dies_with_parent(command), env=train_env(cfg),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            bufsize=1)
    out_sink = on_line or (lambda s: print(s, flush=True))
    err_sink = on_line or (lambda s: print(s, file=sys.stderr, flush=True))
    pumps = [threading.Thread(target=_pump, args=(proc.stdout, out_sink, None), daemon=True),
             threading.Thread(target=_pump, args=(proc.stderr, err_sink, output.add), daemon=True)]
    for t in pumps:
        t.start()
    try:
        rc = _wait(proc, should_stop)
        if rc is None:
            raise TrainError(f"train round {r}: stopped on request (its checkpoints stay: a rerun resumes)")
    except BaseException:  # interrupted or cancelled: let torchrun stop its ranks, then make sure
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
    for t in pumps:
        t.join()
    return rc, output.detail()


def _wait(proc: subprocess.Popen, should_stop: Callable[[], bool] | None) -> int | None:
    """The agent's exit code, or None as soon as ``should_stop()`` is true while it still runs."""
    while True:
        try:
            return proc.wait(timeout=None if should_stop is None else POLL_S)
        except subprocess.TimeoutExpired:
            if should_stop is not None and should_stop():
                return None


def main(argv: list[str] | None = None) -> int:
    """Join a multi-node training from one more node: ``python -m deepercluster.training.launch --run-uri URI
    --round R`` (the run's config names the rendezvous)."""
    from deepercluster.run import open_run

    parser = argparse.ArgumentParser(prog="python -m deepercluster.training.launch", description=main.__doc__)
    parser.add_argument("--run-uri", required=True, help="run store URI (reachable from every node)")
    parser.add_argument("--round", type=int, required=True, dest="round_")
    args = parser.parse_args(argv)
    try:
        store, cfg = open_run(args.run_uri)
        rc, detail = run_train_node(store, cfg, args.round_)
    except DeeperClusterError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if rc != 0:
        print(f"error: this node's torchrun exited {rc}:\n{detail}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())

"""The torchrun entry point: ``python -m deepercluster.training.worker --run URI --round R``.

(``--run-uri`` is the same option: torchrun's own parser rejects ``--run`` as an ambiguous abbreviation of its
``--run-path``, so the launcher passes ``--run-uri``.)

Each rank initialises the process group (gloo on CPU, NCCL on CUDA) and runs its
:class:`~deepercluster.training.trainer.Trainer` for ``cfg.train.epochs`` epochs; a rank that meets a
:class:`~deepercluster.errors.DeeperClusterError` reports it in one line on stderr and exits 1.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import socket
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from deepercluster.config import PipelineConfig
from deepercluster.device import resolve_device
from deepercluster.errors import DeeperClusterError
from deepercluster.run import load_run_config
from deepercluster.store import RunStore
from deepercluster.training.checkpoint import training_done
from deepercluster.training.errors import ERROR_PREFIX
from deepercluster.training.inputs import check_inputs
from deepercluster.training.launch import cpu_threads_per_rank
from deepercluster.training.trainer import Trainer

PR_SET_PDEATHSIG = 1


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
    if training_done(store, args.round_):
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

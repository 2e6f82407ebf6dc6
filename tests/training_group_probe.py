"""Run by tests/test_training_groups.py under a real torchrun: each rank builds the stage's own Trainer and runs a few
steps of round 0, recording what it saw and the gradient its sub-heads received, then saves it for the test.

    python -m torch.distributed.run --standalone --nproc-per-node=4 tests/training_group_probe.py RUN OUT STEPS
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from deepercluster.run import open_run
from deepercluster.training.trainer import Trainer


def main(run: str, out: str, steps: int) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    store, cfg = open_run(run)
    trainer = Trainer(store, cfg, 0, rank, world, torch.device("cpu"))
    trainer.quiet = True
    trainer.ddp.train()
    trainer.ddp_sub.train()
    trainer.sampler.set_epoch(0)
    records = []
    for _, (x, super_class, sub_class) in zip(range(steps), trainer.loader, strict=False):
        before = {"net": {k: v.clone() for k, v in trainer.net.state_dict().items()},
                  "sub": {k: v.clone() for k, v in trainer.sub.state_dict().items()}}
        trainer.forward_backward(x, super_class, sub_class)
        records.append({**before, "x": x, "super": super_class, "sub_class": sub_class,
                        "sub_grad": {k: p.grad.clone() for k, p in trainer.sub.named_parameters()},
                        "net_grad": {k: p.grad.clone() for k, p in trainer.net.named_parameters()}})
        trainer.update()
    torch.save({"rank": rank, "group": trainer.group, "records": records, "net": trainer.net.state_dict(),
                "sub": trainer.sub.state_dict(), "owned": trainer.owned}, Path(out) / f"rank-{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))

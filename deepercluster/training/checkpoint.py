"""Training checkpoints, the training log and the stage's final outputs, all written atomically by rank 0.

``rounds/<r>/train/checkpoint.pt`` holds everything needed to continue bitwise where it stopped: body, super-class
head, their optimizer, the position of the next iteration (epoch, iteration in epoch, global step) and every rank's
RNG states. The sub-heads live beside it, one file per communication group written by the group's first rank
(``heads/step-<step>/group-<g>.pt``: the group's sub-heads and their optimizer), so no rank ever holds every head;
they are written before ``checkpoint.pt``, which names the step and so commits them. Each checkpoint is followed
by the completion record ``iter-<step>``. The log (one JSON row per iteration) is rewritten whole just before each
checkpoint, so on resume its rows up to the checkpoint's step are kept.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

from deepercluster.config import PipelineConfig
from deepercluster.features import model_rel
from deepercluster.paths import checkpoint_rel, final_rel, group_heads_rel, heads_dir_rel, log_rel, train_rel  # noqa: F401  (re-exported)
from deepercluster.store import RunStore
from deepercluster.training.errors import TrainError

STAGE = "train"
TRAINED = "trained"  # with train.nnodes > 1: rank 0's record that training ended; the stage is recorded done later


def training_done(store: RunStore, r: int) -> bool:
    """Whether round ``r``'s training has ended: the stage record (one node), or rank 0's ``trained`` record (several
    nodes: the stage is recorded done once every node's unit has seen its agent end)."""
    return store.stage_done(STAGE, r) or store.is_done(STAGE, r, TRAINED)


def unit_name(step: int) -> str:
    return f"iter-{step:06d}"


@dataclass(frozen=True)
class Position:
    """Where training goes on: the next iteration is ``iteration`` (0-based) of ``epoch``; ``step`` are done."""

    epoch: int = 0
    iteration: int = 0
    step: int = 0


def rng_state() -> dict[str, Any]:
    """This process's torch RNG states: CPU, and the current CUDA device's when there is one."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def write_log(store: RunStore, r: int, rows: list[dict[str, Any]]) -> None:
    store.write_text(log_rel(r), "".join(json.dumps(row) + "\n" for row in rows))


def read_log(store: RunStore, r: int, upto_step: int | None = None) -> list[dict[str, Any]]:
    """Rows of the log (those with ``step <= upto_step`` when given); empty when there is no log."""
    if not store.exists(log_rel(r)):
        return []
    rows = [json.loads(line) for line in store.read_text(log_rel(r)).splitlines() if line.strip()]
    return [row for row in rows if upto_step is None or row["step"] <= upto_step]


def save_torch(store: RunStore, rel: str, obj: Any) -> None:
    """``store.save_torch``: streamed into a temporary file, renamed when whole (readers see all or nothing)."""
    store.save_torch(rel, obj)


def save_group_heads(store: RunStore, r: int, step: int, group: int, state: dict[str, Any]) -> None:
    """A group's sub-heads at ``step`` (``classes``: its super-classes, ``sub``: state dict, ``optimizer``)."""
    save_torch(store, group_heads_rel(r, step, group), state)


def load_group_heads(store: RunStore, r: int, step: int, group: int) -> dict[str, Any]:
    rel = group_heads_rel(r, step, group)
    if not store.exists(rel):
        raise TrainError(f"{store.url(rel)} is missing although the checkpoint names step {step}: rerun the train "
                         "stage with force")
    return store.load_torch(rel)


def save_checkpoint(store: RunStore, r: int, cfg: PipelineConfig, state: dict[str, Any], pos: Position,
                    rng_states: list[dict[str, Any]], log_rows: list[dict[str, Any]]) -> None:
    """Log, then checkpoint (the commit point), then the ``iter-<step>`` record, then older sub-head files go.
    ``state``: body, super-head and optimizer state dicts; the groups' sub-heads of ``pos.step`` are written."""
    write_log(store, r, log_rows)
    save_torch(store, checkpoint_rel(r), {
        **state,
        "epoch": pos.epoch, "iteration": pos.iteration, "step": pos.step,
        "rng": rng_states, "world_size": len(rng_states),
        "fingerprint": store.fingerprint(STAGE, r),
    })
    store.mark_done(STAGE, r, unit_name(pos.step), {"epoch": pos.epoch, "iteration": pos.iteration})
    for name in store.listdir(heads_dir_rel(r)):  # older ones only: the next checkpoint's may be under way
        if name.startswith("step-") and name[len("step-"):].isdigit() and int(name[len("step-"):]) < pos.step:
            store.remove(f"{heads_dir_rel(r)}/{name}")


def assemble_heads(super_head: dict[str, torch.Tensor] | None,
                   groups: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Every head as one :class:`~deepercluster.models.HierarchicalHeads` state dict (``final.pt``), from the
    super-class head and the groups' sub-head files."""
    out = {f"super_head.{k}": v for k, v in (super_head or {}).items()}
    if groups:
        classes = [c for g in groups for c in g["classes"]]
        order = sorted(range(len(classes)), key=classes.__getitem__)
        for name in ("weight", "bias"):
            out[f"sub.{name}"] = torch.cat([g["sub"][name] for g in groups])[order].clone()
    return out


def load_checkpoint(store: RunStore, r: int, cfg: PipelineConfig, world_size: int) -> dict[str, Any] | None:
    """The round's checkpoint, or None; refuses one from another config or another number of ranks."""
    if not store.exists(checkpoint_rel(r)):
        return None
    ckpt = store.load_torch(checkpoint_rel(r))
    current = store.fingerprint(STAGE, r)
    if ckpt.get("fingerprint") != current:
        raise TrainError(f"{store.url(checkpoint_rel(r))} was written for another lineage of this stage "
                         f"(fingerprint {ckpt.get('fingerprint')}, now {current}): rerun the train stage with force")
    if ckpt["world_size"] != world_size:
        raise TrainError(f"{store.url(checkpoint_rel(r))} was written by {ckpt['world_size']} ranks, not "
                         f"{world_size}: resume with train.nproc={ckpt['world_size']} or rerun with force")
    return ckpt


def position(ckpt: dict[str, Any] | None) -> Position:
    return Position() if ckpt is None else Position(ckpt["epoch"], ckpt["iteration"], ckpt["step"])


def save_final(store: RunStore, r: int, cfg: PipelineConfig, body: dict[str, torch.Tensor],
               heads: dict[str, torch.Tensor], log_rows: list[dict[str, Any]], info: dict[str, Any]) -> None:
    """``final.pt`` (body + heads), the next round's ``model.pt``, the log, then the stage's completion record (with
    several nodes: the ``trained`` record, see :func:`training_done`)."""
    store.save_torch(final_rel(r), {"body": body, "heads": heads, "arch": cfg.model.arch, "round": r,
                                    "fingerprint": store.fingerprint(STAGE, r)})
    store.save_torch(model_rel(r + 1), {"body": body, "arch": cfg.model.arch, "round": r + 1})
    write_log(store, r, log_rows)
    if cfg.train.nnodes > 1:  # the other agents may still be running: the stage's finalize step records it done
        store.mark_done(STAGE, r, TRAINED, info)
    else:
        store.mark_stage_done(STAGE, r, info)


def reset_train(store: RunStore, r: int) -> None:
    """Forget round ``r``'s training: records, checkpoint, log, final weights and the next round's model."""
    store.reset_stage(STAGE, r)
    store.remove(train_rel(r))
    store.remove(model_rel(r + 1))

"""The hierarchical loss: cross-entropy on the super-class head plus cross-entropy on the sample's own sub-head."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from deepercluster.training.errors import TrainError

METRICS = ("acc_super", "acc_sub", "acc_joint")


def hierarchical_loss(super_logits: torch.Tensor | None, sub_logits: torch.Tensor | None, super_class: torch.Tensor,
                      sub_class: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``CE(super) + CE(sub)`` (a level without a head adds nothing and counts as always right), computed in float32.

    Returns the loss and detached 0-d metric tensors: ``acc_super``, ``acc_sub``, ``acc_joint`` (both right).
    """
    if super_logits is None and sub_logits is None:
        raise TrainError("nothing to learn: one super-class and one sub-cluster (raise cluster.k or train.rotations)")
    loss = super_class.new_zeros((), dtype=torch.float32)
    right_super = right_sub = torch.ones_like(super_class, dtype=torch.bool)
    if super_logits is not None:
        loss = loss + F.cross_entropy(super_logits.float(), super_class)
        right_super = super_logits.detach().argmax(dim=1) == super_class
    if sub_logits is not None:
        loss = loss + F.cross_entropy(sub_logits.float(), sub_class)
        right_sub = sub_logits.detach().argmax(dim=1) == sub_class
    metrics = {
        "acc_super": right_super.float().mean(),
        "acc_sub": right_sub.float().mean(),
        "acc_joint": (right_super & right_sub).float().mean(),
    }
    return loss, metrics

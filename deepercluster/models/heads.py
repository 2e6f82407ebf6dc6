"""Heads for (rotation x super-cluster) super-classes and, per super-class, a head over its sub-clusters.

Built new after every re-clustering (the papers re-initialise them: old cluster ids mean nothing now)."""

from __future__ import annotations

import torch
from torch import nn


class HierarchicalHeads(nn.Module):
    """``n_super`` super-classes, each with its own ``k``-way sub-class head; a trivial level (size 1) has no head."""

    def __init__(self, in_dim: int, n_super: int, k: int):
        super().__init__()
        self.n_super, self.k = n_super, k
        self.super_head = nn.Linear(in_dim, n_super) if n_super > 1 else None
        self.sub_weight = nn.Parameter(torch.empty(n_super, k, in_dim)) if k > 1 else None
        self.sub_bias = nn.Parameter(torch.zeros(n_super, k)) if k > 1 else None
        if self.sub_weight is not None:
            nn.init.normal_(self.sub_weight, std=0.01)  # DeepCluster's top-layer init

    def forward(
        self, feats: torch.Tensor, super_class: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Super-class logits and, for each sample, the logits of its own super-class's sub-head."""
        h = torch.relu(feats)
        super_logits = self.super_head(h) if self.super_head is not None else None
        sub_logits = None
        if self.sub_weight is not None:
            w = self.sub_weight[super_class]  # (B, k, D)
            sub_logits = torch.bmm(w, h.unsqueeze(-1)).squeeze(-1) + self.sub_bias[super_class]
        return super_logits, sub_logits

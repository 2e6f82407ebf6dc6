"""Heads for (rotation x super-cluster) super-classes and, per super-class, a head over its sub-clusters.

Built new after every re-clustering (the papers re-initialise them: old cluster ids mean nothing now). Every head
is drawn from its own seed, so a rank that holds only some sub-heads (DeeperCluster's communication groups) holds
exactly the heads a rank holding all of them would: the layout of the ranks never changes the weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

INIT_STD = 0.01  # DeepCluster's top-layer init: N(0, 0.01), zero bias
SUPER_HEAD_KEY = -1  # the super-class head's seed key (sub-heads use their super-class id)


def head_generator(seed: int | None, key: int) -> torch.Generator | None:
    """The generator a head is drawn from: a function of ``(seed, key)`` only; None (global RNG) without seed."""
    if seed is None:
        return None
    state = np.random.SeedSequence([seed % 2**64, key % 2**64]).generate_state(2, np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


def super_head(in_dim: int, n_super: int, seed: int | None = None) -> nn.Linear | None:
    """The ``n_super``-way super-class head, or None when there is a single super-class (nothing to predict)."""
    if n_super <= 1:
        return None
    head = nn.Linear(in_dim, n_super)
    with torch.no_grad():
        head.weight.normal_(0.0, INIT_STD, generator=head_generator(seed, SUPER_HEAD_KEY))
        head.bias.zero_()
    return head


class SubHeads(nn.Module):
    """The ``k``-way sub-class heads of the super-classes ``owned`` (default: all ``n_super``).

    ``weight`` is ``(len(owned), k, in_dim)`` and ``bias`` ``(len(owned), k)``; row ``j`` is super-class
    ``owned[j]``. A sample whose super-class is not owned here is an error (it belongs to another group).
    """

    def __init__(self, in_dim: int, n_super: int, k: int, owned: Sequence[int] | None = None,
                 seed: int | None = None):
        super().__init__()
        self.owned = list(range(n_super)) if owned is None else sorted(int(c) for c in owned)
        if not self.owned or self.owned[0] < 0 or self.owned[-1] >= n_super:
            raise ValueError(f"owned super-classes {self.owned} are not a non-empty subset of 0..{n_super - 1}")
        self.n_super, self.k = n_super, k
        self.weight = nn.Parameter(torch.empty(len(self.owned), k, in_dim))
        self.bias = nn.Parameter(torch.zeros(len(self.owned), k))
        with torch.no_grad():
            for j, c in enumerate(self.owned):
                self.weight[j].normal_(0.0, INIT_STD, generator=head_generator(seed, c))
        local = torch.full((n_super,), -1, dtype=torch.long)
        local[self.owned] = torch.arange(len(self.owned))
        self.register_buffer("local_index", local, persistent=False)

    def forward(self, h: torch.Tensor, super_class: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, k)`` of each sample's own super-class head."""
        if len(self.owned) == 1:  # a communication group's rank: one head, one matmul
            if bool((super_class != self.owned[0]).any()):
                raise ValueError(f"samples of super-classes other than {self.owned[0]} reached its sub-head")
            return F.linear(h, self.weight[0], self.bias[0])
        local = self.local_index[super_class]
        if bool((local < 0).any()):
            raise ValueError(f"samples of super-classes outside {self.owned} reached these sub-heads")
        # one matmul per head present in the batch (no per-sample copy of a k x D weight)
        order = torch.argsort(local, stable=True)
        counts = torch.bincount(local, minlength=len(self.owned)).tolist()
        parts, start = [], 0
        for j, n in enumerate(counts):
            if n:
                parts.append(F.linear(h[order[start:start + n]], self.weight[j], self.bias[j]))
            start += n
        return torch.cat(parts).index_select(0, torch.argsort(order))


@torch.no_grad()
def init_heads_from_means(sub: SubHeads, means: dict[int, torch.Tensor], temperature: float,
                          n_rotations: int = 1) -> int:
    """Start each sub-head as the nearest-mean classifier of its clusters (DeepCluster-v2's idea: no round begins
    from a random classifier). ``means[s]`` is ``(k_s, D)``: the mean of the features the heads read (ReLU of the
    clustering view's features) over each sub-cluster of super-cluster ``s`` (NaN rows: empty clusters, left random).
    Row ``j`` of super-class ``c`` (super-cluster ``c // n_rotations``: every rotation starts from the upright
    means) gets ``w = mu_j / t``, ``b = -|mu_j|^2 / (2 t)``, so that the logits rank the clusters by distance to
    their mean: ``logit_j - logit_i = (|h - mu_i|^2 - |h - mu_j|^2) / (2 t)``; ``t`` (the mean squared distance of an
    image to its cluster's mean) makes the typical gap about one. Returns the number of rows set."""
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    rows = 0
    for j, c in enumerate(sub.owned):
        mu = means.get(c // n_rotations)
        if mu is None:
            continue
        mu = mu.to(sub.weight.dtype)[: sub.k]
        filled = torch.isfinite(mu).all(1).nonzero().flatten()
        sub.weight[j, filled] = mu[filled] / temperature
        sub.bias[j, filled] = -mu[filled].pow(2).sum(1) / (2 * temperature)
        rows += len(filled)
    return rows


class HierarchicalHeads(nn.Module):
    """The super-class head and the sub-heads of ``owned`` super-classes, as one module; a trivial level (one
    super-class, or ``k = 1``) has no head. State dict: ``super_head.weight/bias``, ``sub.weight/bias``."""

    def __init__(self, in_dim: int, n_super: int, k: int, owned: Sequence[int] | None = None,
                 seed: int | None = None):
        super().__init__()
        self.n_super, self.k = n_super, k
        self.super_head = super_head(in_dim, n_super, seed)
        self.sub = SubHeads(in_dim, n_super, k, owned, seed) if k > 1 else None

    def forward(
        self, feats: torch.Tensor, super_class: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Super-class logits and, for each sample, the logits of its own super-class's sub-head (of ReLU(feats))."""
        h = torch.relu(feats)
        super_logits = self.super_head(h) if self.super_head is not None else None
        sub_logits = self.sub(h, super_class) if self.sub is not None else None
        return super_logits, sub_logits

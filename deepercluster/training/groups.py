"""Which rank holds which heads: DeeperCluster's communication groups.

With ``S`` super-classes (rotations x super-clusters) and a world of ``W >= S`` ranks (``W`` a multiple of ``S``),
ranks are split into ``S`` groups of ``W / S`` contiguous ranks; group ``g`` owns super-class ``g``: it trains only
on images of super-cluster ``g // rotations`` turned by ``g % rotations`` quarter turns, holds only that
super-class's sub-head and all-reduces its gradients within the group, while the body and the super-class head are
all-reduced over every rank (and batch-normalised over the global batch). With fewer ranks than super-classes (or
``train.head_groups: false``) there is one group, the world, and every rank holds every head.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from deepercluster.config import PipelineConfig
from deepercluster.training.errors import TrainError
from deepercluster.training.inputs import PseudoLabels, n_rotations


@dataclass(frozen=True)
class HeadGroups:
    world: int
    n_super: int
    grouped: bool

    @property
    def n_groups(self) -> int:
        return self.n_super if self.grouped else 1

    @property
    def group_size(self) -> int:
        return self.world // self.n_groups

    def group_of(self, rank: int) -> int:
        return rank // self.group_size

    def ranks(self, group: int) -> list[int]:
        return list(range(group * self.group_size, (group + 1) * self.group_size))

    def owned(self, group: int) -> list[int]:
        """The super-classes whose sub-heads the ranks of ``group`` hold."""
        return [group] if self.grouped else list(range(self.n_super))


def plan_groups(world: int, n_super: int, enabled: bool = True) -> HeadGroups:
    """The layout for ``world`` ranks and ``n_super`` super-classes; raise a one-line error when it cannot work."""
    grouped = enabled and n_super > 1 and world >= n_super
    if grouped and world % n_super:
        raise TrainError(f"{world} ranks cannot be split into {n_super} equal communication groups (one per "
                         f"super-class): use a multiple of {n_super} ranks, fewer than {n_super}, or "
                         "train.head_groups: false")
    return HeadGroups(world, n_super, grouped)


def n_super_classes(cfg: PipelineConfig) -> int:
    return cfg.cluster.super_clusters * n_rotations(cfg)


def world_size(cfg: PipelineConfig) -> int:
    return cfg.train.nproc * cfg.train.nnodes


def head_groups(cfg: PipelineConfig, world: int) -> HeadGroups:
    return plan_groups(world, n_super_classes(cfg), cfg.train.head_groups)


def check_group_data(cfg: PipelineConfig, plan: HeadGroups, labels: PseudoLabels) -> None:
    """With groups, every super-cluster must hold images (its groups train on nothing else)."""
    if not plan.grouped:
        return
    sizes = np.bincount(labels.super_ids, minlength=cfg.cluster.super_clusters)
    empty = np.flatnonzero(sizes == 0)
    if len(empty):
        raise TrainError(f"super-cluster {int(empty[0])} has no image, so its communication groups have nothing to "
                         "train on: set train.head_groups: false (or use fewer ranks than super-classes)")

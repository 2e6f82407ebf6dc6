"""Uniform-over-clusters distributed sampling (DeepCluster's UnifLabelSampler, DeeperCluster's
DistUnifTargSampler).

Each epoch draws ``N // n_nonempty + 1`` rows from every non-empty cluster (with replacement only when the cluster
is smaller), shuffles them, keeps ``N`` rounded down to a multiple of ``world_size * batch_size``, and deals them to
the ranks with a stride. Every sample also gets a 63-bit seed (crop, flip, rotation) from the same generator, so the
whole epoch is a pure function of ``(seed, round, epoch)`` and a resumed rank can start at any position.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler

SEED_HIGH = 2**63


def derive_seed(*keys: int) -> int:
    """A 63-bit seed that depends only on ``keys`` (any Python ints, negative ones included)."""
    state = np.random.SeedSequence([k % 2**64 for k in keys]).generate_state(2, np.uint32)
    return (int(state[0]) << 31 | int(state[1]) >> 1) % SEED_HIGH


def epoch_generator(seed: int, round_: int, epoch: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed % 2**64, round_, epoch, *stream]))


def samples_per_rank(n_images: int, world_size: int, batch_size: int) -> int:
    """Samples each rank sees per epoch: the epoch is ``n_images`` rounded down to whole global batches."""
    return n_images // (world_size * batch_size) * batch_size


def uniform_epoch(targets: np.ndarray, seed: int, round_: int, epoch: int, size: int | None = None,
                  stream: tuple[int, ...] = ()) -> tuple[np.ndarray, np.ndarray]:
    """The whole epoch (every rank's samples, interleaved): rows and their sample seeds, ``size`` each (default
    ``len(targets)``). ``stream`` names an independent draw (a communication group's)."""
    targets = np.asarray(targets)
    n = len(targets) if size is None else size
    if len(targets) == 0:
        raise ValueError("no image to draw from")
    rng = epoch_generator(seed, round_, epoch, *stream)
    order = np.argsort(targets, kind="stable")
    clusters, starts = np.unique(targets[order], return_index=True)
    members = np.split(order, starts[1:])
    per_cluster = n // len(clusters) + 1
    drawn = [rng.choice(rows, per_cluster, replace=len(rows) < per_cluster) for rows in members]
    rows = rng.permutation(np.concatenate(drawn))[:n]
    seeds = rng.integers(0, SEED_HIGH, size=len(rows), dtype=np.int64)
    return rows.astype(np.int64), seeds


class UniformClusterSampler(Sampler[tuple[int, int]]):
    """Yields this rank's ``(row, sample_seed)`` pairs for the current epoch, from position ``start`` on.

    ``targets[row]`` is the cluster of image ``row``; call :meth:`set_epoch` before each epoch.
    """

    def __init__(self, targets: np.ndarray, batch_size: int, world_size: int = 1, rank: int = 0, seed: int = 0,
                 round_: int = 0, epoch_images: int | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.targets = np.asarray(targets)
        self.world_size, self.rank = world_size, rank
        self.seed, self.round = seed, round_
        self.epoch_images = epoch_images
        self.per_rank = samples_per_rank(epoch_images or len(self.targets), world_size, batch_size)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch, and skip its first ``start`` samples of this rank (resume mid-epoch)."""
        if not 0 <= start <= self.per_rank:
            raise ValueError(f"start {start} is not in [0, {self.per_rank}]")
        self.epoch, self.start = epoch, start

    def rank_samples(self) -> tuple[np.ndarray, np.ndarray]:
        """This rank's rows and seeds for the whole current epoch (``start`` ignored)."""
        rows, seeds = uniform_epoch(self.targets, self.seed, self.round, self.epoch, size=self.epoch_images)
        keep = self.per_rank * self.world_size
        return rows[:keep][self.rank :: self.world_size], seeds[:keep][self.rank :: self.world_size]

    def __len__(self) -> int:
        return self.per_rank - self.start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        rows, seeds = self.rank_samples()
        yield from zip(rows[self.start :].tolist(), seeds[self.start :].tolist(), strict=True)


class GroupClusterSampler(UniformClusterSampler):
    """DeeperCluster's sampling inside a communication group: the group's ranks draw only ``rows`` (the images of
    the group's super-cluster), uniformly over their sub-clusters ``sub_targets``, from a draw of their own
    (stream = group id), dealt to the ``group_size`` ranks of the group with a stride.

    Every rank of every group sees ``samples_per_rank(n_images, world_size, batch_size)`` samples per epoch
    (``n_images``: the epoch size, all the round's images or ``train.epoch_images``), so all
    ranks run the same number of iterations (the body is all-reduced over every rank at each one).
    """

    def __init__(self, rows: np.ndarray, sub_targets: np.ndarray, n_images: int, batch_size: int, world_size: int,
                 group: int, group_size: int, group_rank: int, seed: int = 0, round_: int = 0):
        if not 0 <= group_rank < group_size:
            raise ValueError(f"rank {group_rank} in group is not in [0, {group_size})")
        if len(rows) == 0 or len(rows) != len(sub_targets):
            raise ValueError(f"group {group} has {len(rows)} images (and {len(sub_targets)} targets)")
        self.rows, self.targets = np.asarray(rows, dtype=np.int64), np.asarray(sub_targets)
        self.group, self.group_size, self.group_rank = group, group_size, group_rank
        self.world_size, self.rank = world_size, group_rank
        self.seed, self.round = seed, round_
        self.per_rank = samples_per_rank(n_images, world_size, batch_size)
        self.epoch, self.start = 0, 0

    def rank_samples(self) -> tuple[np.ndarray, np.ndarray]:
        picks, seeds = uniform_epoch(self.targets, self.seed, self.round, self.epoch,
                                     size=self.per_rank * self.group_size, stream=(self.group,))
        mine = slice(self.group_rank, None, self.group_size)
        return self.rows[picks][mine], seeds[mine]

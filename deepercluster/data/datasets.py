"""Torch datasets over the manifest: images are read by URI, so any fsspec store works."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.utils.data import Dataset

from deepercluster.data.images import decode, read_bytes
from deepercluster.data.transforms import TrainingView


class ImageList(Dataset):
    """Images in a fixed order, each through a deterministic transform (feature extraction)."""

    def __init__(self, uris: Sequence[str], transform: Callable):
        self.uris = list(uris)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.uris)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(decode(read_bytes(self.uris[i])))


def read_image_bytes(uri: str) -> bytes:
    """The file's bytes: a plain read for a local path (fsspec's open costs more than the read of a small image),
    fsspec for any other URL."""
    if "://" not in uri:
        with open(uri, "rb") as f:
            return f.read()
    return read_bytes(uri)


class PseudoLabelled(Dataset):
    """Training samples. Index ``(row, seed)`` pairs come from the sampler; the seed fixes the crop, the flip and
    the rotation, so a sample depends on nothing but its position in the epoch.

    Returns ``(pixels, super_class, sub_class)`` where ``pixels`` are the view's uint8 ``(H, W, 3)`` (see
    :func:`~deepercluster.data.transforms.normalize_batch`) and ``super_class = super_cluster * n_rot + rotation``. With
    ``rotation`` given, every sample is turned by it (a DeeperCluster communication group trains one rotation).

    ``uris[row]`` and ``targets[row]`` (``super_cluster * k + sub_cluster``) are looked up per sample and never
    copied: DataLoader workers receive the dataset pickled, so a whole run's images should come as an
    :class:`~deepercluster.data.locations.ImageLocations` and a
    :class:`~deepercluster.local_cache.MappedArray`, which pickle as paths.
    """

    def __init__(self, uris: Sequence[str], targets: Sequence[int], k: int, view: TrainingView,
                 n_rotations: int, rotation: int | None = None):
        if rotation is not None and not 0 <= rotation < n_rotations:
            raise ValueError(f"rotation {rotation} is not in [0, {n_rotations})")
        if len(uris) != len(targets):
            raise ValueError(f"{len(uris)} images but {len(targets)} targets")
        self.uris = uris
        self.targets = targets
        self.k = k
        self.view = view
        self.n_rotations = n_rotations
        self.rotation = rotation

    def __len__(self) -> int:
        return len(self.uris)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int, int]:
        row, seed = item
        rotation = seed % self.n_rotations if self.rotation is None else self.rotation
        x = self.view(decode(read_image_bytes(self.uris[row])), seed=seed, rotation=rotation)
        super_id, sub_id = divmod(int(self.targets[row]), self.k)
        return x, super_id * self.n_rotations + rotation, sub_id

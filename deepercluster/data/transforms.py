"""The two views of an image: the clustering view (deterministic) and the training view (random crops, flips,
rotations), the latter driven by a per-sample seed so that a resumed training draws exactly the same crops."""

from __future__ import annotations

import torch
from PIL import Image
from torchvision import transforms as T

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
N_ROTATIONS = 4


def clustering_view(image_size: int, crop_ratio: float = 1.0) -> T.Compose:
    """Resize the short side to ``size / crop_ratio`` then centre crop ``size`` (the papers' 256 -> 224 view)."""
    return T.Compose(
        [
            T.Resize(round(image_size / crop_ratio)),
            T.CenterCrop(image_size),
            T.ToTensor(),
            T.Normalize(MEAN, STD),
        ]
    )


class TrainingView:
    """RandomResizedCrop + optional horizontal flip, then an optional rotation, all drawn from ``seed``."""

    def __init__(self, image_size: int, scale: tuple[float, float], hflip: bool):
        steps: list = [T.RandomResizedCrop(image_size, scale=scale)]
        if hflip:
            steps.append(T.RandomHorizontalFlip())
        steps += [T.ToTensor(), T.Normalize(MEAN, STD)]
        self.transform = T.Compose(steps)

    def __call__(self, img: Image.Image, seed: int, rotation: int = 0) -> torch.Tensor:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            x = self.transform(img)
        return rotate(x, rotation) if rotation else x


def rotate(x: torch.Tensor, rotation: int) -> torch.Tensor:
    """Rotate a CHW (or NCHW) tensor by ``rotation`` x 90 degrees counter-clockwise."""
    return torch.rot90(x, rotation, dims=(-2, -1))

"""The two views of an image: the clustering view (deterministic) and the training view (random crops, flips,
rotations), the latter driven by a per-sample seed so that a resumed training draws exactly the same crops."""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
N_ROTATIONS = 4
PAPER_CROP_RATIO = 224 / 256  # DeepCluster / DeeperCluster clustering view: Resize(256) + CenterCrop(224)


def clustering_view(image_size: int, crop_ratio: float = PAPER_CROP_RATIO) -> T.Compose:
    """Resize the short side to ``size / crop_ratio`` then centre crop ``size`` (the papers' 256 -> 224 view)."""
    return T.Compose(
        [
            T.Resize(round(image_size / crop_ratio)),
            T.CenterCrop(image_size),
            T.ToTensor(),
            T.Normalize(MEAN, STD),
        ]
    )


_PIL_ROTATIONS = {1: Image.Transpose.ROTATE_90, 2: Image.Transpose.ROTATE_180, 3: Image.Transpose.ROTATE_270}


class TrainingView:
    """RandomResizedCrop (scale ``scale``, aspect ratio 3/4..4/3, bilinear) + optional horizontal flip, then an
    optional rotation: the papers' training view. The crop and the flip are drawn from a generator of their own,
    seeded by ``seed``, so a sample depends on nothing else (and the global torch RNG is never touched, which also
    spares the cost of reseeding it for every image).

    Returns ``uint8`` pixels, ``(size, size, 3)``: whole batches are turned into normalised floats at once by
    :func:`normalize_batch` (on the GPU when there is one: a quarter of the bytes to copy there)."""

    ratio = (3.0 / 4.0, 4.0 / 3.0)

    def __init__(self, image_size: int, scale: tuple[float, float], hflip: bool):
        self.size, self.scale, self.hflip = image_size, scale, hflip

    def crop_box(self, width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
        """``(top, left, h, w)``: torchvision's RandomResizedCrop draw (10 tries, then a centre crop)."""
        area = width * height
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(log_lo, log_hi))
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                return rng.randint(0, height - h), rng.randint(0, width - w), h, w
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            w, h = round(height * self.ratio[1]), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, img: Image.Image, seed: int, rotation: int = 0) -> torch.Tensor:
        rng = random.Random(seed)
        top, left, h, w = self.crop_box(img.width, img.height, rng)
        img = img.resize((self.size, self.size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
        if self.hflip and rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if rotation % N_ROTATIONS:  # quarter turns counter-clockwise, as rotate()
            img = img.transpose(_PIL_ROTATIONS[rotation % N_ROTATIONS])
        return torch.from_numpy(np.array(img, dtype=np.uint8))


def normalize_batch(pixels: torch.Tensor) -> torch.Tensor:
    """``(B, H, W, 3)`` uint8 pixels -> ``(B, 3, H, W)`` float32 normalised with the ImageNet mean and std (what
    ``ToTensor`` + ``Normalize`` give one image at a time), NCHW-contiguous."""
    scale = torch.tensor(STD, device=pixels.device).mul_(255.0)
    shift = torch.tensor(MEAN, device=pixels.device).mul_(255.0)
    x = pixels.permute(0, 3, 1, 2).float().contiguous()
    return x.sub_(shift.view(1, 3, 1, 1)).div_(scale.view(1, 3, 1, 1))


def rotate(x: torch.Tensor, rotation: int) -> torch.Tensor:
    """Rotate a CHW (or NCHW) tensor by ``rotation`` x 90 degrees counter-clockwise."""
    return torch.rot90(x, rotation, dims=(-2, -1))

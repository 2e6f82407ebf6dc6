"""The raw-pixel baseline: each image resized to the network's input size, scaled to [0, 1], flattened (one
channel when the image is grey)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from deepercluster.data.images import decode, read_bytes


def pixel_features(uris: Sequence[str], image_size: int) -> np.ndarray:
    rows = []
    for uri in uris:
        img = decode(read_bytes(uri))
        if img.size != (image_size, image_size):
            img = img.resize((image_size, image_size), Image.BILINEAR)
        rows.append(np.asarray(img, dtype=np.uint8))
    x = np.stack(rows)
    if (x[..., 0] == x[..., 1]).all() and (x[..., 0] == x[..., 2]).all():
        x = x[..., :1]
    return x.reshape(len(x), -1).astype(np.float32) / 255.0

"""Decoding ahead of the forward pass: batches of one shard's images, decoded in threads, yielded in order.

Threads rather than DataLoader worker processes: Dask worker processes are daemonic (they cannot fork children),
and PIL releases the GIL while it decodes and resizes, so threads overlap decoding with the forward pass. The
geometric part of the clustering view (resize + centre crop, on PIL images) runs in the threads; the pixel part
(ToTensor + Normalize) is done once per batch: with numpy in the thread for the CPU, on the device for CUDA.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from deepercluster.data.images import decode, read_bytes
from deepercluster.data.transforms import clustering_view
from deepercluster.errors import DataError
from deepercluster.prefetch import read_ahead


class HostView:
    """The clustering view split in two: PIL geometry per image, then normalisation per batch."""

    def __init__(self, image_size: int, crop_ratio: float = 1.0):
        view = clustering_view(image_size, crop_ratio)
        norm = [t for t in view.transforms if isinstance(t, T.Normalize)]
        self.geometry = T.Compose([t for t in view.transforms if not isinstance(t, T.ToTensor | T.Normalize)])
        self.mean = tuple(norm[0].mean) if norm else (0.0, 0.0, 0.0)
        self.std = tuple(norm[0].std) if norm else (1.0, 1.0, 1.0)
        self.size = image_size
        s = np.asarray(self.std, dtype=np.float32).reshape(1, -1, 1, 1)
        self._scale = 1.0 / (255.0 * s)
        self._shift = -np.asarray(self.mean, dtype=np.float32).reshape(1, -1, 1, 1) / s

    def pixels(self, uri: str) -> np.ndarray:
        """HWC uint8 of one image (RGB, upright, resized and centre-cropped)."""
        try:
            img = decode(read_bytes(uri))
        except Exception as err:  # the manifest said it was readable: say which file and what to do
            raise DataError(f"cannot read {uri} for extraction ({err.__class__.__name__}: {err}); restore it or "
                            "rerun the shard stage with --force") from None
        img = self.geometry(img)
        if not isinstance(img, Image.Image) or img.size != (self.size, self.size):
            raise DataError(f"the clustering view of {uri} is not {self.size}x{self.size}")
        return np.asarray(img, dtype=np.uint8)

    def normalise(self, nhwc: np.ndarray) -> torch.Tensor:
        """uint8 NHWC -> float32 NCHW contiguous, ``(x / 255 - mean) / std`` (single-threaded numpy)."""
        out = np.empty((nhwc.shape[0], 3, self.size, self.size), dtype=np.float32)
        np.multiply(nhwc.transpose(0, 3, 1, 2), self._scale, out=out)
        out += self._shift
        return torch.from_numpy(out)


class BatchLoader:
    """Yields ``(first_row, batch)`` for consecutive batches of ``uris``, keeping ``prefetch`` batches decoding in
    ``threads`` threads. ``on_device_normalise``: batches stay uint8 NHWC (pinned) for the device to normalise."""

    def __init__(self, uris: Sequence[str], view: HostView, batch_size: int, threads: int = 2, prefetch: int = 2,
                 on_device_normalise: bool = False):
        self.uris = list(uris)
        self.view = view
        self.batch_size = batch_size
        self.threads = threads
        self.prefetch = max(prefetch, threads)
        self.raw = on_device_normalise

    def __len__(self) -> int:
        return -(-len(self.uris) // self.batch_size)

    def _batch(self, lo: int) -> torch.Tensor:
        uris = self.uris[lo : lo + self.batch_size]
        nhwc = np.empty((len(uris), self.view.size, self.view.size, 3), dtype=np.uint8)
        for i, uri in enumerate(uris):
            nhwc[i] = self.view.pixels(uri)
        if self.raw:
            t = torch.from_numpy(nhwc)
            return t.pin_memory() if torch.cuda.is_available() else t
        return self.view.normalise(nhwc)

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor]]:
        starts = range(0, len(self.uris), self.batch_size)
        yield from read_ahead(self._batch, starts, depth=self.prefetch, threads=self.threads, name="decode")

"""Decoding ahead of the forward pass: batches of one shard's images, decoded in threads, yielded in order.

Threads rather than DataLoader worker processes: Dask worker processes are daemonic (they cannot fork children),
and PIL releases the GIL while it decodes and resizes, so threads overlap decoding with the forward pass. The
geometric part of the clustering view (resize + centre crop, on PIL images) runs in the threads; the pixel part
(ToTensor + Normalize) is done once per batch: with numpy in the thread for the CPU, on the device for CUDA.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from deepercluster.data.images import decode, read_bytes, read_many
from deepercluster.data.transforms import PAPER_CROP_RATIO, clustering_view
from deepercluster.errors import DataError
from deepercluster.prefetch import read_ahead


class HostView:
    """The clustering view split in two: PIL geometry per image, then normalisation per batch."""

    def __init__(self, image_size: int, crop_ratio: float = PAPER_CROP_RATIO):
        view = clustering_view(image_size, crop_ratio)
        norm = [t for t in view.transforms if isinstance(t, T.Normalize)]
        self.geometry = T.Compose([t for t in view.transforms if not isinstance(t, T.ToTensor | T.Normalize)])
        self.mean = tuple(norm[0].mean) if norm else (0.0, 0.0, 0.0)
        self.std = tuple(norm[0].std) if norm else (1.0, 1.0, 1.0)
        self.size = image_size
        s = np.asarray(self.std, dtype=np.float32).reshape(1, -1, 1, 1)
        self._scale = 1.0 / (255.0 * s)
        self._shift = -np.asarray(self.mean, dtype=np.float32).reshape(1, -1, 1, 1) / s

    def pixels(self, uri: str, data: bytes | None = None) -> np.ndarray:
        """HWC uint8 of one image (RGB, upright, resized and centre-cropped) from its bytes ``data`` (read from
        ``uri`` when not given)."""
        try:
            img = decode(read_bytes(uri) if data is None else data)
        except Exception as err:  # the manifest said it was readable: say which file and what to do
            raise DataError(f"cannot read {uri} for extraction ({err.__class__.__name__}: {err}); restore it or "
                            "rerun the shard stage with --force") from None
        img = self.geometry(img)
        if not isinstance(img, Image.Image) or img.size != (self.size, self.size):
            raise DataError(f"the clustering view of {uri} is not {self.size}x{self.size}")
        return np.asarray(img, dtype=np.uint8)

    def normalise_into(self, hwc: np.ndarray, out: np.ndarray) -> None:
        """One image: uint8 HWC -> ``out``, float32 CHW, ``(x / 255 - mean) / std``."""
        np.multiply(hwc.transpose(2, 0, 1), self._scale[0], out=out)
        out += self._shift[0]

    def normalise(self, nhwc: np.ndarray) -> torch.Tensor:
        """uint8 NHWC -> float32 NCHW contiguous, ``(x / 255 - mean) / std`` (single-threaded numpy)."""
        out = np.empty((nhwc.shape[0], 3, self.size, self.size), dtype=np.float32)
        np.multiply(nhwc.transpose(0, 3, 1, 2), self._scale, out=out)
        out += self._shift
        return torch.from_numpy(out)


class BatchLoader:
    """Yields ``(first_row, batch)`` for consecutive batches of ``uris``. ``on_device_normalise``: batches stay
    uint8 NHWC (pinned) for the device to normalise.

    Two schedules. ``overlap`` (for a GPU, whose forward pass leaves the CPU free): ``prefetch`` batches decode in
    ``threads`` threads while the device runs. Otherwise (the CPU is the device): the bytes of the next batches
    are read ahead in one I/O thread, and each batch is decoded by all ``threads`` at once between two forward
    passes, so decoding never competes with torch's own threads for the cores (on 2 cores, 2 decode threads
    running beside 2 torch threads slow the forward pass more than the decoding they overlap)."""

    def __init__(self, uris: Sequence[str], view: HostView, batch_size: int, threads: int = 2, prefetch: int = 2,
                 on_device_normalise: bool = False, overlap: bool | None = None):
        self.uris = list(uris)
        self.view = view
        self.batch_size = batch_size
        self.threads = threads
        self.prefetch = max(prefetch, threads)
        self.raw = on_device_normalise
        self.overlap = on_device_normalise if overlap is None else overlap

    def __len__(self) -> int:
        return -(-len(self.uris) // self.batch_size)

    def _read(self, lo: int) -> list[bytes]:
        uris = self.uris[lo : lo + self.batch_size]
        try:
            return read_many(uris)  # a packed shard's batch: one sequential read of its tar
        except Exception as err:
            raise DataError(f"cannot read the images {uris[0]} .. {uris[-1]} for extraction ({err.__class__.__name__}"
                            f": {err}); restore them or rerun the shard stage with --force") from None

    def _fill(self, lo: int, blobs: list[bytes], out: np.ndarray, rows: range) -> None:
        """Decode the images ``rows`` of the batch into ``out`` (uint8 NHWC, or float32 NCHW normalised)."""
        for i in rows:
            px = self.view.pixels(self.uris[lo + i], blobs[i])
            if out.dtype == np.uint8:
                out[i] = px
            else:
                self.view.normalise_into(px, out[i])

    def _empty(self, n: int) -> np.ndarray:
        s = self.view.size
        return np.empty((n, s, s, 3), np.uint8) if self.raw else np.empty((n, 3, s, s), np.float32)

    def _tensor(self, out: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(out)
        return t.pin_memory() if self.raw and torch.cuda.is_available() else t

    def _batch(self, lo: int) -> torch.Tensor:
        blobs = self._read(lo)
        out = self._empty(len(blobs))
        self._fill(lo, blobs, out, range(len(blobs)))
        return self._tensor(out)

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor]]:
        starts = range(0, len(self.uris), self.batch_size)
        if self.overlap:
            yield from read_ahead(self._batch, starts, depth=self.prefetch, threads=self.threads, name="decode")
            return
        with ThreadPoolExecutor(self.threads, thread_name_prefix="decode") as pool:
            for lo, blobs in read_ahead(self._read, starts, depth=self.prefetch, threads=1, name="read"):
                out = self._empty(len(blobs))
                step = -(-len(blobs) // self.threads)
                parts = [range(a, min(a + step, len(blobs))) for a in range(0, len(blobs), step)]
                for f in [pool.submit(self._fill, lo, blobs, out, rows) for rows in parts]:
                    f.result()
                yield lo, self._tensor(out)

"""Decoding ahead of the forward pass: batches of one shard's images, decoded in threads, yielded in order.

Threads rather than DataLoader worker processes: Dask worker processes are daemonic (they cannot fork children),
and PIL releases the GIL while it decodes, so threads overlap decoding with the forward pass. Per image, only the
decoding runs (in the threads, to uint8 pixels at the image's own size); the clustering view's geometry (resize +
centre crop: the same torchvision transforms, on uint8 tensors, antialiased as PIL resizes) runs once per run of
same-size images of a batch, and the pixel part (ToTensor + Normalize) once per batch, on the device for CUDA:
torch does both without the GIL and in its own threads, where per-image PIL calls would cost more Python than
decoding small images does.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torchvision import transforms as T

from deepercluster.data.images import decode, read_bytes, read_many
from deepercluster.data.transforms import PAPER_CROP_RATIO, clustering_view
from deepercluster.errors import DataError
from deepercluster.prefetch import read_ahead


class HostView:
    """The clustering view split in three: decoding per image, geometry per run of same-size images, then
    normalisation per batch."""

    def __init__(self, image_size: int, crop_ratio: float = PAPER_CROP_RATIO):
        view = clustering_view(image_size, crop_ratio)
        norm = [t for t in view.transforms if isinstance(t, T.Normalize)]
        self.geometry = T.Compose([t for t in view.transforms if not isinstance(t, T.ToTensor | T.Normalize)])
        self.mean = tuple(norm[0].mean) if norm else (0.0, 0.0, 0.0)
        self.std = tuple(norm[0].std) if norm else (1.0, 1.0, 1.0)
        self.size = image_size
        s = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)
        self._scale = 1.0 / (255.0 * s)
        self._shift = -torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1) / s

    def decoded(self, uri: str, data: bytes | None = None) -> np.ndarray:
        """HWC uint8 of one image (RGB, upright, at its own size) from its bytes ``data`` (read from ``uri`` when
        not given)."""
        try:
            return np.asarray(decode(read_bytes(uri) if data is None else data), dtype=np.uint8)
        except Exception as err:  # the manifest said it was readable: say which file and what to do
            raise DataError(f"cannot read {uri} for extraction ({err.__class__.__name__}: {err}); restore it or "
                            "rerun the shard stage with --force") from None

    def geometry_into(self, images: Sequence[np.ndarray], out: torch.Tensor, uris: Sequence[str]) -> None:
        """Resize + centre crop ``images`` (HWC uint8, any sizes) into ``out`` (N x size x size x 3 uint8), one
        batched call per run of consecutive same-size images."""
        i = 0
        while i < len(images):
            j = i + 1
            while j < len(images) and images[j].shape == images[i].shape:
                j += 1
            x = torch.from_numpy(np.stack(images[i:j])).permute(0, 3, 1, 2)  # NCHW view of NHWC: channels-last
            y = self.geometry(x)
            if y.shape[-2:] != (self.size, self.size):
                raise DataError(f"the clustering view of {uris[i]} is not {self.size}x{self.size}")
            out[i:j] = y.permute(0, 2, 3, 1)
            i = j

    def pixels(self, uri: str, data: bytes | None = None) -> np.ndarray:
        """HWC uint8 of one image's view (RGB, upright, resized and centre-cropped)."""
        out = torch.empty((1, self.size, self.size, 3), dtype=torch.uint8)
        self.geometry_into([self.decoded(uri, data)], out, [uri])
        return out[0].numpy()

    def normalise(self, nhwc: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC -> float32 NCHW contiguous, ``(x / 255 - mean) / std`` (what ToTensor + Normalize give)."""
        x = torch.addcmul(self._shift, nhwc.permute(0, 3, 1, 2).float(), self._scale)
        return x.contiguous()


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

    def _decode(self, lo: int, blobs: list[bytes], images: list[np.ndarray | None], rows: range) -> None:
        """Decode the images ``rows`` of the batch starting at row ``lo`` into ``images``."""
        for i in rows:
            images[i] = self.view.decoded(self.uris[lo + i], blobs[i])

    def _assemble(self, lo: int, images: list[np.ndarray]) -> torch.Tensor:
        """The batch from its decoded images: uint8 NHWC (pinned on a CUDA machine), or float32 NCHW normalised."""
        s = self.view.size
        out = torch.empty((len(images), s, s, 3), dtype=torch.uint8)
        self.view.geometry_into(images, out, self.uris[lo : lo + len(images)])
        if not self.raw:
            return self.view.normalise(out)
        return out.pin_memory() if torch.cuda.is_available() else out

    def _batch(self, lo: int) -> torch.Tensor:
        blobs = self._read(lo)
        images: list[np.ndarray | None] = [None] * len(blobs)
        self._decode(lo, blobs, images, range(len(blobs)))
        return self._assemble(lo, images)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor]]:
        starts = range(0, len(self.uris), self.batch_size)
        if self.overlap:
            yield from read_ahead(self._batch, starts, depth=self.prefetch, threads=self.threads, name="decode")
            return
        with ThreadPoolExecutor(self.threads, thread_name_prefix="decode") as pool:
            for lo, blobs in read_ahead(self._read, starts, depth=self.prefetch, threads=1, name="read"):
                images: list[np.ndarray | None] = [None] * len(blobs)
                step = -(-len(blobs) // self.threads)
                parts = [range(a, min(a + step, len(blobs))) for a in range(0, len(blobs), step)]
                for f in [pool.submit(self._decode, lo, blobs, images, rows) for rows in parts]:
                    f.result()
                yield lo, self._assemble(lo, images)  # type: ignore[arg-type]

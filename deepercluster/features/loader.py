"""Decoding ahead of the forward pass: batches of one shard's images, decoded in threads, yielded in order.

Threads rather than DataLoader worker processes: Dask worker processes are daemonic (they cannot fork children),
and PIL releases the GIL while it decodes and resizes, so threads overlap. Per image, the threads run the
clustering view's geometry in PIL (decode, resize, centre crop: the reference transforms' own algorithm, bit for
bit, and cheaper per image than torch's batched uint8 resize on small images) into one uint8 batch; the pixel
part (ToTensor + Normalize) runs once per batch, on the device for CUDA: torch does it without the GIL and in its
own threads, where per-image ToTensor calls would cost more Python than decoding small images does.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from deepercluster.data.images import decode, read_bytes, read_many
from deepercluster.data.transforms import MEAN, PAPER_CROP_RATIO, STD
from deepercluster.errors import DataError
from deepercluster.prefetch import read_ahead


class HostView:
    """The clustering view (``clustering_view``: Resize(size / crop_ratio) of the short side, bilinear, then
    CenterCrop(size)) split in two: geometry per image (PIL, in the decode threads), normalisation per batch."""

    def __init__(self, image_size: int, crop_ratio: float = PAPER_CROP_RATIO):
        self.size = image_size
        self.short = round(image_size / crop_ratio)
        self.mean, self.std = MEAN, STD
        s = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)
        self._scale = 1.0 / (255.0 * s)
        self._shift = -torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1) / s
        self._plans: dict[tuple[int, int], tuple[tuple[int, int], tuple[int, int, int, int]]] = {}

    def _plan(self, w: int, h: int) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
        """Resized size and crop box of a ``w`` x ``h`` image, as torchvision's Resize(int) + CenterCrop compute
        them."""
        plan = self._plans.get((w, h))
        if plan is None:
            short, long = (w, h) if w <= h else (h, w)
            new_long = int(self.short * long / short)
            rw, rh = (self.short, new_long) if w <= h else (new_long, self.short)
            if min(rw, rh) < self.size:
                raise DataError(f"image_size / crop_ratio ({self.short}) is below image_size ({self.size})")
            top, left = int(round((rh - self.size) / 2.0)), int(round((rw - self.size) / 2.0))
            plan = self._plans[(w, h)] = ((rw, rh), (left, top, left + self.size, top + self.size))
        return plan

    def pixels(self, uri: str, data: bytes | None = None) -> np.ndarray:
        """HWC uint8 of one image's view (RGB, upright, resized and centre-cropped) from its bytes ``data`` (read
        from ``uri`` when not given)."""
        try:
            img = decode(read_bytes(uri) if data is None else data)
        except Exception as err:  # the manifest said it was readable: say which file and what to do
            raise DataError(f"cannot read {uri} for extraction ({err.__class__.__name__}: {err}); restore it or "
                            "rerun the shard stage with --force") from None
        size, box = self._plan(*img.size)
        if img.size != size:
            img = img.resize(size, Image.BILINEAR)
        return np.asarray(img.crop(box))

    def normalise(self, nhwc: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC -> float32 NCHW contiguous, ``(x / 255 - mean) / std`` (what ToTensor + Normalize give)."""
        x = torch.addcmul(self._shift, nhwc.permute(0, 3, 1, 2).float(), self._scale)
        return x.contiguous()


def batch_spans(n: int, batch_size: int, ends: Sequence[int] = ()) -> list[tuple[int, int]]:
    """``(lo, hi)`` of consecutive batches of ``n`` rows; no batch crosses one of ``ends`` (a shard's end row in a
    stream of several shards), so a shard's batches, hence its features, are the same whichever shards share its
    stream: the forward pass's float rounding depends on the batch's composition, and a resumed run must give
    the features of an uninterrupted one."""
    spans = []
    lo = 0
    for end in sorted({min(int(e), n) for e in ends} | {n}):
        while lo < end:
            spans.append((lo, min(lo + batch_size, end)))
            lo = spans[-1][1]
    return spans


class BatchLoader:
    """Yields ``(first_row, batch)`` for consecutive batches of ``uris``; ``ends``: rows that end a segment (a
    shard), which no batch crosses. ``on_device_normalise``: batches stay uint8 NHWC (pinned) for the device to
    normalise.

    Two schedules. ``overlap`` (for a GPU, whose forward pass leaves the CPU free): ``prefetch`` batches decode in
    ``threads`` threads while the device runs. Otherwise (the CPU is the device): the bytes of the next batches
    are read ahead in one I/O thread, and each batch is decoded by all ``threads`` at once between two forward
    passes, so decoding never competes with torch's own threads for the cores (on 2 cores, 2 decode threads
    running beside 2 torch threads slow the forward pass more than the decoding they overlap)."""

    def __init__(self, uris: Sequence[str], view: HostView, batch_size: int, threads: int = 2, prefetch: int = 2,
                 on_device_normalise: bool = False, overlap: bool | None = None, ends: Sequence[int] = ()):
        self.uris = list(uris)
        self.view = view
        self.spans = batch_spans(len(self.uris), batch_size, ends)
        self.threads = threads
        self.prefetch = max(prefetch, threads)
        self.raw = on_device_normalise
        self.overlap = on_device_normalise if overlap is None else overlap

    def __len__(self) -> int:
        return len(self.spans)

    def _read(self, span: tuple[int, int]) -> list[bytes]:
        uris = self.uris[span[0] : span[1]]
        try:
            return read_many(uris)  # a packed shard's batch: one sequential read of its tar
        except Exception as err:
            raise DataError(f"cannot read the images {uris[0]} .. {uris[-1]} for extraction ({err.__class__.__name__}"
                            f": {err}); restore them or rerun the shard stage with --force") from None

    def _empty(self, n: int) -> torch.Tensor:
        return torch.empty((n, self.view.size, self.view.size, 3), dtype=torch.uint8)

    def _decode(self, lo: int, blobs: list[bytes], out: np.ndarray, rows: range) -> None:
        """The views of the images ``rows`` of the batch starting at row ``lo``, into ``out`` (NHWC uint8)."""
        for i in rows:
            out[i] = self.view.pixels(self.uris[lo + i], blobs[i])

    def _finish(self, out: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC (pinned on a CUDA machine) for the device to normalise, or float32 NCHW normalised here."""
        if not self.raw:
            return self.view.normalise(out)
        return out.pin_memory() if torch.cuda.is_available() else out

    def _batch(self, span: tuple[int, int]) -> torch.Tensor:
        blobs = self._read(span)
        out = self._empty(len(blobs))
        self._decode(span[0], blobs, out.numpy(), range(len(blobs)))
        return self._finish(out)

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor]]:
        if self.overlap:
            for (lo, _), batch in read_ahead(self._batch, self.spans, depth=self.prefetch, threads=self.threads,
                                             name="decode"):
                yield lo, batch
            return
        with ThreadPoolExecutor(self.threads, thread_name_prefix="decode") as pool:
            for (lo, _), blobs in read_ahead(self._read, self.spans, depth=self.prefetch, threads=1, name="read"):
                out = self._empty(len(blobs))
                step = -(-len(blobs) // self.threads)
                parts = [range(a, min(a + step, len(blobs))) for a in range(0, len(blobs), step)]
                for f in [pool.submit(self._decode, lo, blobs, out.numpy(), rows) for rows in parts]:
                    f.result()
                yield lo, self._finish(out)

"""Reading one image: bytes from any fsspec URL, decoded upright to RGB, or a reason to reject it.

Every input the shard stage lists ends in the manifest or in ``data/rejects.parquet`` with one of the reasons of
:data:`REJECT_REASONS` (a few carry a detail after a colon or a row number: :func:`reason_key` maps them back).
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import re
import stat
import warnings
from dataclasses import dataclass

import fsspec
import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

Image.MAX_IMAGE_PIXELS = None  # the pixel limit is ours (config.data.max_pixels), checked before decoding
ImageFile.LOAD_TRUNCATED_IMAGES = False

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
_TAR_MEMBER = re.compile(r"^tar://(?P<member>.*)@(?P<offset>\d+):(?P<size>\d+)::(?P<url>.+)$")
_TRANSPOSED = {5, 6, 7, 8}  # EXIF orientations that swap width and height
MAX_SIDE = 16384  # the defaults of data.max_side and data.max_aspect (what decode checks when not told otherwise)
MAX_ASPECT = 50.0
_GREY_BLOCK = 1 << 20  # pixels converted at once from 16-bit/float to 8-bit grey

# The vocabulary of ``data/rejects.parquet``'s ``reason`` (reason -> meaning). A ``<...>`` part is a detail filled in
# per row (an error's text or class, a row number); everything else is the exact string written.
REJECT_REASONS: dict[str, str] = {
    # listing: decided from the name and the file's type alone, the file is never opened
    "not an image suffix": "the name's suffix is not an image type (.jpg .jpeg .png .gif .bmp .tif .tiff .webp "
                           ".ppm .pgm, any case): listed, never opened",
    "hidden (data.skip_hidden)": "a name starting with '.' or '_' (a file, or a folder not entered) skipped because "
                                 "data.skip_hidden is on",
    "not a regular file": "a FIFO, socket or device (in a file list also a folder, in a webdataset tar a link "
                          "member): never opened, it could block",
    "dangling symlink": "a symbolic link whose target does not exist",
    "symlink loop": "a symbolic link to a folder that contains it (or a link cycle): not followed again",
    "unreadable folder: <error>": "a folder that cannot be listed (the OS error's text); its files are unknown",
    "undecodable name": "a file name that is not valid UTF-8 (the uri shows its bytes escaped)",
    "malformed list row <n>": "a csv/tsv list row with too few or too many fields, or a csv/tsv/parquet row with "
                              "no path (row n of the file, a csv header being row 1)",
    "malformed metadata line": "a YFCC100M metadata line of neither known layout (the uri ends with :<line>)",
    "no image in sample": "a webdataset sample without any image member",
    "unreadable tar: <error>": "a webdataset tar that cannot be read (from this sample on)",
    # reading the bytes
    "missing": "the file (or tar) does not exist (anymore)",
    "permission denied": "the file cannot be read with the run's permissions",
    "unreadable: <error>": "any other failure of the storage layer (network, bad URL): the exception's class",
    "empty file": "zero bytes",
    # the header (checked before any pixel is decoded)
    "not an image": "the bytes are in no image format PIL reads (text, HTML, ...)",
    "too large side": "width or height above data.max_side",
    "extreme aspect ratio": "long side / short side above data.max_aspect",
    "too large": "width x height above data.max_pixels (a decompression bomb, or just too big)",
    # decoding
    "truncated": "the image data ends early",
    "corrupt: <error>": "the decoder failed: the exception's class",
    "too small": "shorter side (upright) below data.min_side",
    # the manifest
    "duplicate": "the same bytes (sha256) as an image listed earlier, which is kept",
}


def reason_key(reason: str) -> str | None:
    """The :data:`REJECT_REASONS` key a written reason is an instance of (None for a reason outside it)."""
    if reason in REJECT_REASONS:
        return reason
    for key in REJECT_REASONS:
        head = key.split("<", 1)[0]
        if "<" in key and head and reason.startswith(head) and len(reason) > len(head):
            return key
    return None


class ImageRejected(ValueError):
    """An image whose header alone rules it out (see :func:`size_reject`); ``reason`` is a REJECT_REASONS key."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def size_reject(width: int, height: int, max_side: int = MAX_SIDE, max_aspect: float = MAX_ASPECT,
                max_pixels: int | None = None) -> str | None:
    """The reject reason of a ``width`` x ``height`` image from its header, before any pixel is decoded: a side
    above ``max_side``, long / short side above ``max_aspect``, or more than ``max_pixels`` pixels; else None."""
    long, short = max(width, height), min(width, height)
    if long > max_side:
        return "too large side"
    if long > max_aspect * short:
        return "extreme aspect ratio"
    if max_pixels is not None and width * height > max_pixels:
        return "too large"
    return None


def regular_file_reject(uri: str) -> str | None:
    """For a local path (or ``file://`` URL, or a tar member of one): a reject reason when it is not a regular file
    (a FIFO would block the first ``open``; a folder) or cannot be looked at, else None. Never opens it. Other
    URLs (object stores hold only regular objects) are not checked here: their read tells."""
    m = _tar_member(uri)
    url = m["url"] if m else uri
    if url.startswith("file://"):
        url = url[len("file://"):]
    elif "://" in url:
        return None
    try:
        st = os.stat(url)
    except FileNotFoundError:
        return "dangling symlink" if os.path.islink(url) else "missing"
    except PermissionError:
        return "permission denied"
    except OSError as err:
        return "symlink loop" if err.errno == errno.ELOOP else f"unreadable: {err.__class__.__name__}"
    return None if stat.S_ISREG(st.st_mode) else "not a regular file"


@dataclass(frozen=True)
class Probe:
    """What the shard stage learns about one file: either its facts or why it was rejected."""

    uri: str
    width: int = 0
    height: int = 0
    nbytes: int = 0
    sha256: str = ""
    reject: str | None = None


def tar_member_uri(tar_url: str, member: str, offset: int, size: int) -> str:
    """The URI of one member of an uncompressed tar: read in place by one ranged read."""
    return f"tar://{member}@{offset}:{size}::{tar_url}"


def _open(url: str):
    """A local path (or ``file://`` URL) with the builtin ``open`` (fsspec's ``open`` costs more than reading a
    small image), anything else through fsspec."""
    if "://" not in url:
        return open(url, "rb")
    if url.startswith("file://"):
        return open(url[len("file://"):], "rb")
    return fsspec.open(url, "rb")


def _tar_member(uri: str) -> re.Match[str] | None:
    """The parts (member, offset, size, url) of a tar member URI, None for any other URI."""
    return _TAR_MEMBER.match(uri) if uri.startswith("tar://") else None


def read_bytes(uri: str) -> bytes:
    """The bytes at ``uri``: any fsspec URL, or a tar member URI (see :func:`tar_member_uri`)."""
    m = _tar_member(uri)
    if m is None:
        with _open(uri) as f:
            return f.read()
    with _open(m["url"]) as f:
        f.seek(int(m["offset"]))
        return f.read(int(m["size"]))


def read_many(uris: list[str], max_gap: int = 1 << 16) -> list[bytes]:
    """The bytes of each of ``uris``, in order. Consecutive members of one tar (a packed shard, webdataset source)
    whose gaps are below ``max_gap`` bytes are read with one ranged read of the tar: sequential I/O, one request."""
    out: list[bytes] = []
    i = 0
    while i < len(uris):
        m = _tar_member(uris[i])
        if m is None:
            out.append(read_bytes(uris[i]))
            i += 1
            continue
        spans = [(int(m["offset"]), int(m["size"]))]
        j = i + 1
        while j < len(uris):
            n = _tar_member(uris[j])
            if n is None or n["url"] != m["url"]:
                break
            offset, size = int(n["offset"]), int(n["size"])
            end = spans[-1][0] + spans[-1][1]
            if not 0 <= offset - end <= max_gap:
                break
            spans.append((offset, size))
            j += 1
        start = spans[0][0]
        with _open(m["url"]) as f:
            f.seek(start)
            block = f.read(spans[-1][0] + spans[-1][1] - start)
        if len(block) < spans[-1][0] + spans[-1][1] - start:
            raise EOFError(f"{m['url']} ends before its member {uris[j - 1]}")
        view = memoryview(block)
        out.extend(bytes(view[o - start : o - start + n]) for o, n in spans)
        i = j
    return out


def _to_8bit_grey(img: Image.Image) -> Image.Image:
    """16/32-bit integer and float images (scientific TIFFs, 16-bit PNGs) to 8-bit grey, scaled by their range.
    Converted in blocks of pixels, so that no float64 copy of the whole image is made."""
    a = np.asarray(img)
    peak = float(a.max(initial=0))
    top = 65535.0 if img.mode.startswith("I;16") or peak > 255 else 255.0
    if img.mode == "F":
        top = max(peak, 1e-12) if peak > 1 else 1.0
    flat = a.reshape(-1)
    out = np.empty(flat.shape, np.uint8)
    for lo in range(0, flat.size, _GREY_BLOCK):
        block = flat[lo : lo + _GREY_BLOCK].astype(np.float64)
        out[lo : lo + _GREY_BLOCK] = np.clip(block * (255.0 / top), 0, 255).round().astype(np.uint8)
    return Image.fromarray(out.reshape(a.shape), mode="L")


def _exif_transpose(img: Image.Image) -> Image.Image:
    """The image turned upright by its EXIF orientation; as stored when the EXIF block is broken (the pixels are
    still usable, and :func:`upright_size` reports the stored size then too)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ImageOps.exif_transpose(img)
    except Exception:
        return img


def to_rgb(img: Image.Image) -> Image.Image:
    """First frame, EXIF orientation applied, any mode (palette, CMYK, 16-bit, grey) to 8-bit RGB; transparent
    pixels are composited on white."""
    if getattr(img, "is_animated", False):
        img.seek(0)
    img = _exif_transpose(img)
    if img.mode.startswith("I") or img.mode == "F":
        img = _to_8bit_grey(img)
    if img.mode == "P" and "transparency" not in img.info:
        return img.convert("RGB")
    if img.mode in ("P", "PA", "LA", "RGBA", "La", "RGBa") or "transparency" in img.info:
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


_LIMITS: dict[str, float | int | None] = {}  # this process's run's data.max_side / max_aspect (see use_limits)


def use_limits(max_side: int, max_aspect: float) -> None:
    """Make ``max_side`` and ``max_aspect`` (a run's ``data`` section) what :func:`decode` checks in this process
    when it is not told otherwise: opening a run's config does it, in the flow, on every Dask worker and in every
    torchrun rank, so the images the shard stage kept under the run's limits always decode."""
    _LIMITS.update(max_side=max_side, max_aspect=max_aspect)


def decode(data: bytes, max_side: int | None = None, max_aspect: float | None = None,
           max_pixels: int | None = None) -> Image.Image:
    """The image in ``data`` upright in 8-bit RGB (what extraction, training and galleries read).

    Bounded: the size is read from the header and checked (:func:`size_reject`: ``max_side``, ``max_aspect``,
    optionally ``max_pixels``) before any pixel is decoded, and raises :class:`ImageRejected` otherwise. So the
    decoded image holds at most ``max_side**2`` pixels (and at most ``max_side**2 / max_aspect`` for the thinnest
    shapes), and decoding allocates about ``max_side**2 x 4`` bytes (1 GiB at the default 16384; in practice
    ``data.max_pixels x 4``, 358 MB at its default, since the shard stage rejects larger images) plus one converted
    copy of that size. Nothing downstream can blow it up: a resize of the short side to ``s`` pixels makes at most
    ``s x s x max_aspect`` pixels (a 1 x 3,000,000 line would otherwise need a 15 GiB intermediate)."""
    max_side = int(max_side or _LIMITS.get("max_side") or MAX_SIDE)
    max_aspect = float(max_aspect or _LIMITS.get("max_aspect") or MAX_ASPECT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        reason = size_reject(w, h, max_side, max_aspect, max_pixels)
        if reason is not None:
            raise ImageRejected(reason, f"{reason}: {w} x {h} pixels (limits: side {max_side}, aspect ratio "
                                        f"{max_aspect:g}{'' if max_pixels is None else f', pixels {max_pixels}'})")
        img.load()
    return to_rgb(img)


def upright_size(img: Image.Image, size: tuple[int, int] | None = None) -> tuple[int, int]:
    """Width and height (``size``, default ``img.size``) once the EXIF orientation is applied (without
    transposing the pixels)."""
    w, h = size or img.size
    try:
        orientation = img.getexif().get(0x0112)
    except Exception:  # a broken EXIF block: the pixels are still usable, as they are stored
        orientation = None
    return (h, w) if orientation in _TRANSPOSED else (w, h)


def probe(uri: str, max_pixels: int, min_side: int = 1, max_side: int = MAX_SIDE,
          max_aspect: float = MAX_ASPECT) -> Probe:
    """Read and decode one image (JPEGs at 1/8 scale) the way :func:`decode` will (sizes checked from the header
    before any pixel is decoded, then converted to RGB); any failure becomes a reject reason instead of an
    exception. A local path that is not a regular file (a FIFO) is rejected without being opened."""
    not_regular = regular_file_reject(uri)
    if not_regular is not None:
        return Probe(uri, reject=not_regular)
    try:
        data = read_bytes(uri)
    except FileNotFoundError:
        return Probe(uri, reject="missing")
    except PermissionError:
        return Probe(uri, reject="permission denied")
    except Exception as err:  # any other failure of the storage layer (network, bad URL) is a reject too
        return Probe(uri, reject=f"unreadable: {err.__class__.__name__}")
    if not data:
        return Probe(uri, reject="empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            reason = size_reject(w, h, max_side, max_aspect, max_pixels)
            if reason is not None:
                return Probe(uri, width=w, height=h, nbytes=len(data), reject=reason)
            if img.format == "JPEG":  # DCT-scaled decode: every byte of entropy-coded data is still decoded
                img.draft(img.mode, (1, 1))  # (a truncated or corrupt stream still fails), the 1/8 IDCT is cheap
            img.load()
            if min(img.size) >= 1:  # decode's conversion, on one pixel (it keeps the mode, palette and info): a
                to_rgb(img.crop((0, 0, 1, 1)))  # mode it cannot convert is a reject here, not an extraction error
    except UnidentifiedImageError:
        return Probe(uri, nbytes=len(data), reject="not an image")
    except Image.DecompressionBombError:
        return Probe(uri, nbytes=len(data), reject="too large")
    except Exception as err:  # decoders raise OSError, SyntaxError, struct.error, IndexError...: all are rejects
        reason = "truncated" if "truncated" in str(err).lower() else f"corrupt: {err.__class__.__name__}"
        return Probe(uri, nbytes=len(data), reject=reason)
    w, h = upright_size(img, (w, h))  # the stored size, not the draft's
    if min(w, h) < min_side:
        return Probe(uri, width=w, height=h, nbytes=len(data), reject="too small")
    return Probe(uri, width=w, height=h, nbytes=len(data), sha256=hashlib.sha256(data).hexdigest())

"""Reading one image: bytes from any fsspec URL, decoded upright to RGB, or a reason to reject it."""

from __future__ import annotations

import hashlib
import io
import re
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
    """16/32-bit integer and float images (scientific TIFFs, 16-bit PNGs) to 8-bit grey, scaled by their range."""
    a = np.asarray(img).astype(np.float64)
    top = 65535.0 if img.mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
    if img.mode == "F":
        top = max(float(a.max(initial=0)), 1e-12) if a.max(initial=0) > 1 else 1.0
    return Image.fromarray(np.clip(a * (255.0 / top), 0, 255).round().astype(np.uint8), mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """First frame, EXIF orientation applied, any mode (palette, CMYK, 16-bit, grey) to 8-bit RGB; transparent
    pixels are composited on white."""
    if getattr(img, "is_animated", False):
        img.seek(0)
    img = ImageOps.exif_transpose(img)
    if img.mode.startswith("I") or img.mode == "F":
        img = _to_8bit_grey(img)
    if img.mode == "P" and "transparency" not in img.info:
        return img.convert("RGB")
    if img.mode in ("P", "PA", "LA", "RGBA", "La", "RGBa") or "transparency" in img.info:
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def decode(data: bytes) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        img = Image.open(io.BytesIO(data))
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


def probe(uri: str, max_pixels: int, min_side: int = 1) -> Probe:
    """Read and decode one image (JPEGs at 1/8 scale); any failure becomes a reject reason instead of an exception."""
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
            if w * h > max_pixels:
                return Probe(uri, width=w, height=h, nbytes=len(data), reject="too large")
            if img.format == "JPEG":  # DCT-scaled decode: every byte of entropy-coded data is still decoded
                img.draft(img.mode, (1, 1))  # (a truncated or corrupt stream still fails), the 1/8 IDCT is cheap
            img.load()
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

"""Reading one image: bytes from any fsspec URL, decoded upright to RGB, or a reason to reject it."""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

import fsspec
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

Image.MAX_IMAGE_PIXELS = None  # the pixel limit is ours (config.data.max_pixels), checked before decoding
ImageFile.LOAD_TRUNCATED_IMAGES = False

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


@dataclass(frozen=True)
class Probe:
    """What the shard stage learns about one file: either its facts or why it was rejected."""

    uri: str
    width: int = 0
    height: int = 0
    nbytes: int = 0
    sha256: str = ""
    reject: str | None = None


def read_bytes(uri: str) -> bytes:
    with fsspec.open(uri, "rb") as f:
        return f.read()


def to_rgb(img: Image.Image) -> Image.Image:
    """First frame, EXIF orientation applied, any mode (palette, CMYK, 16-bit, grey) to 8-bit RGB."""
    if getattr(img, "is_animated", False):
        img.seek(0)
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        img = img.point(lambda v: v / 256).convert("L")
    if img.mode in ("P", "PA", "LA", "RGBA"):
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


def probe(uri: str, max_pixels: int) -> Probe:
    """Read and fully decode one image; any failure becomes a reject reason instead of an exception."""
    try:
        data = read_bytes(uri)
    except FileNotFoundError:
        return Probe(uri, reject="missing")
    except PermissionError:
        return Probe(uri, reject="permission denied")
    except OSError as err:
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
            img.load()
    except UnidentifiedImageError:
        return Probe(uri, nbytes=len(data), reject="not an image")
    except (OSError, SyntaxError, ValueError) as err:
        reason = "truncated" if "truncated" in str(err).lower() else f"corrupt: {err.__class__.__name__}"
        return Probe(uri, nbytes=len(data), reject=reason)
    w, h = ImageOps.exif_transpose(img).size
    return Probe(uri, width=w, height=h, nbytes=len(data), sha256=hashlib.sha256(data).hexdigest())

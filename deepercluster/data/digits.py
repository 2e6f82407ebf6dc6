"""The bundled default data: scikit-learn's 1,797 labelled 8x8 digits, written out once as real PNG files."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

DIGITS_SOURCE = "digits"


def cache_dir() -> Path:
    return Path(os.environ.get("DEEPERCLUSTER_CACHE", Path.home() / ".cache" / "deepercluster"))


def digits_folder() -> Path:
    """A folder ``<class>/<index>.png`` holding the 1,797 digits; written on first use, atomically."""
    dest = cache_dir() / "digits-png"
    if (dest / "_complete").exists():
        return dest
    from sklearn.datasets import load_digits

    bunch = load_digits()
    tmp = dest.parent / f".tmp-{uuid.uuid4().hex}"
    for i, (img, label) in enumerate(zip(bunch.images, bunch.target, strict=True)):
        pixels = np.clip(img * (255.0 / 16.0), 0, 255).astype(np.uint8)
        (tmp / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels, mode="L").save(tmp / str(label) / f"{i:04d}.png")
    (tmp / "_complete").write_text(f"{len(bunch.images)}\n")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, dest)
    except OSError:  # another process won the race, or a partial folder is in the way
        if (dest / "_complete").exists():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            shutil.rmtree(dest, ignore_errors=True)
            os.replace(tmp, dest)
    return dest


def resolve_source(source: str) -> str:
    """The folder (path or URL) a data source names."""
    return str(digits_folder()) if source == DIGITS_SOURCE else source

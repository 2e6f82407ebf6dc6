"""Benchmark data readers: IDX files (MNIST, Fashion-MNIST; optionally gzipped) and labelled image folders.

The pipeline reads image folders, so an IDX set is materialised once as ``<class>/<index>.png`` (the index keeps
the IDX order: the train file first, then the test file), atomically, in a cache folder."""

from __future__ import annotations

import gzip
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

from deepercluster.data.images import IMAGE_SUFFIXES
from deepercluster.errors import DataError

# IDX type codes -> big-endian numpy dtypes
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
SPLITS = ("train", "t10k")
FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """The array stored in an IDX file (``.gz`` is decompressed), with a one-line error when it is not one."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise DataError(f"{path}: cannot read it as an IDX file ({err})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path} is truncated (its header needs {header} bytes)")
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    dtype = np.dtype(IDX_DTYPES[data[2]])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise DataError(f"{path} holds {len(data)} bytes, its header says {expected}: truncated or corrupt")
    return np.frombuffer(data, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def is_idx_folder(folder: str | os.PathLike[str]) -> bool:
    return any(_find(Path(folder), f"{s}-images-idx3-ubyte") for s in SPLITS)


def load_idx_folder(folder: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, H, W) uint8 and labels (N,) of every split in ``folder`` (``train-*`` then ``t10k-*``)."""
    folder = Path(folder)
    images, labels = [], []
    for split in SPLITS:
        img_path = _find(folder, f"{split}-images-idx3-ubyte")
        if img_path is None:
            continue
        lab_path = _find(folder, f"{split}-labels-idx1-ubyte")
        if lab_path is None:
            raise DataError(f"{img_path} has no {split}-labels-idx1-ubyte[.gz] beside it")
        x, y = read_idx(img_path), read_idx(lab_path)
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(f"{img_path} ({x.shape}) and {lab_path} ({y.shape}) are not images and their labels")
        images.append(x.astype(np.uint8))
        labels.append(y.astype(np.int64))
    if not images:
        raise DataError(f"{folder} holds no IDX image file (train-images-idx3-ubyte[.gz], t10k-images-idx3-ubyte)")
    return np.concatenate(images), np.concatenate(labels)


def write_image_folder(images: np.ndarray, labels: np.ndarray, dest: str | os.PathLike[str],
                       class_names: tuple[str, ...] | None = None) -> Path:
    """Write ``dest/<class>/<index>.png`` once (atomically: a temporary folder renamed when whole)."""
    dest = Path(dest)
    if (dest / "_complete").exists():
        return dest
    width = len(str(len(images)))
    tmp = dest.parent / f".tmp-{uuid.uuid4().hex}"
    names = [class_names[i] if class_names and i < len(class_names) else f"{i:02d}" for i in range(labels.max() + 1)]
    names = [f"{i:02d}-{n}" for i, n in enumerate(names)] if class_names else names
    for name in set(names[int(c)] for c in np.unique(labels)):
        (tmp / name).mkdir(parents=True)
    for i, (img, label) in enumerate(zip(images, labels, strict=True)):
        Image.fromarray(img).save(tmp / names[int(label)] / f"{i:0{width}d}.png", compress_level=1)
    (tmp / "_complete").write_text(f"{len(images)}\n")
    try:
        os.replace(tmp, dest)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (dest / "_complete").exists():
            raise
    return dest


def benchmark_folder(path: str | os.PathLike[str], cache: str | os.PathLike[str], limit: int | None = None) -> Path:
    """An image folder for ``path``: an IDX folder is materialised under ``cache`` (its first ``limit`` images); a
    labelled image folder (class sub-folders of images) is returned as it is, or, with ``limit``, a folder of links
    to its first ``limit`` images in round-robin class order (so that a subset still holds every class)."""
    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise DataError(f"{path} is not a folder (give an IDX folder or a folder of class sub-folders of images)")
    suffix = f"-first{limit}" if limit else ""
    if is_idx_folder(path):
        images, labels = load_idx_folder(path)
        names = FASHION_CLASSES if "fashion" in path.name.lower() else None
        return write_image_folder(images[:limit], labels[:limit], Path(cache) / f"{path.name}{suffix}-png", names)
    classes = [d for d in sorted(path.iterdir()) if d.is_dir() and not d.name.startswith((".", "_"))]
    if not classes or not any(f.suffix.lower() in IMAGE_SUFFIXES for d in classes[:1] for f in d.iterdir()):
        raise DataError(f"{path} holds neither IDX files nor class sub-folders of images")
    if not limit:
        return path
    dest = Path(cache) / f"{path.name}{suffix}-links"
    if (dest / "_complete").exists():
        return dest
    paths, labels, names = labelled_folder(path)
    rank = np.argsort(np.concatenate([np.arange((labels == c).sum()) for c in range(len(names))]), kind="stable")
    tmp = dest.parent / f".tmp-{uuid.uuid4().hex}"
    for i in rank[:limit]:
        (tmp / names[labels[i]]).mkdir(parents=True, exist_ok=True)
        os.symlink(paths[i], tmp / names[labels[i]] / Path(paths[i]).name)
    (tmp / "_complete").write_text(f"{min(limit, len(paths))}\n")
    try:
        os.replace(tmp, dest)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def labelled_folder(root: str | os.PathLike[str]) -> tuple[list[str], np.ndarray, list[str]]:
    """Every image under ``root/<class>/`` (sorted): paths, class ids (sorted class names) and the class names."""
    root = Path(root)
    classes = [d.name for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith((".", "_"))]
    paths, labels = [], []
    for c, name in enumerate(classes):
        for f in sorted((root / name).iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(str(f))
                labels.append(c)
    if not paths:
        raise DataError(f"{root} holds no images in class sub-folders")
    return paths, np.asarray(labels, dtype=np.int64), classes

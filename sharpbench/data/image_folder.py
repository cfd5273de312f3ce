"""Read an image-folder copy of CIFAR: ``<root>/{train,test}/<class>/*.{png,jpg,jpeg}``.

Class folders sorted alphabetically give the label order; files are sorted by name within a class.
Every image is decoded with Pillow (converted to RGB) and must be 32x32. The decoded split is cached
as a uint8 tensor file, so decoding happens once per dataset copy.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sharpbench.data.cache import Payload, cached
from sharpbench.data.errors import DataConfigError, DatasetUnavailableError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
SPLITS = ("train", "test")
# Below this many images a worker pool costs more than it saves.
POOL_MIN_IMAGES = 4000


def list_classes(split_dir: Path) -> list[str]:
    """Return the sorted class folder names in ``split_dir`` (hidden folders ignored)."""
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))


def list_images(class_dir: Path) -> list[str]:
    """Return the sorted image file names (png/jpg/jpeg, any case) in ``class_dir``."""
    return sorted(
        e.name
        for e in os.scandir(class_dir)
        if e.is_file() and not e.name.startswith(".") and e.name.lower().endswith(IMAGE_EXTENSIONS)
    )


def scan_split(root: Path, split: str) -> tuple[list[str], list[Path], list[int], dict]:
    """List a split's classes, image paths and labels, plus a fingerprint of the files."""
    split_dir = root / split
    if not split_dir.is_dir():
        raise DatasetUnavailableError(
            f"Image folder dataset not found: {split_dir} does not exist. The folder format expects "
            f"{root}/train/<class>/*.png and {root}/test/<class>/*.png; set dataset.root to the "
            "folder that contains train/ and test/, or use dataset.format=python."
        )
    classes = list_classes(split_dir)
    paths: list[Path] = []
    labels: list[int] = []
    digest = hashlib.sha1()
    empty = [cls for cls in classes if not list_images(split_dir / cls)]
    if empty:
        raise DatasetUnavailableError(
            f"{len(empty)} class folder(s) of {split_dir} hold no .png/.jpg/.jpeg image: "
            f"{', '.join(empty[:5])}{' …' if len(empty) > 5 else ''}. Every class needs images in "
            "both train/ and test/; add them or remove the empty folders from both splits.")
    for label, cls in enumerate(classes):
        for name in list_images(split_dir / cls):
            path = split_dir / cls / name
            st = path.stat()
            digest.update(f"{cls}/{name}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
            paths.append(path)
            labels.append(label)
    if not paths:
        raise DatasetUnavailableError(
            f"No .png/.jpg/.jpeg images found under {split_dir}/<class>/. Check dataset.root."
        )
    fingerprint = {
        "source": "folder",
        "split": split,
        "num_files": len(paths),
        "class_names": classes,
        "digest": digest.hexdigest(),
    }
    return classes, paths, labels, fingerprint


def decode_image(path: Path) -> np.ndarray:
    """Decode one image file to a ``[32, 32, 3]`` uint8 RGB array."""
    try:
        with Image.open(path) as img:
            if img.size != (32, 32):
                raise DataConfigError(
                    f"{path} is {img.size[0]}x{img.size[1]} pixels; the folder format expects 32x32 "
                    "CIFAR images. Resize the images to 32x32 or remove this file."
                )
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except OSError as err:  # includes PIL.UnidentifiedImageError
        raise DataConfigError(f"Could not decode the image {path} ({err}); replace or remove this file.") from err


def _decode_chunk(paths: list[Path]) -> np.ndarray:
    return np.stack([decode_image(p) for p in paths])


def _decode_in_pool(paths: list[Path], workers: int) -> np.ndarray:
    """Decode in ``workers`` processes; fall back to this process if a pool cannot start."""
    chunk = -(-len(paths) // (workers * 4))
    chunks = [paths[i : i + chunk] for i in range(0, len(paths), chunk)]
    try:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            return np.concatenate(list(pool.map(_decode_chunk, chunks)))
    except (BrokenProcessPool, OSError, AssertionError) as err:  # e.g. inside a daemonic process
        warnings.warn(f"Decoding images in one process: could not use a process pool ({err!r}).")
        return _decode_chunk(paths)


def decode_images(paths: list[Path], workers: int | None = None) -> torch.Tensor:
    """Decode ``paths`` into one uint8 tensor ``[N, 3, 32, 32]``, in a process pool for large lists.

    ``workers=None`` uses up to 8 processes (never more than the CPU count); ``workers<=1`` decodes
    in this process.
    """
    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    if workers <= 1 or len(paths) < POOL_MIN_IMAGES:
        hwc = _decode_chunk(paths)
    else:
        hwc = _decode_in_pool(paths, workers)
    return torch.from_numpy(hwc).permute(0, 3, 1, 2).contiguous()


def load_image_folder(
    root: str | Path, split: str, *, cache_dir: Path | None = None, cache_name: str = "folder",
    workers: int | None = None,
) -> Payload:
    """Return ``{"x", "y", "class_names"}`` for ``split`` of the image folder at ``root``.

    With ``cache_dir`` set, the decoded tensors are cached as ``<cache_dir>/<cache_name>-folder-<split>.pt``
    and reused while the file list, sizes and modification times stay the same.
    """
    root = Path(root).expanduser()
    classes, paths, labels, fingerprint = scan_split(root, split)

    def build() -> Payload:
        x = decode_images(paths, workers)
        return {"x": x, "y": torch.tensor(labels, dtype=torch.int64), "class_names": classes}

    path = None if cache_dir is None else Path(cache_dir) / f"{cache_name}-folder-{split}.pt"
    return cached(path, fingerprint, build)

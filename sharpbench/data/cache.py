"""Cache decoded image tensors in a ``.pt`` file, keyed by a fingerprint of the source files.

A cache file holds ``{"version", "fingerprint", "x", "y", "class_names"}``. It is reused only when
its stored fingerprint equals the fingerprint of the current source files; otherwise the data is
decoded again and the file rewritten. Writes are atomic (temporary file in the same folder, then
``os.replace``), so concurrent ranks or an interrupted run never leave a half-written cache.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from sharpbench.fileio import atomic_torch_save

CACHE_VERSION = 1
CACHE_DIRNAME = ".sharpbench_cache"

Payload = dict[str, Any]  # keys: "x" (uint8 [N,3,32,32]), "y" (int64 [N]), "class_names" (list[str])


def default_cache_dir(root: str | os.PathLike) -> Path:
    """Return the cache folder used when none is configured: ``<root>/.sharpbench_cache``."""
    return Path(root) / CACHE_DIRNAME


def file_stamp(path: Path) -> list:
    """Return ``[name, size, mtime_ns]`` of a file, used to build fingerprints."""
    st = path.stat()
    return [path.name, int(st.st_size), int(st.st_mtime_ns)]


def read_cache(path: Path, fingerprint: dict) -> Payload | None:
    """Return the cached payload if ``path`` exists and matches ``fingerprint``, else ``None``."""
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unreadable or truncated cache: rebuild it
        warnings.warn(f"Ignoring unreadable data cache {path} ({err}); decoding the source again.")
        return None
    if not isinstance(payload, dict) or payload.get("version") != CACHE_VERSION:
        return None
    if payload.get("fingerprint") != fingerprint:
        return None
    x, y = payload.get("x"), payload.get("y")
    if (not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or tuple(x.shape[1:]) != (3, 32, 32)
            or not isinstance(y, torch.Tensor) or y.shape != x.shape[:1]):
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        warnings.warn(f"Ignoring the data cache {path}: its images are {shape}, not N x 3 x 32 x 32 "
                      "uint8 with one label each; decoding the source again.")
        return None
    return payload


def write_cache(path: Path, fingerprint: dict, payload: Payload) -> None:
    """Atomically write ``payload`` with its ``fingerprint`` to ``path``; warn if not writable."""
    record = {"version": CACHE_VERSION, "fingerprint": fingerprint, **payload}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(record, path)
    except OSError as err:
        warnings.warn(
            f"Could not write the data cache {path} ({err}); the dataset will be decoded again next "
            "time. Set dataset.cache_dir to a writable folder to keep the cache."
        )


def cached(path: Path | None, fingerprint: dict, build: Callable[[], Payload]) -> Payload:
    """Return the payload from the cache at ``path``, or call ``build()`` and cache its result.

    With ``path=None`` caching is disabled and ``build()`` is always called.
    """
    if path is None:
        return build()
    payload = read_cache(path, fingerprint)
    if payload is not None:
        return {k: payload[k] for k in ("x", "y", "class_names")}
    payload = build()
    write_cache(path, fingerprint, payload)
    return payload

"""How sharpbench writes files: atomically, with the mode ``open()`` would give.

Every file a run or a report writes (records, checkpoints, reports, figures, surfaces, model
weights) goes through :func:`atomic_file`: written to a temporary file beside its destination
(``.<name>.<random>.tmp``), optionally fsynced, then renamed over the destination with
``os.replace``, so a reader (or a resume after a kill) sees the old file or the new one, never a
half-written one. The temporary file of a write killed on the way (``kill -9``, power loss) is
removed by the next writer in that folder (:func:`remove_stale_temporaries`).

``tempfile.mkstemp`` creates its file owner-only (``0600``), a mode ``os.replace`` would keep.
Results, checkpoints, reports and data caches are meant to be shared like Hydra's own files, so
every temporary file is given ``0666 & ~umask`` (``0644`` under the usual umask ``022``) first.
"""
from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator

log = logging.getLogger("sharpbench")

_umask_lock = threading.Lock()
TMP_SUFFIX = ".tmp"
# ``.<destination name>.<mkstemp's random part>.tmp``: what atomic_file leaves when killed.
TMP_PATTERN = re.compile(r"^\..+\.[A-Za-z0-9_]+\.tmp$")


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux ``/proc``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_lock:  # portable fallback: set and restore
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def default_file_mode() -> int:
    """``0o666 & ~umask``: the mode a plain ``open(path, "w")`` gives a new file."""
    return 0o666 & ~current_umask()


def make_shareable(path_or_fd: str | os.PathLike | int) -> None:
    """Give a temporary file (path or open descriptor) the mode ``open()`` would have given it."""
    if isinstance(path_or_fd, int):
        os.fchmod(path_or_fd, default_file_mode())
    else:
        os.chmod(path_or_fd, default_file_mode())


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename in ``folder`` durable (a power loss after it keeps the new name)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temporary_path(path: str | os.PathLike) -> tuple[int, str]:
    """A new temporary file beside ``path`` in :data:`TMP_PATTERN`'s naming, shareable mode."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        make_shareable(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    return fd, tmp


def publish(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Rename a finished temporary file over ``path`` with the usual file mode."""
    make_shareable(tmp)
    os.replace(tmp, path)


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb", *, fsync: bool = False,
                previous: str | os.PathLike | None = None, **open_kwargs) -> Iterator[IO]:
    """``with atomic_file(path) as f: ...``: ``f`` is a temporary file beside ``path``; when the
    block ends without an exception it replaces ``path``, else it is deleted and ``path`` is left
    as it was. ``fsync``: the data and then the rename are made durable (checkpoints, records).
    ``previous``: the current ``path`` is first renamed there (``last.ckpt`` -> ``last.prev.ckpt``)."""
    path = Path(path)
    fd, tmp = temporary_path(path)
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        if previous is not None and path.exists():
            os.replace(path, previous)
        os.replace(tmp, path)
        if fsync:
            fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = False) -> Path:
    with atomic_file(path, "wb", fsync=fsync) as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, *, fsync: bool = True) -> Path:
    """Text (records, reports, tables): fsynced by default, as the run records always were."""
    with atomic_file(path, "w", fsync=fsync, newline="") as f:
        f.write(text)
    return Path(path)


def json_text(obj: Any, indent: int | None = 2) -> str:
    """The JSON sharpbench writes: sorted keys, anything unknown as ``str``, a final newline."""
    return json.dumps(obj, indent=indent, sort_keys=True, default=str) + "\n"


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2,
                      fsync: bool = True) -> Path:
    return atomic_write_text(path, json_text(obj, indent), fsync=fsync)


def atomic_torch_save(obj: Any, path: str | os.PathLike, *, fsync: bool = False,
                      previous: str | os.PathLike | None = None) -> Path:
    """``torch.save(obj, path)``, atomically (see :func:`atomic_file` for ``previous``)."""
    import torch
    with atomic_file(path, "wb", fsync=fsync, previous=previous) as f:
        torch.save(obj, f)
    return Path(path)


def remove_stale_temporaries(folder: str | os.PathLike, min_age_s: float = 0.0) -> list[Path]:
    """Delete the temporary files (:data:`TMP_PATTERN`) that killed writes left in ``folder``.

    ``min_age_s=0`` for a folder whose writers are known to be gone (a run folder, under its
    lock); a positive age where another process might be writing right now (a report folder)."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    now = time.time()
    for tmp in entries:
        if not TMP_PATTERN.match(tmp.name):
            continue
        try:
            stat = tmp.stat()
            if now - stat.st_mtime < min_age_s or not tmp.is_file():
                continue
            tmp.unlink()
        except OSError:
            continue
        removed.append(tmp)
        log.info("removed %s (%.1f MB) left by an interrupted write", tmp, stat.st_size / 2**20)
    return removed

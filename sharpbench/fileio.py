"""File modes for what sharpbench writes: the same as ``open()`` would give, umask respected.

Atomic writes go through ``tempfile.mkstemp``, which creates its file owner-only (``0600``) and
keeps that mode through ``os.replace``. Results, checkpoints, reports and data caches are meant
to be shared like Hydra's own files, so every temporary file is given ``0666 & ~umask`` (``0644``
under the usual umask ``022``) before it is renamed into place.
"""
from __future__ import annotations

import os
import threading

_umask_lock = threading.Lock()


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

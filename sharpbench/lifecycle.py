"""A run's life in its folder: a lock on the folder, start-up checks, the record of a run stopped
before training and the command that resumes a stopped run. The process's signal handler, which
decides when a run stops, is ``sharpbench.signals`` (re-exported here).
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import signal
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .fileio import remove_stale_temporaries
from .record import METRICS_FILE, config_hash, read_record, write_record
from .run_identity import identity_hash
from .signals import (LIFETIME, PREEMPT_SIGNAL_ENV, Interrupted, ProcessLifetime,  # noqa: F401
                      exit_code_of_signal, handled_signals, status_of_signal)

log = logging.getLogger("sharpbench")

LOCK_FILE = ".sharpbench.lock"


class StartupError(RuntimeError):
    """The run folder cannot be used (not writable, locked by another process); nothing ran."""


class RunFolderBusy(StartupError):
    """Another process holds the run folder's lock."""


@contextmanager
def claim_folder(run_dir: Path):
    """Hold ``run_dir`` for one run: the signal handler installed (phase ``startup``), the folder
    locked, checked for writing, cleaned of interrupted saves. DDP ranks other than 0 only install
    the handler: the folder is rank 0's."""
    run_dir = Path(run_dir)
    LIFETIME.install()
    LIFETIME.phase = "startup"
    lock = RunFolderLock(run_dir) if is_rank_zero() else None
    try:
        if lock is not None:
            lock.acquire()
            check_writable(run_dir, run_dir / "checkpoints")
            clean_stale_temporaries(run_dir)
        yield run_dir
    finally:
        if lock is not None:
            lock.release()
        LIFETIME.uninstall()


def complete_record(record: dict[str, Any], run_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """A diverged run records no accuracy (its weights are not finite); a stopped one, the
    command that resumes it."""
    if record.get("status") == "diverged":
        for key in [k for k in record if k.startswith(("test_acc", "test_loss", "val_acc", "val_loss"))]:
            record[key] = None
    if record.get("status") in ("preempted", "interrupted"):
        record["resume_command"] = resume_command(run_dir, overrides)
    return record


def record_early_stop(summary: dict[str, Any], settled, overrides: list[str], signum: int) -> dict[str, Any]:
    """The record of a run stopped by a signal before training began (nothing to checkpoint)."""
    LIFETIME.phase = "finish"
    record = {**summary, "status": status_of_signal(signum), "config": settled.identity,
              "config_hash": config_hash(settled.identity), "overrides": overrides,
              "error": f"stopped by {signal.Signals(signum).name} before training began",
              "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    complete_record(record, settled.run_dir, overrides)
    log.warning("stopped by a signal before training began; resume with:\n  %s",
                record["resume_command"])
    if is_rank_zero():
        write_record(settled.run_dir, record)
    return record


def resume_command(run_dir: Path, overrides: list[str]) -> str:
    kept = [o for o in overrides if not o.startswith(("ckpt_path=", "hydra.run.dir="))]
    args = " ".join([*kept, "ckpt_path=last", f"hydra.run.dir={run_dir}"])
    return f"python -m sharpbench.train {args}"


# ------------------------------------------------------------------------------ the folder
class RunFolderLock:
    """An exclusive ``flock`` on ``<run dir>/.sharpbench.lock`` holding ``pid@host``. The kernel
    drops it when the process ends (also on ``kill -9``), so a stale lock cannot block a resume."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> "RunFolderLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = self.holder(fd)
            os.close(fd)
            if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise RunFolderBusy(
                f"the run folder {self.path.parent} is in use by process {holder.get('pid', '?')} "
                f"on host {holder.get('host', '?')} (since {holder.get('since', '?')}); two "
                "processes in one folder would corrupt its checkpoint and logs. Wait for it to "
                "finish or stop it, or run in another folder (hydra.run.dir=... / hydra.sweep.dir=...).")
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%dT%H:%M:%S")}).encode())
        self._fd = fd
        return self

    @staticmethod
    def holder(fd: int) -> dict[str, Any]:
        try:
            return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        except (OSError, ValueError):
            return {}

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunFolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def is_rank_zero() -> bool:
    """The process that owns the run folder (DDP children and other nodes do not)."""
    return all(int(os.environ.get(k, 0) or 0) == 0 for k in ("LOCAL_RANK", "NODE_RANK", "GROUP_RANK"))


def check_writable(*folders: Path) -> None:
    """Create and delete a file in each folder that exists (the first one is created), now, not
    after an epoch of training. A folder still to be created is covered by its parent's check."""
    for i, folder in enumerate(folders):
        if i > 0 and not folder.is_dir():
            continue
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=folder, prefix=".write_check.")
            os.close(fd)
            os.unlink(probe)
        except OSError as err:
            raise StartupError(
                f"cannot write to {folder} ({err.strerror or err}): the run could not save its "
                "checkpoints or results there. Fix the folder's permissions or free space, or run "
                "in another folder (hydra.run.dir=...).") from err


def clean_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete the temporary files of writes interrupted by a kill (``.last.ckpt.*.tmp`` …) in the
    run folder, ``checkpoints/`` and ``csv/``; run only while holding the folder's lock, so no
    live write is touched."""
    removed = []
    for folder in (run_dir, run_dir / "checkpoints", run_dir / "csv"):
        removed += remove_stale_temporaries(folder)
    return removed


def failure_destination(run_dir: Path, status: str, ident_hash: str | None) -> str:
    """``metrics.json``, unless that would replace a completed record, or the record of another
    run's training (another config hash; preempted, interrupted, diverged): the failure then goes
    beside it, to ``metrics.<status>.json``. Earlier failures are replaced."""
    previous = read_record(Path(run_dir) / METRICS_FILE)
    if previous is None or previous.get("status") in ("failed", "invalid_config"):
        return METRICS_FILE
    same_run = ident_hash is not None and isinstance(previous.get("config"), dict) and \
        identity_hash(previous["config"]) == ident_hash
    if previous.get("status") == "completed" or not same_run:
        return f"metrics.{status}.json"
    return METRICS_FILE

"""A run's life in its folder, from process start to exit: one signal handler for all of it, a
lock on the folder, start-up checks, and records that survive a full disk.

Signals (SIGTERM and SIGUSR1: preemption, a SLURM time limit; SIGINT: Ctrl-C). One handler is
installed when the process starts and kept until it exits; Lightning's own is not installed. The
first signal decides the outcome; later ones are logged and ignored, so the record is always
written. What it does depends on the phase:

- ``startup`` (config checks, data decoding, model build) and ``test``: stop at once
  (``Interrupted`` is raised where the program is);
- ``fit``: stop at the next safe point: after the current training batch (its checkpoint saved),
  or, on an epoch's last batch, after that epoch's evaluation and end-of-epoch checkpoint, so the
  checkpoint never holds a half-finished epoch end;
- ``finish`` (writing the record): note it and finish.

The run then records ``status: preempted`` (SIGTERM, SIGUSR1) or ``interrupted`` (SIGINT),
prints the command that resumes it, and exits with ``128 + signal`` (130 for Ctrl-C, 143 for
SIGTERM, 138 for SIGUSR1).

A record that cannot be written because the disk is full is written again after deleting a small
file reserved for it at start-up (``.sharpbench_reserve``); if that fails too it goes to a
fallback folder (``$SHARPBENCH_FALLBACK_DIR``, else the system's temporary folder) and its path
is printed.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger("sharpbench")

SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None),
                            getattr(signal, "SIGINT", None)) if s is not None)
RESERVE_FILE = ".sharpbench_reserve"
RESERVE_BYTES = 256 * 1024
LOCK_FILE = ".sharpbench.lock"
METRICS_FILE = "metrics.json"


class Interrupted(BaseException):
    """Raised where the program is when a signal arrives outside training (start-up, test).

    A ``BaseException``, so that no ``except Exception`` on the way swallows it."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


class StartupError(RuntimeError):
    """The run folder cannot be used (not writable, locked by another process); nothing ran."""


class RunFolderBusy(StartupError):
    """Another process holds the run folder's lock."""


def status_of_signal(signum: int) -> str:
    return "interrupted" if signum == signal.SIGINT else "preempted"


def exit_code_of_signal(signum: int) -> int:
    return 128 + int(signum)


# ----------------------------------------------------------------------------------- signals
class ProcessLifetime:
    """The process's one handler for SIGTERM, SIGUSR1 and SIGINT (see the module docstring)."""

    def __init__(self) -> None:
        self.phase = "startup"
        self.signum: int | None = None
        self.trainer = None
        self._previous: dict[int, Any] = {}
        self._installed = 0

    # installation ---------------------------------------------------------------------------
    def install(self, phase: str = "startup") -> "ProcessLifetime":
        """Install the handler (nested calls share one installation; main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            return self
        if self._installed == 0:
            self.reset()
            self.phase = phase
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        self._installed += 1
        return self

    def uninstall(self) -> None:
        if self._installed == 0:
            return
        self._installed -= 1
        if self._installed == 0:
            for s, handler in self._previous.items():
                signal.signal(s, handler if handler is not None else signal.SIG_DFL)
            self._previous = {}

    def ignore_further(self) -> None:
        """Ignore these signals from now on (the process is exiting with its record written).
        Python restores default handlers while it shuts down, so a late signal would otherwise
        kill it and replace the exit code."""
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                signal.signal(s, signal.SIG_IGN)

    def reset(self) -> None:
        self.phase, self.signum, self.trainer = "startup", None, None

    def __enter__(self) -> "ProcessLifetime":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    @property
    def installed(self) -> bool:
        return self._installed > 0

    # phases ---------------------------------------------------------------------------------
    def enter(self, phase: str, trainer=None) -> None:
        """Move to ``phase``; a signal that arrived just before takes effect now."""
        self.phase = phase
        if trainer is not None:
            self.trainer = trainer
        if self.signum is not None and phase in ("startup", "test"):
            raise Interrupted(self.signum)

    @contextmanager
    def watching(self, trainer):
        """Phase ``fit`` for ``trainer`` (signals stop it at a safe point), ``finish`` after."""
        self.enter("fit", trainer)
        try:
            yield self
        finally:
            self.phase = "finish"

    def stop_status(self) -> str:
        return status_of_signal(self.signum) if self.signum is not None else "preempted"

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.phase == "early":  # before the run folder is known: nothing to record
            print(f"[sharpbench] stopped by {name} before the run started; nothing was written",
                  file=sys.stderr)
            raise SystemExit(exit_code_of_signal(signum))
        if self.signum is not None:
            log.warning("received %s while already stopping (%s): finishing the record first",
                        name, signal.Signals(self.signum).name)
            return
        self.signum = signum
        if self.phase in ("startup", "test"):
            log.warning("received %s: stopping (%s)", name, self.phase)
            raise Interrupted(signum)
        if self.phase == "fit":
            log.warning("received %s: stopping after this batch with a checkpoint", name)
        else:
            log.warning("received %s while writing the record: finishing it first", name)


LIFETIME = ProcessLifetime()


def keep_lightning_off_signals(trainer) -> None:
    """Lightning installs its own SIGTERM handler during ``fit`` and restores the previous one
    afterwards; with ours covering the whole process that would open gaps, so it is skipped."""
    connector = trainer._signal_connector
    connector.register_signal_handlers = lambda: setattr(connector, "received_sigterm", False)
    connector.teardown = lambda: None


@contextmanager
def claim_folder(run_dir: Path):
    """Hold ``run_dir`` for one run: the signal handler installed (phase ``startup``), the folder
    locked, checked for writing, cleaned of interrupted saves, space reserved for the record.
    DDP ranks other than 0 only install the handler: the folder is rank 0's."""
    run_dir = Path(run_dir)
    LIFETIME.install()
    LIFETIME.enter("startup")
    lock = RunFolderLock(run_dir) if is_rank_zero() else None
    try:
        if lock is not None:
            lock.acquire()
            check_writable(run_dir, run_dir / "checkpoints")
            clean_stale_temporaries(run_dir)
            reserve_space(run_dir)
        yield run_dir
    finally:
        if lock is not None:
            release_reserve(run_dir)
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
    from .record import config_hash
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
    """Delete the temporary files of saves interrupted by a kill (``.last.ckpt.*.tmp`` …); run
    only while holding the folder's lock, so no live save is touched."""
    removed = []
    for folder in (run_dir, run_dir / "checkpoints"):
        for tmp in folder.glob(".*.tmp"):
            try:
                size = tmp.stat().st_size
                tmp.unlink()
                removed.append(tmp)
                log.info("removed %s (%.1f MB) left by an interrupted save", tmp, size / 2**20)
            except OSError:
                pass
    return removed


# ---------------------------------------------------------------------- records on a full disk
def reserve_space(run_dir: Path, nbytes: int = RESERVE_BYTES) -> None:
    """Hold ``nbytes`` of real blocks in the run folder, released to write a record when full."""
    path = Path(run_dir) / RESERVE_FILE
    try:
        with open(path, "wb") as f:
            f.write(b"\0" * nbytes)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        log.warning("could not reserve space for the run record in %s: %s", run_dir, err)


def release_reserve(run_dir: Path) -> bool:
    try:
        os.unlink(Path(run_dir) / RESERVE_FILE)
        return True
    except OSError:
        return False


def fallback_dir() -> Path:
    return Path(os.environ.get("SHARPBENCH_FALLBACK_DIR") or
                Path(tempfile.gettempdir()) / "sharpbench-records")


def write_record(run_dir: Path, record: dict[str, Any], name: str = METRICS_FILE) -> Path:
    """Write ``record`` to ``<run dir>/<name>`` atomically; on a full disk free the reserve and
    try again; failing that, write it to the fallback folder. Returns where it went."""
    from .record import atomic_write_text
    text = json.dumps(record, indent=2, sort_keys=True, default=str) + "\n"
    path = Path(run_dir) / name
    try:
        atomic_write_text(path, text)
        return path
    except OSError as first:
        if release_reserve(run_dir):
            try:
                atomic_write_text(path, text)
                log.warning("the disk is full: wrote %s using the space reserved for it", path)
                return path
            except OSError:
                pass
        fallback = fallback_dir() / f"{Path(run_dir).resolve().name}.{int(time.time())}.{name}"
        atomic_write_text(fallback, text)
        log.error("could not write %s (%s); the record is at %s", path, first, fallback)
        print(f"[sharpbench] could not write {path} ({first.strerror or first}); record written "
              f"to {fallback}", file=sys.stderr)
        return fallback


def read_record(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def failure_destination(run_dir: Path, status: str, ident_hash: str | None) -> str:
    """``metrics.json``, unless that would replace a completed record, or the record of another
    run's training (another config hash; preempted, interrupted, diverged): the failure then goes
    beside it, to ``metrics.<status>.json``. Earlier failures are replaced."""
    from .run_identity import identity_hash
    previous = read_record(Path(run_dir) / METRICS_FILE)
    if previous is None or previous.get("status") in ("failed", "invalid_config"):
        return METRICS_FILE
    same_run = ident_hash is not None and isinstance(previous.get("config"), dict) and \
        identity_hash(previous["config"]) == ident_hash
    if previous.get("status") == "completed" or not same_run:
        return f"metrics.{status}.json"
    return METRICS_FILE

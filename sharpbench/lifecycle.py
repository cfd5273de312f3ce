"""A run's life in its folder, from process start to exit: one signal handler for all of it, a
lock on the folder, start-up checks, and the resume command of a stopped run.

Signals: SIGTERM and SIGUSR1 (preemption, a SLURM time limit), SIGUSR2 (submitit's requeue
signal under SLURM; also whatever ``$SUBMITIT_PREEMPT_SIGNAL`` names), SIGINT (Ctrl-C). One
handler is installed when the process starts and kept until it exits; Lightning's own handler is
put back to ours whenever Lightning installs it (``runtime.StopAtSafePoint``). The first signal
decides the outcome; later ones are logged and ignored, so the record is always written. The
handler itself only notes the signal (a signal can arrive anywhere, even inside an import); the
run stops at the next safe point of its phase:

- ``early`` (``python -m sharpbench.train`` importing its libraries) and ``startup`` (config
  checks, the folder claimed, data decoding, model build): at the next check between those steps
  (``ProcessLifetime.stop_here``; before the folder is claimed the process exits with nothing
  recorded, after it a record with the resume command is written);
- ``fit``: after the current training batch (its checkpoint saved), or, on an epoch's last
  batch, after that epoch's evaluation and end-of-epoch checkpoint, so the checkpoint never holds
  a half-finished epoch end;
- ``test``: at once (``Interrupted`` is raised where the program is; the weights are saved);
- ``finish`` (writing the record): note it and finish.

The run then records ``status: preempted`` (SIGTERM, SIGUSR1, SIGUSR2) or ``interrupted``
(SIGINT) with the command that resumes it, and exits with ``128 + signal`` (130 for Ctrl-C, 143
for SIGTERM, 138 for SIGUSR1, 140 for SIGUSR2). A handler that was installed before ours for the
stopping signal (submitit's: it requeues the job) is called after the record is written
(``ProcessLifetime.pass_on``), so a SLURM job is still requeued.
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

from .fileio import remove_stale_temporaries
from .record import METRICS_FILE, config_hash, read_record, write_record
from .run_identity import identity_hash

log = logging.getLogger("sharpbench")

LOCK_FILE = ".sharpbench.lock"
PREEMPT_SIGNAL_ENV = "SUBMITIT_PREEMPT_SIGNAL"
STOP_PHASES = ("early", "startup")  # a signal stops the run at the next ``stop_here``


def handled_signals() -> tuple[int, ...]:
    """SIGTERM, SIGUSR1, SIGUSR2, SIGINT, and the signal ``$SUBMITIT_PREEMPT_SIGNAL`` names."""
    names = ["SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT"]
    extra = os.environ.get(PREEMPT_SIGNAL_ENV, "").strip().upper()
    if extra:
        names.append(extra if extra.startswith("SIG") else f"SIG{extra}")
    found = [getattr(signal, n, None) for n in names]
    out: list[int] = []
    for s in found:
        if s is not None and s not in out and s not in (signal.SIGKILL, signal.SIGSTOP):
            out.append(s)
    return tuple(out)


class Interrupted(BaseException):
    """Raised at a safe point (or, in ``test``, where the program is) when a signal came.

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
    """The process's one handler for the stop signals (see the module docstring)."""

    def __init__(self) -> None:
        self.phase = "startup"
        self.signum: int | None = None
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
            self._previous = {s: signal.signal(s, self._handle) for s in handled_signals()}
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

    def reassert(self) -> None:
        """Put our handler back where someone else (Lightning, at ``fit``/``test``) replaced it;
        whatever they restore later is ours again anyway."""
        if self._installed and threading.current_thread() is threading.main_thread():
            for s in self._previous:
                if signal.getsignal(s) != self._handle:
                    signal.signal(s, self._handle)

    def ignore_further(self) -> None:
        """Ignore these signals from now on (the process is exiting with its record written).
        Python restores default handlers while it shuts down, so a late signal would otherwise
        kill it and replace the exit code."""
        if threading.current_thread() is threading.main_thread():
            for s in handled_signals():
                signal.signal(s, signal.SIG_IGN)

    def reset(self) -> None:
        self.phase, self.signum = "startup", None

    def __enter__(self) -> "ProcessLifetime":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    @property
    def installed(self) -> bool:
        return self._installed > 0

    # phases ---------------------------------------------------------------------------------
    def enter(self, phase: str) -> None:
        """Move to ``phase``; a signal that arrived just before takes effect now."""
        self.phase = phase
        if phase in ("startup", "test"):
            self.stop_here()

    def stop_here(self) -> None:
        """A safe point of start-up: raise ``Interrupted`` if a signal came since the last one."""
        if self.signum is not None and self.phase in (*STOP_PHASES, "test"):
            raise Interrupted(self.signum)

    @contextmanager
    def watching(self):
        """Phase ``fit`` (signals stop training at a safe point), ``finish`` after."""
        self.phase = "fit"
        try:
            yield self
        finally:
            self.phase = "finish"

    def stop_status(self) -> str:
        return status_of_signal(self.signum) if self.signum is not None else "preempted"

    def _handle(self, signum: int, frame) -> None:
        # Runs between any two bytecodes of the main thread (inside imports, logging, ...): it
        # only notes the signal, except in ``test`` (see the module docstring).
        if self.signum is not None:
            if self.phase not in ("early",):
                log.warning("received %s while already stopping (%s): finishing the record first",
                            signal.Signals(signum).name, signal.Signals(self.signum).name)
            return
        self.signum = signum
        if self.phase == "early":
            return
        name = signal.Signals(signum).name
        if self.phase == "test":
            log.warning("received %s: stopping (test)", name)
            raise Interrupted(signum)
        if self.phase == "startup":
            log.warning("received %s: stopping before training starts", name)
        elif self.phase == "fit":
            log.warning("received %s: stopping after this batch with a checkpoint", name)
        else:
            log.warning("received %s while writing the record: finishing it first", name)

    def pass_on(self) -> None:
        """Call the handler that was installed before ours for the stopping signal, now that the
        run is stopped and recorded: under submitit that handler requeues the job (and exits).
        Python's own SIGINT handler (``KeyboardInterrupt``) and the defaults are not called."""
        if self.signum is None:
            return
        previous = self._previous.get(self.signum)
        if callable(previous) and previous is not signal.default_int_handler \
                and previous != self._handle:
            log.info("passing %s on to the handler installed before sharpbench's (%s)",
                     signal.Signals(self.signum).name, getattr(previous, "__qualname__", previous))
            previous(self.signum, None)

    def exit_if_stopped_early(self) -> None:
        """``python -m sharpbench.train``: a signal during the start-up imports ends the process
        here, before any folder is claimed, with the signal's exit code."""
        if self.signum is not None and self.phase == "early":
            print(f"[sharpbench] stopped by {signal.Signals(self.signum).name} before the run "
                  "started; nothing was written", file=sys.stderr, flush=True)
            self.phase = "finish"
            self.pass_on()
            self.ignore_further()
            sys.exit(exit_code_of_signal(self.signum))


LIFETIME = ProcessLifetime()


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

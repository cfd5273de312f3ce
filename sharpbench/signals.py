"""The process's one signal handler, from process start to exit (standard library only, so that
``python -m sharpbench.train`` installs it before importing anything heavy).

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

import logging
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any

log = logging.getLogger("sharpbench")

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


def status_of_signal(signum: int) -> str:
    return "interrupted" if signum == signal.SIGINT else "preempted"


def exit_code_of_signal(signum: int) -> int:
    return 128 + int(signum)


# ----------------------------------------------------------------------------------- signals
class ProcessLifetime:
    """The process's one handler for the stop signals (see the module docstring)."""

    def __init__(self) -> None:
        self.trainer = None  # the run's trainer while it fits and tests (read by run_logging)
        self.phase = "startup"
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._installed = 0
        self._watching_parent = False
        self.parent_gone = False  # set by ``watch_parent``: the launcher of this sweep job died

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
    def watching(self, trainer=None):
        """Phase ``fit`` (signals stop training at a safe point), ``finish`` after; ``trainer`` is
        kept as ``self.trainer`` meanwhile."""
        self.phase, self.trainer = "fit", trainer
        try:
            yield self
        finally:
            self.phase, self.trainer = "finish", None

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

    def watch_parent(self, interval_s: float = 1.0) -> None:
        """In a sweep's worker process (the joblib launcher's): when the process that started
        it is gone (the launcher killed, even by SIGKILL), stop this job as SIGTERM would, at a
        safe point with a checkpoint, a record and its resume command, instead of training on
        with no one to collect it; the worker then exits (``parent_gone``). Once per process."""
        if self._watching_parent:
            return
        self._watching_parent = True
        parent = os.getppid()

        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(interval_s)
            log.warning("the process that launched this sweep job (%d) is gone: stopping the job",
                        parent)
            self.parent_gone = True
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=watch, name="sharpbench-launcher-watch", daemon=True).start()

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

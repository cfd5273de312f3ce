"""The run record: everything a run measured, in ``<run dir>/metrics.json``.

This module is the only writer of run records: ``write_record`` writes a record atomically
(fsynced; into a fallback folder when the run folder cannot take it), ``read_record`` /
``read_metrics`` read one back. What goes into a completed, stopped or diverged run's record is
assembled by ``build_record``; ``sharpbench.lifecycle`` decides where a failure's record goes
(``failure_destination``) and adds the resume command. Training and evaluation are timed apart
(``RunTimer``), CUDA-synchronised at epoch and evaluation boundaries and at logging steps only
(never inside a training step); forward/backward passes are counted by the module's closure.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from .compat import is_logging_step
from .cost import cost_record
from .fileio import atomic_write_text, json_text

log = logging.getLogger("sharpbench")

METRICS_FILE = "metrics.json"
# The version of the record's layout, stamped on every record by ``write_record``: 2 added
# ``record_version`` itself, ``data_source`` (where the data were read) and the machine's load.
RECORD_VERSION = 2


def fallback_dir() -> Path:
    return Path(os.environ.get("SHARPBENCH_FALLBACK_DIR") or
                Path(tempfile.gettempdir()) / "sharpbench-records")


def write_record(run_dir: str | os.PathLike, record: dict[str, Any], name: str = METRICS_FILE) -> Path:
    """Write ``record`` to ``<run dir>/<name>`` atomically; when that fails (a full disk, a folder
    made read-only), to the fallback folder (``$SHARPBENCH_FALLBACK_DIR``, else the system's
    temporary folder), saying where. Returns where it went."""
    record.setdefault("record_version", RECORD_VERSION)  # the caller's dict says it too
    text = json_text(record)
    path = Path(run_dir) / name
    try:
        atomic_write_text(path, text)
        return path
    except OSError as first:
        fallback = fallback_dir() / f"{Path(run_dir).resolve().name}.{int(time.time())}.{name}"
        atomic_write_text(fallback, text)
        why = "the disk is full" if getattr(first, "errno", None) == 28 else (first.strerror or str(first))
        log.error("could not write %s (%s); the record is at %s", path, why, fallback)
        print(f"[sharpbench] could not write {path} ({why}); record written to {fallback}",
              file=sys.stderr)
        return fallback


def read_record(path: str | os.PathLike) -> dict[str, Any] | None:
    """A record file's content; ``None`` when it is missing, unreadable or not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def read_metrics(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """``<run dir>/metrics.json`` (see ``read_record``)."""
    return read_record(Path(run_dir) / METRICS_FILE)


def config_hash(config: dict[str, Any]) -> str:
    """A stable hash of what defines a run (the resolved config, without where it is written)."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def code_version() -> str:
    """What code trains: the git commit of the checkout (``+dirty`` with uncommitted changes),
    else the installed package's version."""
    sha = git_sha()
    if sha:
        try:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=5,
                                   cwd=Path(__file__).resolve().parent).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            dirty = ""
        return f"git:{sha}{'+dirty' if dirty else ''}"
    try:
        from importlib.metadata import version
        return f"sharpbench {version('sharpbench')}"
    except Exception:  # not installed either
        return "unknown"


def code_segments(previous: list[dict[str, Any]] | None, resume_step: int | None) -> list[dict[str, Any]]:
    """The training segments of a run so far, this process's last: ``code_version`` and the
    ``from_step`` each began at. A checkpoint written before segments were recorded counts as
    one segment of unknown code."""
    segments = [dict(s) for s in (previous or [])]
    if resume_step and not segments:
        segments = [{"code_version": None, "from_step": 0}]
    return [*segments, {"code_version": code_version(), "from_step": int(resume_step or 0),
                        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S")}]


def continued_by_other_code(segments: list[dict[str, Any]]) -> bool:
    return len({s.get("code_version") for s in segments}) > 1


# A run's times measure the machine as much as the method when, at some point of its training,
# the 1-minute load average exceeded this many times the machine's CPU count (a quiet machine
# training on the CPU sits near 1x: the run's own threads).
OVERLOAD_FACTOR = 1.5


def load_average() -> float | None:
    """The system's 1-minute load average (runnable and waiting tasks); None where unknown."""
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return None


def machine_load(samples: list[float]) -> dict[str, Any]:
    """``load_avg_start``/``_end``/``_max`` of the 1-minute load average sampled at the start of
    training, each epoch's end and the end, and ``overloaded`` (``OVERLOAD_FACTOR``)."""
    if not samples:
        return {"load_avg_start": None, "load_avg_end": None, "load_avg_max": None,
                "overloaded": None}
    cores = os.cpu_count() or 1
    return {"load_avg_start": samples[0], "load_avg_end": samples[-1],
            "load_avg_max": max(samples), "overloaded": max(samples) > OVERLOAD_FACTOR * cores}


def hardware() -> dict[str, Any]:
    info = {"hostname": platform.node(), "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch_version": torch.__version__,
            "cuda_version": torch.version.cuda, "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_count"] = torch.cuda.device_count()
    return info


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class RunTimer(L.Callback):
    """Training time and evaluation time, measured apart (seconds, CUDA-synchronised).

    The training clock runs from the start of a training epoch (or the first batch after an
    evaluation pass or a resume) until an evaluation pass starts, the epoch ends, or the run
    stops with an exception (a signal, a divergence); ``epoch_times[e]`` is epoch ``e``'s
    training time, ``partial`` that of an epoch not finished yet. Each evaluation pass run during
    ``fit`` is timed on its own (``eval_times``), the final ``trainer.test`` as ``test_time``.
    The device is synchronised only at these boundaries and at logging steps, never inside a
    training step. At every logging step the training time so far is logged as ``train/time_s``
    (the x-axis of the report's curves against wall-clock time). Beside the wall clock it keeps
    the process's CPU time while training (``cpu_time``) and samples the machine's 1-minute load
    average at the start, each epoch's end and the end (``load_samples``), so a record shows
    when its times measured a busy machine rather than the method (``machine_load``).
    """

    def __init__(self) -> None:
        self.epoch_times: list[float] = []
        self.partial = 0.0
        self.cpu_time = 0.0            # this process's CPU time while the training clock ran
        self.load_samples: list[float] = []  # 1-minute load average: start, epoch ends, end
        self.eval_times: list[float] = []
        self.test_time: float | None = None
        self.images = 0
        self._t0: float | None = None
        self._cpu0 = 0.0
        self._eval_t0: float | None = None

    # ------------------------------------------------------------------ the training clock
    def _start(self, pl_module) -> None:
        if self._t0 is None:
            synchronize(pl_module.device)
            self._t0 = time.perf_counter()
            self._cpu0 = time.process_time()

    def _pause(self, pl_module) -> None:
        if self._t0 is not None:
            synchronize(pl_module.device)
            self.partial += time.perf_counter() - self._t0
            self.cpu_time += time.process_time() - self._cpu0
            self._t0 = None

    def _sample_load(self) -> None:
        load = load_average()
        if load is not None:
            self.load_samples.append(load)

    def on_train_start(self, trainer, pl_module) -> None:
        self._sample_load()

    def on_train_end(self, trainer, pl_module) -> None:
        self._sample_load()

    def train_seconds(self) -> float:
        """Training time so far: finished epochs, the current one, and the running segment."""
        running = time.perf_counter() - self._t0 if self._t0 is not None else 0.0
        return float(sum(self.epoch_times)) + self.partial + running

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start(pl_module)  # after an evaluation pass, or resumed mid-epoch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.images += int(batch[0].shape[0]) * trainer.world_size
        if trainer.loggers and is_logging_step(trainer):
            synchronize(pl_module.device)  # the logger reads the loss back at this step anyway
            pl_module.log("train/time_s", self.train_seconds(), on_step=True, on_epoch=False)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._pause(pl_module)
        self.epoch_times.append(self.partial)
        self.partial = 0.0
        self._sample_load()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._pause(pl_module)  # a preempted or diverged run keeps the time it trained
        self._sample_load()

    # ------------------------------------------------------------------ evaluation clocks
    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit":
            self._pause(pl_module)
            synchronize(pl_module.device)
            self._eval_t0 = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._eval_t0 is not None:
            synchronize(pl_module.device)
            self.eval_times.append(time.perf_counter() - self._eval_t0)
            self._eval_t0 = None

    def on_test_start(self, trainer, pl_module) -> None:
        synchronize(pl_module.device)
        self._eval_t0 = time.perf_counter()

    def on_test_end(self, trainer, pl_module) -> None:
        if self._eval_t0 is not None:
            synchronize(pl_module.device)
            self.test_time = time.perf_counter() - self._eval_t0
            self._eval_t0 = None

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        running = time.perf_counter() - self._t0 if self._t0 is not None else 0.0
        cpu = time.process_time() - self._cpu0 if self._t0 is not None else 0.0
        return {"epoch_times": list(self.epoch_times), "partial": self.partial + running,
                "eval_times": list(self.eval_times), "images": self.images,
                "cpu_time": self.cpu_time + cpu, "load_samples": list(self.load_samples)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch_times = list(state.get("epoch_times", []))
        self.partial = float(state.get("partial", 0.0))
        self.eval_times = list(state.get("eval_times", []))
        self.images = int(state.get("images", 0))
        self.cpu_time = float(state.get("cpu_time", 0.0))
        self.load_samples = [float(x) for x in state.get("load_samples", [])]


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_max_rss"


def steps_per_epoch(module) -> int | None:
    try:
        return int(module.steps_per_epoch())
    except Exception:  # no trainer or data attached (a run that failed before fit)
        return None


def step_cost(module, opt) -> dict[str, Any]:
    """Cost per step with each HVP at its FLOP price, and the eigen-solve record (sharpbench.cost);
    a failure to count is recorded, never fatal."""
    try:
        return cost_record(module, opt)
    except Exception as exc:  # the record must still be written
        return {"cost_error": f"{type(exc).__name__}: {exc}"}


def build_record(*, cfg_summary: dict, module, timer: RunTimer, trainer, status: str,
                 overrides: list[str], config: dict, started_at: float,
                 error: str | None = None,
                 segments: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Assemble metrics.json from what the run measured."""
    device = module.device
    steps = max(1, module.steps_done)
    wall = float(sum(timer.epoch_times)) + timer.partial  # training only (see RunTimer)
    mem, mem_kind = peak_memory_mb(device)
    opt = None
    try:
        opt = module.optimizers(use_pl_optimizer=False)
    except Exception:  # no optimizer attached (failed before fit)
        pass
    record: dict[str, Any] = {
        **cfg_summary,
        "status": status,
        "epochs_completed": len(timer.epoch_times),
        "steps": module.steps_done,
        "skipped_steps": module.skipped_steps,
        "wall_time_s": wall,
        "epoch_time_s": statistics.median(timer.epoch_times) if timer.epoch_times else None,
        "epoch_times_s": timer.epoch_times,
        "partial_epoch_time_s": timer.partial,
        "eval_time_s": float(sum(timer.eval_times)),
        "eval_times_s": timer.eval_times,
        "test_time_s": timer.test_time,
        "total_time_s": time.time() - started_at,
        "cpu_time_s": timer.cpu_time,  # beside wall_time_s: CPU seconds this process got
        **machine_load(timer.load_samples),
        "steps_per_epoch": steps_per_epoch(module),
        "log_every_n_steps": getattr(trainer, "log_every_n_steps", None),
        "images_per_s": timer.images / wall if wall > 0 else None,
        "passes_per_step": module.passes / steps if module.steps_done else None,
        "hvps_per_step": (getattr(opt, "num_hvps", 0) / steps) if opt is not None and hasattr(opt, "num_hvps") else None,
        "nominal_passes_per_step": getattr(opt, "passes_per_step", 1.0) if opt is not None else None,
        "peak_mem_mb": mem,
        "peak_mem_kind": mem_kind,
        "device": str(device),
        "precision": module.precision_name,
        "torch_version": torch.__version__,
        "git_sha": git_sha(),
        "code_segments": segments or code_segments(None, None),
        "continued_by_other_code": continued_by_other_code(segments or []),
        "hardware": hardware(),
        "overrides": overrides,
        "config": config,
        "config_hash": config_hash(config),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started_at)),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    record.update(step_cost(module, opt))
    record["train_loss"] = module.train_loss_epoch
    # the last epoch's mean loss at w + e, for methods whose steps return it (MSAM, A²SAM)
    record["train_loss_perturbed"] = getattr(module, "train_loss_perturbed_epoch", None)
    record["train_acc"] = module.train_acc_epoch
    for split in ("val", "test"):
        res = module.eval_results.get(split)
        record[f"{split}_acc"] = res["acc"] if res else None
        record[f"{split}_loss"] = res["loss"] if res else None
    if error:
        record["error"] = error
    return record

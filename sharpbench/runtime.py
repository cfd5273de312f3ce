"""Run plumbing: atomic checkpoints, loggers, checkpoint paths and the precision choice."""
from __future__ import annotations

import csv
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback, Checkpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from .checks import ConfigError
from .lifecycle import LIFETIME, ProcessLifetime, StartupError
from .module import DivergenceError
from .fileio import make_shareable

log = logging.getLogger("sharpbench")

LOGGERS = ("csv", "wandb", "tensorboard", "none")


class NonFiniteCheckpoint(DivergenceError):
    """A checkpoint about to be written holds inf/NaN weights or optimizer state."""


class CheckpointUnreadable(StartupError):
    """No checkpoint the run was asked to resume from can be read."""


def non_finite_tensors(checkpoint: dict[str, Any]) -> list[str]:
    """Names of the floating-point tensors in the weights and optimizer states that hold inf/NaN
    (one host synchronisation for all of them)."""
    named: list[tuple[str, torch.Tensor]] = []

    def visit(prefix: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() or value.is_complex():
                named.append((prefix, value))
        elif isinstance(value, dict):
            for k, v in value.items():
                visit(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                visit(f"{prefix}.{i}", v)

    visit("state_dict", checkpoint.get("state_dict", {}))
    visit("optimizer_states", checkpoint.get("optimizer_states", []))
    by_device: dict[torch.device, list[int]] = {}
    for i, (_, t) in enumerate(named):
        by_device.setdefault(t.device, []).append(i)
    ok = [True] * len(named)
    for idx in by_device.values():
        flags = torch.stack([torch.isfinite(named[i][1]).all() for i in idx]).tolist()
        for i, flag in zip(idx, flags):
            ok[i] = flag
    return [name for (name, _), good in zip(named, ok) if not good]


def fsync_dir(folder: Path) -> None:
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


def previous_path(path: Path) -> Path:
    """``last.ckpt`` -> ``last.prev.ckpt``: the checkpoint before the current one."""
    return path.with_name(f"{path.stem}.prev{path.suffix}")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints that survive kills, power loss and divergence.

    A checkpoint is refused (``NonFiniteCheckpoint``) when any weight or optimizer state is not
    finite, so a good ``last.ckpt`` is never replaced by a diverged one. Otherwise it is written to
    a temporary file in the same folder and fsynced; the current file becomes ``last.prev.ckpt``;
    the new one is renamed into place and the folder fsynced. A kill at any point leaves a
    complete ``last.ckpt`` or ``last.prev.ckpt`` (``load_resumable`` falls back to it)."""

    def __init__(self) -> None:
        super().__init__()
        self.preloaded: tuple[str, dict] | None = None

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        bad = non_finite_tensors(checkpoint)
        if bad:
            raise NonFiniteCheckpoint(
                f"training diverged: {len(bad)} weight/optimizer tensors are inf/NaN at step "
                f"{checkpoint.get('global_step')} (e.g. {', '.join(bad[:3])}); the checkpoint was "
                f"not written, {path.name} keeps the last finite state. Lower optimizer.lr or rho, "
                "or enable trainer.gradient_clip_val")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            make_shareable(fd)  # mkstemp's 0600 -> 0666 & ~umask, like open()
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            if path.exists():
                os.replace(path, previous_path(path))
            os.replace(tmp, path)
            fsync_dir(path.parent)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        if self.preloaded is not None and self.preloaded[0] == str(path):
            checkpoint, self.preloaded = self.preloaded[1], None
            return checkpoint
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)


def read_checkpoint(path: Path) -> tuple[dict | None, str | None]:
    """``(checkpoint, None)``, or ``(None, why it cannot be used)``."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated, corrupt, not a checkpoint
        return None, f"{type(err).__name__}: {err}"
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        return None, "not a Lightning checkpoint (no state_dict)"
    bad = non_finite_tensors(checkpoint)
    if bad:
        return None, f"{len(bad)} tensors are inf/NaN (e.g. {bad[0]})"
    return checkpoint, None


def load_resumable(candidates: list[Path]) -> tuple[Path, dict]:
    """The first of ``candidates`` that exists and can be read; each one skipped is named."""
    problems = []
    for path in candidates:
        if not path.exists():
            continue
        checkpoint, why = read_checkpoint(path)
        if checkpoint is not None:
            if problems:
                log.warning("resuming from %s (step %s) instead: %s", path,
                            checkpoint.get("global_step"), "; ".join(problems))
            return path, checkpoint
        problems.append(f"{path} cannot be used ({why})")
        log.warning("%s cannot be used: %s", path, why)
    raise CheckpointUnreadable(
        f"no usable checkpoint to resume from: {'; '.join(problems)}. The file is truncated or "
        "corrupt (e.g. a power loss during a save). Move it away (or delete it) to start this "
        "run from scratch, or give another checkpoint with ckpt_path=<file.ckpt>.")


class LastCheckpoint(Checkpoint):
    """Keep one resumable ``<run dir>/checkpoints/last.ckpt`` (and the one before it,
    ``last.prev.ckpt``): written at the end of every epoch, and every ``every_n_steps`` optimizer
    steps when set (resume after a kill). Each checkpoint carries the run's identity.

    No step checkpoint is written on an epoch's last batch: Lightning resumes such a checkpoint
    past the epoch's evaluation and end-of-epoch hooks (per-epoch test row, epoch loss, epoch
    time); the end-of-epoch checkpoint follows right after them.

    A ``Checkpoint`` subclass, so Lightning runs its ``on_train_epoch_end`` *after* the module's
    and after every other callback's: the end-of-epoch checkpoint holds that epoch's values
    (training loss, accuracy, epoch time), not the previous epoch's."""

    def __init__(self, dirpath: Path, every_n_steps: int | None = None,
                 identity: dict[str, Any] | None = None):
        self.path = Path(dirpath) / "last.ckpt"
        self.every_n_steps = every_n_steps
        self.identity = identity

    def save(self, trainer) -> None:
        trainer.save_checkpoint(self.path)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self.identity is not None:
            from .run_identity import CHECKPOINT_KEY
            checkpoint[CHECKPOINT_KEY] = self.identity

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (self.every_n_steps and trainer.global_step % self.every_n_steps == 0
                and batch_idx + 1 < trainer.num_training_batches):
            self.save(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.save(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # SIGTERM/SIGUSR1/SIGINT: Lightning stops between two batches; save that consistent state.
        if isinstance(exception, SIGTERMException):
            self.save(trainer)


class StopAtSafePoint(Callback):
    """Lightning callback: turn a pending signal into Lightning's orderly stop at a point where
    the checkpoint Lightning then saves (``LastCheckpoint.on_exception``) is consistent."""

    def __init__(self, lifetime: ProcessLifetime | None = None):
        self.lifetime = lifetime or LIFETIME

    def _stop(self, trainer) -> None:
        trainer._signal_connector.received_sigterm = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Not on an epoch's last batch: a checkpoint there resumes past the epoch's evaluation
        # and end-of-epoch hooks (Lightning treats the epoch as finished). Stop at epoch end then.
        if self.lifetime.signum is not None and batch_idx + 1 < trainer.num_training_batches:
            self._stop(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.lifetime.signum is not None:
            self._stop(trainer)


class _ResumableWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing metrics.csv; a resumed run must keep the rows it
    logged before its checkpoint (and drop the ones after it, which the resumed run logs again)."""

    def __init__(self, log_dir: str, resume_step: int | None) -> None:
        self.resume_step = resume_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if self.resume_step is None or not path.is_file():
            return super()._check_log_dir_exists()
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            keys = list(reader.fieldnames or [])
            rows = [r for r in reader if r.get("step") not in (None, "")
                    and int(float(r["step"])) < self.resume_step]
        tmp = path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)
        self.metrics_keys = keys


class ResumableCSVLogger(CSVLogger):
    """``<run dir>/csv/metrics.csv`` that survives ``ckpt_path=last``."""

    def __init__(self, *args, resume_step: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.resume_step = resume_step

    @property
    def experiment(self):
        if self._experiment is None:
            self._experiment = _ResumableWriter(self.log_dir, self.resume_step)
        return self._experiment


def build_loggers(cfg, run_dir: Path, resume_step: int | None = None) -> list:
    """``csv`` is always kept when any logger is on: the report draws its curves from it."""
    from lightning.pytorch.loggers import TensorBoardLogger
    name = cfg.get("name", "csv")
    if name not in LOGGERS:
        raise ConfigError(f"unknown logger {name!r}; choose one of {', '.join(LOGGERS)} (e.g. logger=csv)")
    if name == "none":
        return []
    loggers: list = [ResumableCSVLogger(save_dir=str(run_dir), name="csv", version="",
                                        resume_step=resume_step)]
    if name == "tensorboard":
        loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version="",
                                         default_hp_metric=False))  # finals: run_logging
    elif name == "wandb":
        from lightning.pytorch.loggers import WandbLogger
        loggers.append(WandbLogger(project=cfg.get("project", "sharpbench"), save_dir=str(run_dir),
                                   name=cfg.get("run_name"), group=cfg.get("group"),
                                   offline=bool(cfg.get("offline", False)),
                                   tags=list(cfg.get("tags", []) or [])))
    return loggers


def resolve_ckpt_path(value: Any, run_dir: Path) -> tuple[str | None, dict | None]:
    """``null``: start fresh; ``last``: resume ``<run_dir>/checkpoints/last.ckpt`` if it exists
    (a fresh start otherwise, so requeued and re-run sweep jobs just work), falling back to
    ``last.prev.ckpt`` when it cannot be read; else a path. Returns the path and the loaded
    checkpoint (read once here: its step, identity and finiteness are checked before training)."""
    if value in (None, "", "null", "none"):
        return None, None
    if value == "last":
        last = run_dir / "checkpoints" / "last.ckpt"
        candidates = [last, previous_path(last)]
        if not any(p.exists() for p in candidates):
            log.info("ckpt_path=last: no checkpoint at %s, starting from scratch (to resume an "
                     "earlier run, point hydra.run.dir at that run's folder)", last)
            return None, None
        path, checkpoint = load_resumable(candidates)
        log.info("resuming from %s (step %s)", path, checkpoint.get("global_step"))
        return str(path), checkpoint
    path = Path(str(value)).expanduser()
    if not path.exists():
        raise ConfigError(f"ckpt_path={value}: no such file. Give the path of a .ckpt file, or "
                          "ckpt_path=last with hydra.run.dir=<the run's folder>")
    path, checkpoint = load_resumable([path])
    return str(path), checkpoint


def resolve_precision(value: str) -> str:
    """``auto``: bf16-mixed on a GPU that supports it, else full precision."""
    value = str(value)
    if value == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return "bf16-mixed"
        return "32"
    return value

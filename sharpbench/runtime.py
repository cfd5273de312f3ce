"""Run plumbing: atomic checkpoints, loggers, checkpoint paths and the precision choice."""
from __future__ import annotations

import csv
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from .checks import ConfigError

log = logging.getLogger("sharpbench")

LOGGERS = ("csv", "wandb", "tensorboard", "none")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints are written to a temporary file in the same folder and renamed into place, so
    a run killed while saving never leaves a truncated ``last.ckpt``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            torch.save(checkpoint, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


class LastCheckpoint(Checkpoint):
    """Keep one resumable ``<run dir>/checkpoints/last.ckpt``: written (atomically) at the end of
    every epoch, and every ``every_n_steps`` optimizer steps when set (resume after a kill).

    A ``Checkpoint`` subclass, so Lightning runs its ``on_train_epoch_end`` *after* the module's
    and after every other callback's: the end-of-epoch checkpoint holds that epoch's values
    (training loss, accuracy, epoch time), not the previous epoch's."""

    def __init__(self, dirpath: Path, every_n_steps: int | None = None):
        self.path = Path(dirpath) / "last.ckpt"
        self.every_n_steps = every_n_steps

    def save(self, trainer) -> None:
        trainer.save_checkpoint(self.path)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self.save(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.save(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # SIGTERM/SIGUSR1: Lightning stops between two batches; save that consistent state.
        if isinstance(exception, SIGTERMException):
            self.save(trainer)


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


def checkpoint_step(path: str | None) -> int | None:
    """The global step a checkpoint was saved at (None without one)."""
    if path is None:
        return None
    return int(torch.load(path, map_location="cpu", weights_only=False).get("global_step", 0))


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


def resolve_ckpt_path(value: Any, run_dir: Path) -> str | None:
    """``null``: start fresh; ``last``: resume ``<run_dir>/checkpoints/last.ckpt`` if it exists
    (a fresh start otherwise, so requeued and re-run sweep jobs just work); else a path."""
    if value in (None, "", "null", "none"):
        return None
    if value == "last":
        last = run_dir / "checkpoints" / "last.ckpt"
        if last.exists():
            log.info("resuming from %s", last)
            return str(last)
        log.info("ckpt_path=last: no checkpoint at %s, starting from scratch (to resume an "
                 "earlier run, point hydra.run.dir at that run's folder)", last)
        return None
    path = Path(str(value)).expanduser()
    if not path.exists():
        raise ConfigError(f"ckpt_path={value}: no such file. Give the path of a .ckpt file, or "
                          "ckpt_path=last with hydra.run.dir=<the run's folder>")
    return str(path)


def resolve_precision(value: str) -> str:
    """``auto``: bf16-mixed on a GPU that supports it, else full precision."""
    value = str(value)
    if value == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return "bf16-mixed"
        return "32"
    return value

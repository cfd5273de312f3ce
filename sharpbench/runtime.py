"""Run plumbing: what a run does with its folder (``settle``), atomic checkpoints, loggers,
checkpoint paths and the precision choice."""
from __future__ import annotations

import csv
import errno
import io
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback, Checkpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import OmegaConf

from . import compat
from .checks import ConfigError
from .data.sources import CIFAR_NUM_CLASSES
from .fileio import atomic_file, atomic_torch_save
from .lifecycle import LIFETIME, ProcessLifetime, StartupError
from .models import build_model
from .module import DivergenceError
from .record import METRICS_FILE, code_segments, continued_by_other_code, read_record
from .run_identity import (CHECKPOINT_KEY, WAYS_OUT, IdentityMismatch, as_found,
                           check_on_config_change, identity, refuse, same_run, stored_identity)

log = logging.getLogger("sharpbench")

LOGGERS = ("csv", "wandb", "tensorboard", "none")


class NonFiniteCheckpoint(DivergenceError):
    """A checkpoint about to be written holds inf/NaN weights or optimizer state."""


class DiskFull(OSError):
    """A checkpoint could not be written for lack of space (``errno`` ENOSPC); the previous one
    is intact."""


def is_disk_full(err: BaseException) -> bool:
    """``OSError`` ENOSPC, or what ``torch.save`` raises when its zip writer hits a full disk
    (``RuntimeError: [enforce fail at inline_container.cc] . unexpected pos``)."""
    if isinstance(err, OSError):
        return err.errno == errno.ENOSPC
    text = str(err)
    return isinstance(err, RuntimeError) and ("unexpected pos" in text or "No space left" in text)


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
        try:
            atomic_torch_save(checkpoint, path, fsync=True, previous=previous_path(path))
        except (OSError, RuntimeError) as err:
            if not is_disk_full(err):
                raise
            raise DiskFull(errno.ENOSPC,
                           f"disk full while writing the checkpoint of step "
                           f"{checkpoint.get('global_step')} ({err}); {path.name} keeps the last "
                           "one written. Free space (or move the run folder), then resume with "
                           "ckpt_path=last", str(path)) from err

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
                 identity: dict[str, Any] | None = None,
                 segments: list[dict[str, Any]] | None = None):
        self.path = Path(dirpath) / "last.ckpt"
        self.every_n_steps = every_n_steps
        self.identity = identity
        self.segments = segments

    def save(self, trainer) -> None:
        trainer.save_checkpoint(self.path)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self.identity is not None:
            checkpoint[CHECKPOINT_KEY] = self.identity
        if self.segments is not None:
            checkpoint[SEGMENTS_KEY] = self.segments

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
    """Lightning callback: keep the process's signal handler ours during ``fit`` and ``test``
    (Lightning installs its own SIGTERM handler when either starts, and would stop mid-evaluation),
    and turn a pending signal into Lightning's orderly stop at a point where the checkpoint
    Lightning then saves (``LastCheckpoint.on_exception``) is consistent."""

    def __init__(self, lifetime: ProcessLifetime | None = None):
        self.lifetime = lifetime or LIFETIME

    def on_train_start(self, trainer, pl_module) -> None:
        self.lifetime.reassert()

    def on_test_start(self, trainer, pl_module) -> None:
        self.lifetime.reassert()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Not on an epoch's last batch: a checkpoint there resumes past the epoch's evaluation
        # and end-of-epoch hooks (Lightning treats the epoch as finished). Stop at epoch end then.
        if self.lifetime.signum is not None and batch_idx + 1 < trainer.num_training_batches:
            compat.request_graceful_stop(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.lifetime.signum is not None:
            compat.request_graceful_stop(trainer)


KEPT_ASIDE = ".before-resume"  # metrics.csv's rows while the resumed writer starts


def kept_rows(path: Path, resume_step: int) -> tuple[list[str], list[dict]] | None:
    """The header and the rows of a CSV log logged before ``resume_step`` (``None``: no log)."""
    aside = path.with_name(path.name + KEPT_ASIDE)
    source = path if path.is_file() else aside if aside.is_file() else None
    if source is None:
        return None
    with open(source, newline="") as f:
        reader = csv.DictReader(f)
        keys = list(reader.fieldnames or [])
        rows = [r for r in reader if r.get("step") not in (None, "")
                and int(float(r["step"])) < resume_step]
    return keys, rows


def resumed_writer(log_dir: str, resume_step: int | None) -> ExperimentWriter:
    """Lightning's CSV writer deletes an existing metrics.csv; a resumed run keeps the rows it
    logged before its checkpoint (and drops the ones after it, which the resumed run logs again).
    The file is hard-linked aside while the writer starts, so a kill then loses no row."""
    path = Path(log_dir) / ExperimentWriter.NAME_METRICS_FILE
    kept = kept_rows(path, resume_step) if resume_step is not None else None
    if kept is None:
        return ExperimentWriter(log_dir)
    aside = path.with_name(path.name + KEPT_ASIDE)
    if path.is_file() and not aside.exists():
        os.link(path, aside)
    with warnings.catch_warnings():  # "exists and is not empty": it is meant to
        warnings.simplefilter("ignore")
        writer = ExperimentWriter(log_dir)
    keys, rows = kept
    buffer = io.StringIO()
    table = csv.DictWriter(buffer, fieldnames=keys)
    table.writeheader()
    table.writerows(rows)
    with atomic_file(path, "w", newline="") as f:
        f.write(buffer.getvalue())
    aside.unlink(missing_ok=True)
    writer.metrics_keys = keys
    return writer


class ResumableCSVLogger(CSVLogger):
    """``<run dir>/csv/metrics.csv`` that survives ``ckpt_path=last``."""

    def __init__(self, *args, resume_step: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.resume_step = resume_step

    @property
    def experiment(self):
        if self._experiment is None:
            self._experiment = resumed_writer(self.log_dir, self.resume_step)
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
        return str(path), checkpoint  # "resuming from" is said once the folder is claimed
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


# ------------------------------------------------------------------- what to do with the folder
SEGMENTS_KEY = "sharpbench_code_segments"  # record.code_segments of the run so far


class Settled:
    """What ``settle`` decided: run ``identity`` in ``run_dir`` from ``ckpt_path`` (or from
    scratch), or return ``skip`` (the completed record of this very run)."""

    def __init__(self, identity: dict[str, Any], run_dir: Path, ckpt_path: str | None = None,
                 checkpoint: dict | None = None, skip: dict | None = None):
        self.identity, self.run_dir, self.skip = identity, run_dir, skip
        self.ckpt_path, self.checkpoint = ckpt_path, checkpoint

    @property
    def resume_step(self) -> int | None:
        return int(self.checkpoint.get("global_step", 0)) if self.checkpoint is not None else None

    def code_segments(self) -> list[dict[str, Any]]:
        """The run's training segments, this process's included (``record.code_segments``);
        says so when the run continues with code other than what trained it so far."""
        previous = self.checkpoint.get(SEGMENTS_KEY) if self.checkpoint is not None else None
        segments = code_segments(previous, self.resume_step)
        if continued_by_other_code(segments):
            before = sorted({str(s.get("code_version") or "an unrecorded version") for s in segments[:-1]})
            log.warning("this run was trained up to step %s by %s and continues with %s: its "
                        "record says so (code_segments, continued_by_other_code)",
                        self.resume_step, ", ".join(before), segments[-1]["code_version"])
        return segments

    def checkpoint_io(self) -> AtomicCheckpointIO:
        """The run's checkpoint IO, holding the checkpoint read here (Lightning reuses it)."""
        io_ = AtomicCheckpointIO()
        if self.checkpoint is not None:
            io_.preloaded = (self.ckpt_path, self.checkpoint)
        return io_


def settle(cfg, run_dir: Path) -> Settled:
    """Check the folder's completed record and checkpoint against ``cfg``: the same run is
    skipped (completed) or resumed; another configuration's is refused naming the keys that
    differ (``run_identity``). The checkpoint is read once here, its step and identity checked
    before training."""
    check_on_config_change(cfg.get("on_config_change"))
    ident = identity(cfg)
    run_dir = Path(run_dir)
    previous = read_record(run_dir / METRICS_FILE)
    if previous and previous.get("status") == "completed":
        found = previous.get("config") if isinstance(previous.get("config"), dict) else {}
        if same_run(found, ident):
            return Settled(as_found(found, ident), run_dir, skip=previous)
        raise refuse(found, ident, f"{run_dir}/{METRICS_FILE} (completed)")
    ckpt_path, checkpoint = resolve_ckpt_path(cfg.get("ckpt_path"), run_dir)
    if checkpoint is None:
        return Settled(ident, run_dir)
    found = stored_identity(checkpoint)
    if found is None:
        check_unidentified(cfg, checkpoint, ckpt_path)
        log.warning("%s has no stored run identity (written by an older sharpbench): only its "
                    "architecture, parameter shapes and optimizer could be checked against this "
                    "config", ckpt_path)
        return Settled(ident, run_dir, ckpt_path, checkpoint)
    if same_run(found, ident):
        return Settled(as_found(found, ident), run_dir, ckpt_path, checkpoint)
    raise refuse(found, ident, f"checkpoint {ckpt_path}")


def check_unidentified(cfg, checkpoint: dict[str, Any], ckpt_path: str | None) -> None:
    """A checkpoint without a stored identity (older versions): check what can be checked, the
    architecture, the parameter names and shapes, and the optimizer, and refuse one that does not
    fit this config with a message (instead of ``size mismatch`` or ``KeyError`` in Lightning)."""
    problems = []
    hp = checkpoint.get("hyper_parameters") or {}
    model_name, old_model = str(cfg.model.name), (hp.get("model_cfg") or {}).get("name")
    if old_model and old_model != model_name:
        problems.append(f"model {old_model!r} (this config: {model_name!r})")
    opt_name, old_opt = str(cfg.optimizer.name), (hp.get("optimizer_cfg") or {}).get("name")
    if old_opt and old_opt != opt_name:
        problems.append(f"optimizer {old_opt!r} (this config: {opt_name!r})")
    states = checkpoint.get("optimizer_states") or []
    if not old_opt and states and isinstance(states[0], dict):
        wraps = "base_optimizer" in states[0]
        if wraps != (cfg.optimizer.get("base") is not None):
            problems.append("a sharpness-aware optimizer's state" if wraps else
                            "a one-pass optimizer's state (no base_optimizer)")
    if not problems:
        problems += parameter_differences(cfg, checkpoint.get("state_dict") or {})
    if problems:
        raise IdentityMismatch(
            f"checkpoint {ckpt_path} has no stored run identity (written by an older sharpbench) "
            f"and does not fit this configuration: it holds {'; '.join(problems[:6])}"
            f"{' …' if len(problems) > 6 else ''}. Resume it with the settings it was trained "
            f"with. {WAYS_OUT}")


def parameter_differences(cfg, state_dict: dict[str, Any]) -> list[str]:
    """The network's parameters that the checkpoint lacks, has extra or holds in another shape."""
    num_classes = (CIFAR_NUM_CLASSES.get(str(cfg.dataset.name))
                   or int(cfg.dataset.get("num_classes") or 10))
    try:
        model = build_model(**{**OmegaConf.to_container(cfg.model, resolve=True),
                               "num_classes": num_classes})
    except Exception:  # the config check reports a bad model config
        return []
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {k[len("model."):]: tuple(v.shape) for k, v in state_dict.items()
            if k.startswith("model.") and hasattr(v, "shape")}
    out = [f"{k} of shape {list(have[k])} (this config: {list(want[k])})"
           for k in sorted(want.keys() & have.keys()) if want[k] != have[k]]
    missing, extra = sorted(want.keys() - have.keys()), sorted(have.keys() - want.keys())
    if missing:
        out.append(f"no {', '.join(missing[:3])}{' …' if len(missing) > 3 else ''}")
    if extra:
        out.append(f"extra {', '.join(extra[:3])}{' …' if len(extra) > 3 else ''}")
    return out

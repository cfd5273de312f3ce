"""Train one model with one optimizer: ``python -m sharpbench.train optimizer=sam dataset=cifar10``.

compose (Hydra) → check → build data, model, module, trainer → fit → test → metrics.json
"""
from __future__ import annotations

import logging
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from . import checks, compose_guard
from .data import CIFARDataModule
from .ddp_launch import sweep_job_scope
from .gpu_pool import pin_gpu_for_this_process
from .models import build_model
from .module import DivergenceError, SharpnessModule
from .record import RunTimer, build_record, read_metrics, write_metrics, config_hash
from .run_logging import EvalProgressBar, finish_loggers, log_hyperparameters
from .runtime import AtomicCheckpointIO, LastCheckpoint, build_loggers, checkpoint_step, resolve_ckpt_path, resolve_precision

log = logging.getLogger("sharpbench")

# Keys that say where or how a run is written, not what it computes: excluded from its hash.
NON_IDENTITY_KEYS = ("ckpt_path", "run_name", "sweep_name", "logger", "sweep")


def identity(cfg: DictConfig) -> dict[str, Any]:
    """The part of the resolved config that defines the run's results."""
    keep = [k for k in cfg if k not in NON_IDENTITY_KEYS and k != "hydra"]
    plain = OmegaConf.to_container(OmegaConf.masked_copy(cfg, keep), resolve=True)
    plain.get("trainer", {}).pop("enable_progress_bar", None)
    return plain


def summary(cfg: DictConfig) -> dict[str, Any]:
    return {"method": cfg.optimizer.name, "dataset": cfg.dataset.name, "model": cfg.model.name,
            "seed": int(cfg.seed), "epochs": int(cfg.trainer.max_epochs),
            "batch_size": int(cfg.dataset.batch_size), "lr": cfg.optimizer.get("lr"),
            "rho": cfg.optimizer.get("rho"), "base_optimizer": cfg.optimizer.get("base"),
            "run_name": cfg.get("run_name")}


def build_trainer(cfg: DictConfig, run_dir: Path, timer: RunTimer,
                  resume_step: int | None = None) -> L.Trainer:
    t = cfg.trainer
    last = LastCheckpoint(run_dir / "checkpoints", t.get("checkpoint_every_n_steps") or None)
    bar = [EvalProgressBar()] if t.get("enable_progress_bar", True) else []
    return L.Trainer(
        accelerator=t.accelerator, devices=t.devices, strategy=t.strategy,
        num_nodes=t.get("num_nodes", 1),
        precision="32-true",  # mixed precision is the module's job (see sharpbench.module)
        max_epochs=t.max_epochs, limit_train_batches=t.get("limit_train_batches"),
        limit_val_batches=t.get("limit_val_batches"), limit_test_batches=t.get("limit_test_batches"),
        check_val_every_n_epoch=t.get("check_val_every_n_epoch", 1),
        log_every_n_steps=t.log_every_n_steps, deterministic=t.get("deterministic", False),
        enable_progress_bar=t.get("enable_progress_bar", True), enable_model_summary=False,
        num_sanity_val_steps=0, default_root_dir=str(run_dir),
        logger=build_loggers(cfg.logger, run_dir, resume_step), callbacks=[timer, last, *bar], enable_checkpointing=True,
        plugins=[AtomicCheckpointIO()])


def train(cfg: DictConfig, run_dir: Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Run (or resume, or skip) one training run in ``run_dir``; returns its metrics record."""
    started = time.time()
    overrides = list(overrides or [])
    checks.check_config(cfg)  # every key against the schema, before anything else reads it
    ident = identity(cfg)
    previous = read_metrics(run_dir)
    if previous and previous.get("status") == "completed" and previous.get("config_hash") == config_hash(ident):
        log.info("skipping %s: already completed (metrics.json, same config)", run_dir)
        return previous

    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    precision = resolve_precision(cfg.trainer.precision)
    cuda = torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda")
    channels_last = bool(cfg.trainer.get("channels_last", False)) and cuda
    data = CIFARDataModule(**OmegaConf.to_container(cfg.dataset, resolve=True),
                           seed=int(cfg.seed), channels_last=channels_last)
    data.prepare_data()
    data.setup("fit")
    checks.check_data(cfg, data)

    model = build_model(cfg.model.name, num_classes=data.num_classes,
                        **{k: v for k, v in cfg.model.items() if k != "name"})
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    module = SharpnessModule(
        model, OmegaConf.to_container(cfg.optimizer, resolve=True),
        OmegaConf.to_container(cfg.schedule, resolve=True),
        num_classes=data.num_classes, epochs=int(cfg.trainer.max_epochs), precision=precision,
        label_smoothing=float(cfg.get("label_smoothing", 0.0)),
        grad_clip=float(cfg.trainer.get("gradient_clip_val") or 0.0),
        class_counts=data.train_class_counts,
        fisher_batch_size=int(cfg.optimizer.get("fisher_batch_size") or 64),
        sync_perturbation=bool(cfg.trainer.get("sync_perturbation", False)),
        compile=bool(cfg.trainer.get("compile", False)))

    timer = RunTimer()
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), run_dir)
    trainer = build_trainer(cfg, run_dir, timer, checkpoint_step(ckpt_path))
    log_hyperparameters(trainer.loggers, ident)
    status, error = "completed", None
    with preemption_handler(trainer):
        try:
            trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
            trainer.test(module, datamodule=data, verbose=False)
        except SIGTERMException:
            status = "preempted"
            log.warning("stopped by a signal; checkpoint saved. Resume with ckpt_path=last "
                        "hydra.run.dir=%s", run_dir)
        except DivergenceError as err:
            status, error = "diverged", str(err)
            log.error("%s", err)
    if status == "completed" and trainer.interrupted:
        status = "interrupted"
    record = build_record(cfg_summary=summary(cfg), module=module, timer=timer, trainer=trainer,
                          status=status, overrides=overrides, config=ident, started_at=started,
                          error=error)
    record.update(group_accuracy(module, data))
    if trainer.is_global_zero:
        write_metrics(run_dir, record)
        print(one_line_summary(record, run_dir))
    finish_loggers(trainer.loggers, record, ident)
    return record


def group_accuracy(module: SharpnessModule, data) -> dict[str, Any]:
    """Many/medium/few-shot test accuracy (long-tailed training sets only)."""
    res = module.eval_results.get("test")
    if not res or not getattr(data, "imbalanced", False):
        return {}
    from .data import class_groups
    out = {}
    counts = torch.tensor(res["count"])
    per_class = torch.tensor(res["per_class_acc"])
    for name, classes in class_groups(data.train_class_counts).items():
        if len(classes):
            w = counts[classes].double()
            out[f"test_acc_{name}"] = float((per_class[classes].double() * w).sum() / w.sum())
    return out


def one_line_summary(r: dict[str, Any], run_dir: Path) -> str:
    def fmt(v, spec):
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)
    return (f"[sharpbench] {r['status']}: {r['method']} on {r['dataset']}/{r['model']} seed {r['seed']}"
            f" | test acc {fmt(r.get('test_acc'), '.2f')}{'%' if r.get('test_acc') is not None else ''}"
            f" loss {fmt(r.get('test_loss'), '.4f')}"
            f" | {fmt(r.get('wall_time_s'), '.1f')} s train, {fmt(r.get('passes_per_step'), '.2f')} passes/step"
            f" | {run_dir}/metrics.json")


class preemption_handler:
    """SIGTERM and SIGUSR1 (SLURM's warning signal) end the run between two batches with a
    checkpoint (``LastCheckpoint.on_exception``), so a requeued job resumes with ``ckpt_path=last``.

    Lightning already turns SIGTERM into that orderly stop; SIGUSR1 is routed to the same path."""

    def __init__(self, trainer: L.Trainer):
        self.trainer = trainer
        self.previous = None

    def _handle(self, signum, frame) -> None:
        log.warning("received signal %d: checkpointing and stopping after this batch", signum)
        self.trainer._signal_connector.received_sigterm = True

    def __enter__(self) -> "preemption_handler":
        import threading
        if hasattr(signal, "SIGUSR1") and threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGUSR1, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGUSR1, self.previous)


def run_dir_of_hydra() -> Path:
    from hydra.core.hydra_config import HydraConfig
    return Path(HydraConfig.get().runtime.output_dir)


def task_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig
    return list(HydraConfig.get().overrides.task)


compose_guard.install()  # Hydra's own failures (unknown key/option) become invalid_config records


@compose_guard.entry_point  # --help from the schema; composition failures recorded, exit 2
@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> dict[str, Any] | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    run_dir = run_dir_of_hydra()
    sweep = cfg.get("sweep") or {}
    if multirun:  # local_parallel: this worker's GPU from sweep.gpu_pool, before CUDA starts
        pin_gpu_for_this_process(sweep.get("gpu_pool"), HydraConfig.get().sweep.dir,
                                 sweep.get("jobs_per_gpu", 1))
    try:
        compose_guard.raise_if_failed(cfg)  # a command line Hydra could not compose
        with sweep_job_scope():  # DDP ranks run this job only; env + process group restored after
            record = train(cfg, run_dir, task_overrides())
        if record.get("status") == "diverged" and not multirun:
            sys.exit(1)
        objective = sweep.get("objective")
        return record.get(objective) if objective else record
    except checks.config_errors() as err:
        log.error("invalid configuration: %s", err)
        write_failure(cfg, run_dir, "invalid_config", str(err))
        if not multirun:
            sys.exit(2)
    except Exception as err:  # a failed job is recorded, and a sweep goes on
        log.exception("run failed")
        write_failure(cfg, run_dir, "failed", f"{type(err).__name__}: {err}")
        if not multirun:
            raise
    return None


def write_failure(cfg: DictConfig, run_dir: Path, status: str, error: str) -> None:
    try:
        record = {**summary(cfg), "status": status, "error": error,
                  "config": identity(cfg), "config_hash": config_hash(identity(cfg)),
                  "overrides": task_overrides(), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    except Exception:  # the config itself may be what is broken
        record = {"status": status, "error": error}
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        write_metrics(run_dir, record)


if __name__ == "__main__":
    main()

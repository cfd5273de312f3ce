"""Train one model with one optimizer: ``python -m sharpbench.train optimizer=sam dataset=cifar10``.

compose (Hydra) → check → build data, model, module, trainer → fit → test → metrics.json
"""
from __future__ import annotations

if __name__ == "__main__":  # one signal handler for the whole process, from before the imports;
    # a signal now is only noted, and ends the process at main()'s first line (sharpbench.lifecycle)
    from sharpbench.signals import LIFETIME as _LIFETIME
    _LIFETIME.install(phase="early")

import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from .averaging import WeightAveraging, build_averaging
from . import checks, console, lifecycle, preflight
from .data import CIFARDataModule, class_groups
from .ddp_launch import sweep_job_scope
from .export import export_model
from .gpu_pool import pin_gpu_for_this_process
from .models import build_model
from .lifecycle import LIFETIME
from .module import DivergenceError, SharpnessModule
from .record import RunTimer, build_record, config_hash, write_record
from .data_location import data_source
from .run_identity import identity
from .run_logging import abort_loggers, finish_loggers, log_hyperparameters
from .runtime import (AtomicCheckpointIO, DiskFull, LastCheckpoint, StopAtSafePoint, build_loggers,
                      resolve_precision, settle)
from .sharpness.monitor import build_monitor
from .sweep_dirs import register_resolver

register_resolver()  # ${sharpbench_job_dir:...}: sweep job folder names (conf/train.yaml)

log = logging.getLogger("sharpbench")

def summary(cfg: DictConfig) -> dict[str, Any]:
    return {"method": cfg.optimizer.name, "dataset": cfg.dataset.name, "model": cfg.model.name,
            "seed": int(cfg.seed), "epochs": int(cfg.trainer.max_epochs),
            "batch_size": int(cfg.dataset.batch_size), "lr": cfg.optimizer.get("lr"),
            "rho": cfg.optimizer.get("rho"), "base_optimizer": cfg.optimizer.get("base"),
            "run_name": cfg.get("run_name")}


def build_trainer(cfg: DictConfig, run_dir: Path, timer: RunTimer,
                  resume_step: int | None = None, ident: dict[str, Any] | None = None,
                  checkpoint_io: AtomicCheckpointIO | None = None,
                  segments: list[dict[str, Any]] | None = None) -> L.Trainer:
    t = cfg.trainer
    last = LastCheckpoint(run_dir / "checkpoints", t.get("checkpoint_every_n_steps") or None,
                          identity=ident, segments=segments)
    bar = [console.progress_bar()] if t.get("enable_progress_bar", True) else []
    trainer = L.Trainer(
        accelerator=t.accelerator, devices=t.devices, strategy=t.strategy,
        num_nodes=t.get("num_nodes", 1),
        precision="32-true",  # mixed precision is the module's job (see sharpbench.module)
        max_epochs=t.max_epochs, limit_train_batches=t.get("limit_train_batches"),
        limit_val_batches=t.get("limit_val_batches"), limit_test_batches=t.get("limit_test_batches"),
        check_val_every_n_epoch=t.get("check_val_every_n_epoch", 1),
        log_every_n_steps=t.log_every_n_steps, deterministic=t.get("deterministic", False),
        enable_progress_bar=t.get("enable_progress_bar", True), enable_model_summary=False,
        num_sanity_val_steps=0, default_root_dir=str(run_dir),
        # Lightning evaluates under no_grad during fit but under inference_mode in test(); a
        # compiled forward guards on that, so it would compile a third graph for the test pass.
        inference_mode=not bool(t.get("compile", False)),
        logger=build_loggers(cfg.logger, run_dir, resume_step),
        callbacks=[timer, last, StopAtSafePoint(), *bar, *build_monitor(cfg, run_dir),
                   *build_averaging(cfg)], enable_checkpointing=True,
        plugins=[checkpoint_io or AtomicCheckpointIO()])
    return trainer


def train(cfg: DictConfig, run_dir: Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Run (or resume, or skip) one training run in ``run_dir``; returns its metrics record.

    The folder's completed record and checkpoint are first checked against ``cfg``
    (``sharpbench.runtime.settle``); the folder is then claimed for the run (lock, write check,
    cleanup of interrupted saves, signal handler: ``sharpbench.lifecycle``). A signal before
    training stops the run at the next ``LIFETIME.stop_here()``."""
    started = time.time()
    overrides = list(overrides or [])
    checks.check_config(cfg)  # every key against the schema, before anything else reads it
    settled = settle(cfg, Path(run_dir))
    if settled.skip is not None:
        log.info("skipping %s: already completed (metrics.json, same config)", settled.run_dir)
        return settled.skip
    LIFETIME.stop_here()  # before the folder is claimed: main() records the stop

    with lifecycle.claim_folder(settled.run_dir):
        try:
            LIFETIME.stop_here()  # the folder is claimed: the stop is recorded with its resume command
            return _train(cfg, settled, overrides, started)
        except lifecycle.Interrupted as stop:  # before training began (data, model): no checkpoint
            return lifecycle.record_early_stop(summary(cfg), settled, overrides, stop.signum)


def _train(cfg: DictConfig, settled, overrides: list[str], started: float) -> dict[str, Any]:
    run_dir, ident, ckpt_path = settled.run_dir, settled.identity, settled.ckpt_path
    if ckpt_path is not None:  # said only now that the folder is this process's
        log.info("resuming from %s (step %s)", ckpt_path, settled.resume_step)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    precision = resolve_precision(cfg.trainer.precision)
    cuda = torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda")
    channels_last = bool(cfg.trainer.get("channels_last", False)) and cuda
    dataset = OmegaConf.to_container(cfg.dataset, resolve=True)
    source = data_source(dataset)
    data = CIFARDataModule(**dataset, seed=int(cfg.seed), channels_last=channels_last)
    data.prepare_data()
    data.setup("fit")
    checks.check_data(cfg, data)
    LIFETIME.stop_here()

    model_cfg = {**OmegaConf.to_container(cfg.model, resolve=True), "num_classes": data.num_classes}
    model = build_model(**model_cfg)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    LIFETIME.stop_here()
    module = SharpnessModule(
        model, OmegaConf.to_container(cfg.optimizer, resolve=True),
        OmegaConf.to_container(cfg.schedule, resolve=True),
        num_classes=data.num_classes, epochs=int(cfg.trainer.max_epochs), precision=precision,
        label_smoothing=float(cfg.get("label_smoothing", 0.0)),
        grad_clip=float(cfg.trainer.get("gradient_clip_val") or 0.0),
        class_counts=data.train_class_counts,
        sync_perturbation=bool(cfg.trainer.get("sync_perturbation", False)),
        compile=bool(cfg.trainer.get("compile", False)),
        micro_batches=int(cfg.trainer.get("micro_batches", 1)),
        model_cfg=model_cfg, run_config=ident,  # saved in checkpoints: load_from_checkpoint works
        data_source=source)  # where the data came from, beside the identity (eval, analyze)

    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        console.announce_start(cfg, data, model, run_dir, on_gpu=cuda, precision=precision)
    timer = RunTimer()
    segments = settled.code_segments()  # which code trained which steps
    trainer = build_trainer(cfg, run_dir, timer, settled.resume_step, ident, settled.checkpoint_io(),
                            segments)
    log_hyperparameters(trainer.loggers, ident)
    LIFETIME.stop_here()  # the last safe point before training
    status, error = "completed", None
    with LIFETIME.watching(trainer):  # signals: see sharpbench.signals
        try:
            trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
            LIFETIME.enter("test")  # a signal that came during or after fit stops the run here
            trainer.test(module, datamodule=data, verbose=False)
        except (SIGTERMException, lifecycle.Interrupted):
            status = LIFETIME.stop_status()
            log.warning("stopped by a signal; resume with:\n  %s",
                        lifecycle.resume_command(run_dir, overrides))
        except DivergenceError as err:
            status, error = "diverged", str(err)
            log.error("%s", err)
        except BaseException:
            abort_loggers(trainer.loggers)  # a W&B run is closed as failed, not left running
            raise
    if status == "completed" and trainer.interrupted:
        status = "interrupted"
    averaged = {}
    if status == "completed":   # SWA / EMA of the weights, beside the trained ones
        for cb in trainer.callbacks:
            if isinstance(cb, WeightAveraging):
                averaged.update(cb.evaluate(trainer, module, data))
    record = build_record(cfg_summary=summary(cfg), module=module, timer=timer, trainer=trainer,
                          status=status, overrides=overrides, config=ident, started_at=started,
                          error=error, segments=segments)
    record.update(group_accuracy(module, data))
    record.update(averaged)
    record["data_source"] = source
    lifecycle.complete_record(record, run_dir, overrides)  # diverged: no accuracy; stopped: resume command
    if trainer.is_global_zero:
        if status == "completed":
            export_model(module.model, run_dir)  # model.pt: bare weights for build_model(...)
        write_record(run_dir, record)
        log.info("%s", one_line_summary(record, run_dir))  # console and train.log
    finish_loggers(trainer.loggers, record, ident)
    return record


def group_accuracy(module: SharpnessModule, data) -> dict[str, Any]:
    """Many/medium/few-shot test accuracy (long-tailed training sets only)."""
    res = module.eval_results.get("test")
    if not res or not getattr(data, "imbalanced", False):
        return {}
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
            f" | {run_dir}/metrics.json"
            + (f"\n[sharpbench] the machine was overloaded while this run trained (1-minute load "
               f"average up to {r['load_avg_max']:.1f} on {os.cpu_count()} CPUs): its times measure "
               f"the machine as much as the method" if r.get("overloaded") else ""))


def run_dir_of_hydra() -> Path:
    from hydra.core.hydra_config import HydraConfig
    return Path(HydraConfig.get().runtime.output_dir)


def task_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig
    return list(HydraConfig.get().overrides.task)


def run(cfg: DictConfig) -> dict[str, Any] | None:
    """The Hydra task: one run (one job of a sweep). ``main`` is its command. A launcher that
    runs jobs in other processes (joblib) pickles this function by reference, so a job there
    shares this module's state (the one signal handler) instead of a pickled copy of it."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    LIFETIME.install()  # kept until the process exits
    LIFETIME.exit_if_stopped_early()  # a signal during the start-up imports: exit, nothing claimed
    LIFETIME.phase = "startup"
    console.quiet_libraries()  # Lightning's banners and library warnings: train.log only
    run_dir = run_dir_of_hydra()
    sweep = cfg.get("sweep") or {}
    if multirun:  # local_parallel: this worker's GPU from sweep.gpu_pool, before CUDA starts
        pin_gpu_for_this_process(sweep.get("gpu_pool"), HydraConfig.get().sweep.dir,
                                 sweep.get("jobs_per_gpu", 1))
        if "joblib" in str(HydraConfig.get().launcher.get("_target_", "")).lower():
            LIFETIME.watch_parent()  # a killed launcher stops its workers' jobs, recorded
    try:
        LIFETIME.stop_here()
        with sweep_job_scope():  # DDP ranks run this job only; env + process group restored after
            record = train(cfg, run_dir, task_overrides())
        if LIFETIME.signum is not None:  # the process was told to stop: so does a sweep
            exit_after_signal(LIFETIME.signum)
        if record.get("status") == "diverged" and not multirun:
            sys.exit(1)
        objective = sweep.get("objective")
        return record.get(objective) if objective else record
    except lifecycle.Interrupted as stop:  # a signal before training began
        LIFETIME.enter("finish")
        write_failure(cfg, run_dir, lifecycle.status_of_signal(stop.signum), str(stop))
        exit_after_signal(stop.signum)
    except lifecycle.RunFolderBusy as err:  # the folder belongs to the other process: no record
        log.error("%s", err)
        if not multirun:
            sys.exit(1)
    except checks.config_errors() as err:
        LIFETIME.enter("finish")
        status = checks.failure_status(err)
        log.error("%s: %s", status.replace("_", " "), err)
        write_failure(cfg, run_dir, status, str(err))
        if not multirun:
            sys.exit(2)
    except DiskFull as err:  # a checkpoint did not fit: said plainly, the previous one is kept
        LIFETIME.enter("finish")
        log.error("%s", err.strerror)
        write_failure(cfg, run_dir, "failed", f"disk full: {err.strerror}")
        if not multirun:
            sys.exit(1)
    except lifecycle.StartupError as err:  # an unusable folder or checkpoint, said plainly
        LIFETIME.enter("finish")
        log.error("%s", err)
        write_failure(cfg, run_dir, "failed", str(err))
        if not multirun:
            sys.exit(1)
    except Exception as err:  # a failed job is recorded, and a sweep goes on
        LIFETIME.enter("finish")
        log.exception("run failed")
        write_failure(cfg, run_dir, "failed", f"{type(err).__name__}: {err}")
        if not multirun:
            raise
    return None


# --help from the schema; a command with bad settings refused (exit 2) before Hydra runs it
main = preflight.entry_point(
    hydra.main(config_path="conf", config_name="train", version_base="1.3")(run))


def exit_after_signal(signum: int) -> None:
    """Exit after a signal, the record written: first the handler that was there before ours
    (submitit's requeue under SLURM), then ``128 + signal``."""
    LIFETIME.phase = "finish"
    LIFETIME.pass_on()
    LIFETIME.ignore_further()  # the record is written: nothing may change the exit code
    if LIFETIME.parent_gone:  # a sweep worker whose launcher was killed: no one to return to
        logging.shutdown()
        os._exit(lifecycle.exit_code_of_signal(signum))
    sys.exit(lifecycle.exit_code_of_signal(signum))


def write_failure(cfg: DictConfig, run_dir: Path, status: str, error: str) -> Path | None:
    """Record a failure: ``metrics.json``, or beside it (``metrics.<status>.json``) where that
    would replace a completed record or another run's (``lifecycle.failure_destination``)."""
    ident_hash = None
    try:
        ident = identity(cfg)
        ident_hash = config_hash(ident)
        record = {**summary(cfg), "status": status, "error": error, "config": ident,
                  "config_hash": ident_hash, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    except Exception:  # the config itself may be what is broken
        record = {"status": status, "error": error}
    try:
        record["overrides"] = task_overrides()
    except Exception:  # called outside a Hydra job
        pass
    lifecycle.complete_record(record, run_dir, record.get("overrides") or [])  # stopped: resume command
    if not lifecycle.is_rank_zero():
        return None
    return write_record(run_dir, record,
                                  lifecycle.failure_destination(run_dir, status, ident_hash))


if __name__ == "__main__":
    # Run the command through the module imported under its own name: a launcher that runs jobs
    # in other processes then pickles ``sharpbench.train.run`` by reference (from ``__main__`` it
    # would pickle a copy of the function and of this module's state).
    from sharpbench.train import main as _main
    _main()

"""What the loggers receive besides the per-step values the module logs.

- ``dense_log_interval``: the logging interval actually used (short epochs are logged densely, so
  every run has a training-loss curve);
- ``EvalProgressBar``: the progress bar names the evaluation pass run during training after the
  split it evaluates ("test", or "val + test"), not Lightning's "Validation";
- ``log_hyperparameters``: the resolved config as hyperparameters (CSV/TensorBoard
  ``hparams.yaml``, W&B run config), before training; it also makes TensorBoard and W&B take
  each evaluation once (``log_each_point_once``: the final test repeated the last in-training
  evaluation's ``test/acc`` and ``test/loss``);
- ``finish_loggers``: metrics.json's final numbers in the TensorBoard HPARAMS tab and the W&B run
  summary, then the W&B run is closed (a sweep's next job starts its own run);
- ``abort_loggers``: a run that raised closes its W&B run as failed.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Iterable

from lightning.pytorch.callbacks import TQDMProgressBar

POINTS_PER_EPOCH = 20
log = logging.getLogger(__name__)


def dense_log_interval(configured: int, steps_per_epoch: int) -> int:
    """``min(configured, steps_per_epoch // 20)``, at least 1: at least 20 logged points per epoch
    (a 39-step epoch is logged at every step; a 391-step one every 19 steps instead of 50)."""
    return max(1, min(int(configured), int(steps_per_epoch) // POINTS_PER_EPOCH))


class EvalProgressBar(TQDMProgressBar):
    """Lightning's bar, with the in-training evaluation named after the split(s) it evaluates."""

    @property
    def validation_description(self) -> str:
        trainer = getattr(self, "_trainer", None)
        names = getattr(getattr(trainer, "datamodule", None), "eval_names", None) or ["test"]
        return "Evaluation (" + " + ".join(names) + ")" if len(names) > 1 else names[0].capitalize()


# metrics.json keys shown in the TensorBoard HPARAMS tab and the W&B summary (when present)
FINAL_KEYS = ("test_acc", "test_loss", "val_acc", "val_loss", "train_loss", "train_acc",
              "wall_time_s", "eval_time_s", "epoch_time_s", "images_per_s", "passes_per_step",
              "hvps_per_step", "peak_mem_mb", "epochs_completed", "steps")


def final_numbers(record: dict[str, Any]) -> dict[str, float]:
    """The finite scalar results of a run (``FINAL_KEYS``, then any other number it holds)."""
    out = {}
    for key, value in record.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            continue
        out[key] = float(value)
    ordered = {k: out[k] for k in FINAL_KEYS if k in out}
    ordered.update({k: v for k, v in out.items() if k not in ordered})
    return ordered


def _kind(logger) -> str:
    return type(logger).__name__


def log_hyperparameters(loggers: Iterable, config: dict[str, Any]) -> None:
    """The resolved config (nested) as each logger's hyperparameters; TensorBoard and W&B then
    take each evaluation once (``log_each_point_once``)."""
    loggers = list(loggers)
    for logger in loggers:
        logger.log_hyperparams(config)
    log_each_point_once(loggers)


def log_each_point_once(loggers: Iterable) -> None:
    """TensorBoard and W&B get each evaluation once.

    After ``fit``, the final ``trainer.test`` evaluates the weights that the in-training
    evaluation at the end of the last epoch (the validation loop, its split named "test") has
    just evaluated; Lightning logged both, one step apart (the evaluation at step S − 1, the
    test at S), so every run had a second ``test/acc`` and ``test/loss`` point at its end.
    Dropped here: while the trainer tests, a metric last logged at this step or the one before
    (no training step in between: the same weights); at any time, a metric logged a second
    time at one step. A final test after an epoch that was not evaluated is logged as usual.
    The CSV log keeps every row (``sharpbench.curves`` tells them apart); ``epoch``, which
    Lightning adds to every call, is passed through."""
    for logger in loggers:
        if _kind(logger) not in ("TensorBoardLogger", "WandbLogger") or getattr(logger, "_sharpbench_once", False):
            continue
        original = getattr(logger, "log_metrics", None)
        if original is None:
            continue
        last_step: dict[str, int] = {}  # metric -> the step it was last logged at

        def log_metrics(metrics, step=None, _original=original, _last=last_step):
            if step is None:
                return _original(metrics, step)
            testing = _testing()

            def repeat(key):
                seen = _last.get(key)
                return seen is not None and (seen == step or (testing and step - 1 <= seen <= step))
            fresh = {k: v for k, v in metrics.items() if k == "epoch" or not repeat(k)}
            if not any(k != "epoch" for k in fresh):
                return None
            _last.update({k: step for k in fresh if k != "epoch"})
            return _original(fresh, step)

        logger.log_metrics = log_metrics
        logger._sharpbench_once = True


def _testing() -> bool:
    """Whether the run's trainer (the one ``sharpbench.lifecycle`` watches) is in ``test``."""
    from .lifecycle import LIFETIME
    return bool(getattr(LIFETIME.trainer, "testing", False))


def finish_loggers(loggers: Iterable, record: dict[str, Any], config: dict[str, Any]) -> None:
    """Final numbers to TensorBoard (HPARAMS tab, as ``final/<key>``) and W&B (run summary)."""
    numbers = final_numbers(record)
    for logger in loggers:
        kind = _kind(logger)
        if kind == "TensorBoardLogger" and numbers:
            logger.log_hyperparams(config, metrics={f"final/{k}": v for k, v in numbers.items()
                                                    if k in FINAL_KEYS})
            logger.experiment.flush()
        elif kind == "WandbLogger":
            run = logger.experiment
            if hasattr(run, "summary"):  # rank zero only (a dummy elsewhere)
                run.summary.update({**numbers, "status": record.get("status")})
                run.finish()


def abort_loggers(loggers: Iterable) -> None:
    """A run that raised: close its W&B run as failed (exit code 1) instead of leaving it
    "running" on the server; errors while closing are logged, not raised over the original."""
    for logger in loggers:
        if _kind(logger) != "WandbLogger":
            continue
        try:
            run = logger.experiment
            if hasattr(run, "finish"):
                run.finish(exit_code=1)
        except Exception as err:  # noqa: BLE001 - the run's own error is the one to report
            log.warning("could not close the W&B run: %s", err)


"""What a person sees while a run trains: one start line, a progress bar, one summary line.

- :func:`quiet_libraries`: Lightning's informational lines (accelerator banners, tips that
  advertise other products, "weights_only was not set") and library deprecation warnings go to
  ``train.log`` only; the console keeps sharpbench's own lines, warnings raised by sharpbench code,
  and every error.
- :func:`announce_start`: the start line (what runs, where it writes) and, on a machine where the
  run trains on the CPU, a one-line warning when the measured estimate says it will take long.
- :func:`progress_bar`: Lightning's tqdm bar, with ``s/it`` instead of ``0.40it/s`` for slow
  steps next to the elapsed time and the ETA.
"""
from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("sharpbench")

LIBRARY_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning",
                   "lightning_fabric")
LONG_CPU_RUN_S = 30 * 60       # warn when a CPU run is estimated to take longer than this
MIN_IMAGE_PASSES_TO_TIME = 5_000  # below this many image forward/backward passes, never long


class ConsoleFilter(logging.Filter):
    """Keep sharpbench's records, errors, and warnings raised from sharpbench code; drop library
    information and library warnings (they still reach train.log through the file handler)."""

    def __init__(self) -> None:
        super().__init__()
        self.package_dir = str(Path(__file__).resolve().parent)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "sharpbench" or record.name.startswith("sharpbench."):
            return True
        if record.levelno >= logging.ERROR:
            return True
        if record.name == "py.warnings":  # warnings.warn(...) routed by logging.captureWarnings
            return self.package_dir in record.getMessage()
        return record.levelno >= logging.WARNING and not record.name.startswith(LIBRARY_LOGGERS)


def quiet_libraries() -> None:
    """Route Lightning's logging and Python warnings through the root handlers (Hydra's console
    and ``train.log``), with :class:`ConsoleFilter` on every console handler."""
    for name in LIBRARY_LOGGERS:
        lib = logging.getLogger(name)
        for handler in list(lib.handlers):
            if type(handler) is logging.StreamHandler:  # Lightning's own console handler
                lib.removeHandler(handler)
        lib.propagate = True
    logging.captureWarnings(True)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            if not any(isinstance(f, ConsoleFilter) for f in handler.filters):
                handler.addFilter(ConsoleFilter())


# ------------------------------------------------------------------------------ start line
def start_line(cfg: Any, data: Any, run_dir: Path, device: str, precision: str) -> str:
    precision = {"32": "fp32", "32-true": "fp32"}.get(str(precision), str(precision))
    return (f"[sharpbench] training {cfg.optimizer.name} on {cfg.dataset.name}/{cfg.model.name} "
            f"seed {cfg.seed}: {cfg.trainer.max_epochs} epoch{'s' if int(cfg.trainer.max_epochs) != 1 else ''}, {len(data.train_y):,} training "
            f"images, batch {cfg.dataset.batch_size}, {device} {precision} -> {run_dir}")


def seconds_per_image(model: nn.Module, num_classes: int, probe_batch: int = 32) -> float:
    """Measured seconds of one training forward/backward per image on the CPU: one timed pass of
    ``probe_batch`` random CIFAR-shaped images (the run's own batch size: per-image time falls as
    the batch grows, so a smaller probe over-estimates) after a 2-image warm-up, on a copy of the
    model (the run's weights, BatchNorm statistics and RNG streams are untouched)."""
    net = copy.deepcopy(model).cpu().train()
    gen = torch.Generator().manual_seed(0)  # no draw from the global RNG streams
    x = torch.randn(probe_batch, 3, 32, 32, generator=gen)
    y = torch.randint(num_classes, (probe_batch,), generator=gen)
    F.cross_entropy(net(x[:2]), y[:2]).backward()  # first-call costs (allocations, kernels)
    t0 = time.perf_counter()
    F.cross_entropy(net(x), y).backward()
    return (time.perf_counter() - t0) / probe_batch


def cpu_estimate_s(s_per_image: float, *, train_images: int, eval_images: int, epochs: int,
                   passes_per_step: float) -> float:
    """Training (``passes_per_step`` forward/backward passes per image) plus the per-epoch
    evaluation (a forward pass, about a third of a forward/backward) for ``epochs`` epochs."""
    per_epoch = s_per_image * (train_images * passes_per_step + eval_images / 3.0)
    return epochs * per_epoch


def format_duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s"


def long_cpu_run_warning(estimate_s: float, epochs: int, passes_per_step: float,
                         s_per_image: float, batch_size: int) -> str:
    return (f"[sharpbench] no GPU: this run trains on the CPU for about {format_duration(estimate_s)} "
            f"(estimated as {epochs} epochs × {passes_per_step:g} passes/step × "
            f"{s_per_image * batch_size:.2f} s per forward/backward of a batch of {batch_size}, "
            "timed once on this machine, plus evaluation). For a quick check: experiment=smoke "
            "(tiny CNN, 2 epochs, under a minute), or lower trainer.max_epochs / dataset.train_subset")


def nominal_passes_per_step(optimizer_cfg: Any) -> float:
    """Passes per step the configured optimizer declares (1 for plain optimizers)."""
    from omegaconf import OmegaConf

    from .optim.factory import build_optimizer
    probe = nn.Linear(2, 2)
    plain = OmegaConf.to_container(optimizer_cfg, resolve=True) if OmegaConf.is_config(optimizer_cfg) else dict(optimizer_cfg)
    return float(getattr(build_optimizer(probe, plain), "passes_per_step", 1.0))


PROBE_BATCH_MAX = 256  # the timing probe's batch: the run's own, capped (memory)


def announce_start(cfg: Any, data: Any, model: nn.Module, run_dir: Path, *, on_gpu: bool,
                   precision: str) -> float | None:
    """Log the start line; on the CPU, estimate the run's duration and warn when it is long.
    Returns the estimate in seconds (None when not measured)."""
    log.info("%s", start_line(cfg, data, run_dir, "cuda" if on_gpu else "cpu", precision))
    if on_gpu:
        return None
    epochs = int(cfg.trainer.max_epochs)
    passes = nominal_passes_per_step(cfg.optimizer)
    train_images = len(data.train_y)
    if epochs * train_images * passes < MIN_IMAGE_PASSES_TO_TIME:
        return None
    s_img = seconds_per_image(model, data.num_classes,
                              probe_batch=min(PROBE_BATCH_MAX, int(cfg.dataset.batch_size)))
    eval_images = _eval_images(data)
    estimate = cpu_estimate_s(s_img, train_images=train_images, eval_images=eval_images,
                              epochs=epochs, passes_per_step=passes)
    if estimate > LONG_CPU_RUN_S:
        log.warning("%s", long_cpu_run_warning(estimate, epochs, passes, s_img,
                                               int(cfg.dataset.batch_size)))
    return estimate


def _eval_images(data: Any) -> int:
    splits = getattr(data, "splits", None)
    if splits is None:
        return 0
    n = len(splits.test_y)
    if getattr(splits, "has_val", False):
        n += len(splits.val_y)
    return n


# ----------------------------------------------------------------------------- progress bar
def rate_text(speed: float | None) -> str:
    """``12.34it/s`` for fast steps, ``2.50s/it`` for steps slower than a second."""
    if not speed:
        return "-- it/s"
    return f"{speed:.2f}it/s" if speed >= 1.0 else f"{1.0 / speed:.2f}s/it"


# tqdm's ``rate_fmt`` switches to s/it below 1 it/s; Lightning's format uses ``rate_noinv_fmt``,
# which shows "0.40it/s" for a 2.5-second step. ``remaining`` is the ETA of the bar.
BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


def progress_bar():
    """The run's tqdm progress bar (evaluation named after its splits, ``run_logging``) showing
    ``s/it`` for slow steps, with elapsed time and ETA."""
    from .run_logging import EvalProgressBar

    class SlowStepProgressBar(EvalProgressBar):
        def init_train_tqdm(self):
            bar = super().init_train_tqdm()
            bar.bar_format = BAR_FORMAT
            return bar

        def init_validation_tqdm(self):
            bar = super().init_validation_tqdm()
            bar.bar_format = BAR_FORMAT
            return bar

        def init_test_tqdm(self):
            bar = super().init_test_tqdm()
            bar.bar_format = BAR_FORMAT
            return bar

    return SlowStepProgressBar()

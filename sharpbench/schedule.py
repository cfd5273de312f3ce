"""Learning-rate schedules as a per-step multiplier of the base learning rate.

The multiplier is a pure function of the global step, so a resumed run continues on exactly the
same curve. Milestones are points in the run, converted to optimizer steps:

- ``multistep``: ``gamma ** (#milestones passed)`` (the paper's ×0.1 at epochs 50 and 75 of 80).
  A milestone ``m < 1`` is a fraction of ``max_epochs`` (``0.625`` and ``0.9375`` are the paper's
  50 and 75 of 80, and still mean 62.5% and 93.75% of a 2-epoch smoke run); ``m >= 1`` is an epoch
  number. Milestone ``m`` (in epochs) takes effect from step ``ceil(m · steps_per_epoch)``.
- ``cosine``:    ``min_ratio + (1 - min_ratio)·(1 + cos(π·t))/2``, ``t`` = progress after warm-up,
- ``constant``:  1,

each optionally preceded by a linear warm-up over ``warmup_epochs`` (from ``1/steps`` to 1).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch

SCHEDULES = ("multistep", "cosine", "constant")


class ScheduleConfigError(ValueError):
    """A bad schedule configuration; the message says what to change."""


def lr_multiplier(step: int, steps_per_epoch: int, epochs: int, cfg: Mapping[str, Any]) -> float:
    """Multiplier of the base lr after ``step`` optimizer steps (step 0 = the first step)."""
    name = cfg.get("name", "constant")
    warmup_steps = int(round(float(cfg.get("warmup_epochs", 0) or 0) * steps_per_epoch))
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if name == "multistep":
        passed = sum(1 for m in milestone_epochs(cfg.get("milestones", ()), epochs)
                     if step >= math.ceil(m * steps_per_epoch - 1e-9))
        return float(cfg.get("gamma", 0.1)) ** passed
    if name == "cosine":
        total = max(1, epochs * steps_per_epoch - warmup_steps)
        t = min(1.0, (step - warmup_steps) / total)
        lo = float(cfg.get("min_lr_ratio", 0.0))
        return lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * t))
    if name == "constant":
        return 1.0
    raise ScheduleConfigError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")


def milestone_epochs(milestones, epochs: int) -> list[float]:
    """Milestones in epochs: ``m < 1`` is a fraction of ``epochs`` (``m·epochs``), else ``m`` itself."""
    return [float(m) * epochs if float(m) < 1 else float(m) for m in milestones]


def check_schedule(cfg: Mapping[str, Any], epochs: int) -> None:
    """Reject a schedule that cannot do what it says for a run of ``epochs`` epochs."""
    name = cfg.get("name")
    if name not in SCHEDULES:
        raise ScheduleConfigError(
            f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)} (e.g. schedule=cosine)")
    if name == "multistep":
        milestones = list(cfg.get("milestones", ()) or ())
        bad = [m for m in milestones if isinstance(m, bool) or not isinstance(m, (int, float))]
        if bad:
            raise ScheduleConfigError(
                f"schedule.milestones={milestones}: every milestone must be a number (an epoch, "
                "or a fraction of trainer.max_epochs below 1), e.g. schedule.milestones=[0.625,0.9375]")
        negative = [m for m in milestones if m < 0]
        if negative:
            raise ScheduleConfigError(
                f"schedule milestones {negative} are negative: give epochs (e.g. 50) or fractions "
                "of trainer.max_epochs (e.g. schedule.milestones=[0.625,0.9375])")
        late = [m for m, e in zip(milestones, milestone_epochs(milestones, epochs)) if e >= epochs]
        if late:
            raise ScheduleConfigError(
                f"schedule milestones {late} are not before the last epoch ({epochs} epochs, "
                f"numbered 0..{epochs - 1}), so they would never apply. Give them as fractions "
                "of the run, which fit any trainer.max_epochs, e.g. schedule.milestones=[0.625,0.9375] "
                "(the paper's 50 and 75 of 80), lower them, or raise trainer.max_epochs")
    warmup = float(cfg.get("warmup_epochs", 0) or 0)
    if warmup < 0 or warmup >= epochs:
        raise ScheduleConfigError(
            f"schedule.warmup_epochs={warmup} must be in [0, max_epochs={epochs})")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Mapping[str, Any],
                    steps_per_epoch: int, epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step ``LambdaLR``; call ``scheduler.step()`` once after every optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, steps_per_epoch, epochs, cfg))

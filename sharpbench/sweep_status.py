"""A multirun's exit status: non-zero when any of its jobs did not complete, with a count per status.

Registered in ``conf/train.yaml`` *before* the report callback: Hydra calls ``on_multirun_end``
in reverse order, so the report is written first and this callback ends the process last.

    [sharpbench] sweep outputs/sweeps/table1: 6 jobs: 2 completed, 3 failed, 1 diverged

The jobs of *this* multirun are the job folders whose Hydra record (``.hydra/overrides.yaml``,
rewritten at every job start) is newer than the multirun's start, so folders left by earlier
sweeps in the same place are not counted. A job's status is that of the failure record it wrote
beside a kept record (``metrics.<status>.json``, newer than the start), else its ``metrics.json``,
else ``no_record`` (killed before writing one).
"""
from __future__ import annotations

import json
import logging
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("sharpbench.sweep")

EXIT_CODE = 1
CLOCK_SLACK_S = 2.0  # job folders on a shared file system may carry a slightly different clock


def _status(path: Path) -> str | None:
    try:
        return str(json.loads(path.read_text()).get("status") or "unknown")
    except (OSError, ValueError):
        return None


def job_status(job_dir: Path, since: float) -> str:
    beside = [p for p in job_dir.glob("metrics.*.json") if p.stat().st_mtime >= since]
    if beside:
        newest = max(beside, key=lambda p: p.stat().st_mtime)
        status = _status(newest)
        if status:
            return status
    return _status(job_dir / "metrics.json") or "no_record"


def job_dirs(sweep_dir: Path, since: float) -> list[Path]:
    return sorted(p.parent.parent for p in sweep_dir.rglob(".hydra/overrides.yaml")
                  if p.stat().st_mtime >= since)


def count_statuses(sweep_dir: Path, since: float) -> Counter:
    return Counter(job_status(d, since) for d in job_dirs(sweep_dir, since))


def summary_line(sweep_dir: Path, counts: Counter) -> str:
    order = sorted(counts, key=lambda s: (s != "completed", -counts[s], s))
    parts = ", ".join(f"{counts[s]} {s}" for s in order)
    return f"[sharpbench] sweep {sweep_dir}: {sum(counts.values())} jobs: {parts}"


class ExitStatusOnMultirunEnd(Callback):
    """Print the per-status count of the multirun's jobs; exit 1 unless all completed."""

    def __init__(self) -> None:
        self.started: float | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started = time.time()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir)).absolute()
        since = (self.started or 0.0) - CLOCK_SLACK_S
        counts = count_statuses(sweep_dir, since)
        line = summary_line(sweep_dir, counts)
        print(line, flush=True)
        not_completed = sum(n for s, n in counts.items() if s != "completed")
        if not_completed:
            log.error("%d of %d jobs did not complete", not_completed, sum(counts.values()))
            sys.exit(EXIT_CODE)

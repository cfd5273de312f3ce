"""Write the sweep report when a Hydra multirun ends, and name every job that did not complete.

Registered in the sweep experiments (conf/experiment/table1*.yaml, rho_sweep, optuna_example):

    hydra:
      callbacks:
        report:
          _target_: sharpbench.sweep_callback.ReportOnMultirunEnd

It runs in the process that launched the sweep, after every job has returned (with the SLURM
launcher: after the array has finished), and reads only the files the jobs wrote, so it works
with every launcher. A report that cannot be written is logged, never raised: the sweep's
results are on disk either way (``python -m sharpbench.report <sweep dir>`` redoes it).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from .report import collect_runs, failed_runs, method_label, write_outputs

log = logging.getLogger("sharpbench.sweep")


class ReportOnMultirunEnd(Callback):
    """``write_report([sweep_dir])`` at the end of a multirun; failed jobs are listed by name.

    ``curves``: draw the figures; ``first_epochs``: also the raw batch loss over the first E
    epochs (e.g. ``[10, 20]``, as in Feldman 2025, Fig. 9)."""

    def __init__(self, curves: bool = True, first_epochs: list[int] | None = None) -> None:
        self.curves = curves
        self.first_epochs = tuple(int(e) for e in (first_epochs or ()))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir)).absolute()
        try:
            runs = collect_runs([sweep_dir])
            if runs.empty:
                log.warning("sweep report: no runs below %s", sweep_dir)
                return
            paths = write_outputs(runs, sweep_dir, curves=self.curves,
                                  first_epochs=self.first_epochs)
        except Exception:  # the results are on disk; the report can be redone by hand
            log.exception("sweep report: could not write the report for %s; run "
                          "`python -m sharpbench.report %s`", sweep_dir, sweep_dir)
            return
        done = int((runs["status"] == "completed").sum())
        log.info("sweep report: %d of %d jobs completed; table: %s\n%s", done, len(runs),
                 paths["table_md"], paths["table_md"].read_text())
        for job in failed_runs(runs).itertuples():
            error = str(job.error).strip().splitlines()[-1] if isinstance(job.error, str) else ""
            log.error("sweep job %s: %s on %s, seed %s: %s (%s)", job.status,
                      method_label(job.method, job.setting), job.dataset, job.seed, error,
                      Path(job.run_dir).name)

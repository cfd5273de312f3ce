"""λ_max during training: a Lightning callback that measures the top Hessian eigenvalue of the
training loss every N epochs (off by default; ``monitor.lambda_max_every_n_epochs=N``).

At the end of every N-th training epoch (and the last), on a fixed, un-augmented subset of the
training set (``subset_size`` images drawn once by ``seed``), in eval mode, by Lanczos
(``sharpness.hessian_eigenvalues``); the weights, BatchNorm buffers and train flags are restored
bit-identically and no global random stream is touched, so training continues exactly as without
it. Results: ``<run dir>/lambda_max.json`` (written atomically, kept across a resume) and the
logged metric ``train/lambda_max``. Its time is not part of the run's measured training time
(the epoch timer stops before ``on_train_epoch_end`` hooks run after it).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import lightning as L
import torch
import torch.nn.functional as F

from ..fileio import atomic_write_text
from .hessian import hessian_eigenvalues

HISTORY_FILE = "lambda_max.json"


class LambdaMaxMonitor(L.Callback):
    def __init__(self, run_dir: Path, every_n_epochs: int, subset_size: int = 512,
                 num_iters: int = 20, seed: int = 0, batch_size: int = 256):
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        self.path = Path(run_dir) / HISTORY_FILE
        self.every = int(every_n_epochs)
        self.subset_size = int(subset_size)
        self.num_iters = int(num_iters)
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self._idx: Optional[torch.Tensor] = None

    def _batches(self, trainer, device):
        data = trainer.datamodule
        if self._idx is None:
            n = len(data.train_y)
            gen = torch.Generator().manual_seed(self.seed)
            self._idx = torch.randperm(n, generator=gen)[:min(self.subset_size, n)].sort().values
        x, y = data.fisher_batch(self._idx, device)
        return [(x[i:i + self.batch_size], y[i:i + self.batch_size]) for i in range(0, len(y), self.batch_size)]

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        epoch = trainer.current_epoch + 1  # epochs completed
        if epoch % self.every and epoch != trainer.max_epochs:
            return
        eig = hessian_eigenvalues(pl_module.model, F.cross_entropy, self._batches(trainer, pl_module.device),
                                  k=1, num_iters=self.num_iters, seed=self.seed, dtype=torch.float32)
        lam = eig.eigenvalues[0]
        pl_module.log("train/lambda_max", lam, sync_dist=False)
        if trainer.is_global_zero:
            history = [h for h in read_raw(self.path) if h["epoch"] != epoch]
            history.append({"epoch": epoch, "step": int(trainer.global_step), "lambda_max": lam})
            atomic_write_text(self.path, json.dumps(sorted(history, key=lambda h: h["epoch"]), indent=1) + "\n")


def read_raw(path: Path) -> list[dict]:
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def read_history(run_dir: Path) -> Optional[tuple[list[int], list[float]]]:
    """(epochs, λ_max) of a run that monitored λ_max, else None."""
    history = read_raw(Path(run_dir) / HISTORY_FILE)
    if not history:
        return None
    return [h["epoch"] for h in history], [h["lambda_max"] for h in history]


def build_monitor(cfg, run_dir: Path) -> list[L.Callback]:
    """The callbacks asked for by the ``monitor`` config node (an empty list by default)."""
    node = cfg.get("monitor") or {}
    every = int(node.get("lambda_max_every_n_epochs") or 0)
    if every <= 0:
        return []
    return [LambdaMaxMonitor(run_dir, every, subset_size=int(node.get("lambda_max_subset", 512)),
                             num_iters=int(node.get("lambda_max_iters", 20)), seed=int(node.get("seed", 0)))]

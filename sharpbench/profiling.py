"""Device-independent speed proxies: aten operators dispatched and host synchronisations.

``count_dispatch()`` is a context manager that counts, while it is active,

- ``ops``: every aten operator that reaches the dispatcher from Python (one ``torch._foreach_*``
  call over 62 tensors is one op; a Python loop over them is 62). On a GPU each op is at least one
  kernel launch, so this is the launch-overhead proxy that carries over to any device;
- ``syncs``: every read of a tensor value by the host. Every scalar read (``.item()``,
  ``float(t)``, ``int(t)``, ``bool(t)``, ``t.__index__``, ``if t:``) goes through the operator
  ``aten._local_scalar_dense``, which a dispatch mode sees on CPU too; ``.tolist()``,
  ``.numpy()`` and ``.cpu()`` copy without it, so they are counted by wrapping those methods
  (on a CPU tensor they cost nothing, but the same line waits for the GPU on CUDA).

Where each sync came from (the innermost frame outside torch) is kept in ``sync_sites``, so a
test failure names the line. ``paused()`` stops counting inside a block (the forward/backward
passes, when only an optimizer's own work is wanted); host syncs are counted throughout.
"""
from __future__ import annotations

import traceback
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .compat import is_logging_step

_SCALAR_READ = torch.ops.aten._local_scalar_dense.default
_COPYING_READS = ("tolist", "numpy", "cpu")


@dataclass
class DispatchCounts:
    ops: int = 0
    syncs: int = 0
    by_op: Counter = field(default_factory=Counter)
    sync_sites: Counter = field(default_factory=Counter)
    counting: bool = True

    def record_sync(self, kind: str) -> None:
        self.syncs += 1
        self.sync_sites[f"{kind} at {_caller()}"] += 1

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Do not count ops inside the block (syncs still count; nested pauses are fine)."""
        before, self.counting = self.counting, False
        try:
            yield
        finally:
            self.counting = before


def _caller() -> str:
    """``file:line function`` of the innermost frame outside torch and this module."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        name = frame.filename.replace("\\", "/")
        if "/torch/" not in name and not name.endswith("profiling.py"):
            return f"{'/'.join(name.split('/')[-2:])}:{frame.lineno} {frame.name}"
    return "?"


class _Counter(TorchDispatchMode):
    def __init__(self, counts: DispatchCounts):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        counts = self.counts
        if counts.counting:
            counts.ops += 1
            counts.by_op[func.overloadpacket.__name__] += 1
        if func is _SCALAR_READ:
            counts.record_sync("scalar read")
        return func(*args, **(kwargs or {}))


@contextmanager
def count_dispatch() -> Iterator[DispatchCounts]:
    """``with count_dispatch() as c: ...`` then ``c.ops``, ``c.syncs``, ``c.by_op``, ``c.sync_sites``."""
    counts = DispatchCounts()
    originals = {name: getattr(torch.Tensor, name) for name in _COPYING_READS}

    def wrap(name, original):
        def read(self, *args, **kwargs):
            counts.record_sync(f".{name}()")
            return original(self, *args, **kwargs)
        read.__name__ = name
        return read

    for name, original in originals.items():
        setattr(torch.Tensor, name, wrap(name, original))
    try:
        with _Counter(counts):
            yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


class StepCounter:
    """Counts ops and syncs per training step of a Lightning run, everything between the start of
    one batch and the start of the next (the training step, the optimizer, logging, the loader
    fetching the next batch): the driver path the trainer actually runs.

    Use as a Lightning callback; ``steps`` is then a list of ``DispatchCounts``, one per batch, and
    ``logging_steps`` the batches on which Lightning wrote its logs (a boundary where reading the
    logged values is expected)."""

    def __init__(self):
        self.steps: list[DispatchCounts] = []
        self.logging_steps: set[int] = set()
        self._active = None

    def _close(self) -> None:
        if self._active is not None:
            self._active.__exit__(None, None, None)
            self._active = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._close()
        self._active = count_dispatch()
        self.steps.append(self._active.__enter__())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if is_logging_step(trainer):
            self.logging_steps.add(len(self.steps) - 1)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._close()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._close()

"""BatchNorm running statistics during multi-pass steps (``bn_policy``).

A SAM-family step runs the model more than once on the same batch. In train mode every forward
normalises with the batch statistics (so the gradients do not depend on the policy), but each
forward may also update ``running_mean``/``running_var``/``num_batches_tracked``, which the model
uses in eval mode. Policies:

- ``first_pass`` (default): only the first forward of a step updates them (the original JAX SAM
  of Foret et al. 2021 keeps the first pass's statistics).
- ``both_passes``: every forward of the step updates them, as in SamsungLabs/ASAM
  (``example_cifar.py``), cool-xuan/Imbalanced_SAM (``utils/trainval.py``) and
  Mi-Peng/Sparse-Sharpness-Aware-Minimization (``utils/engine.py``): none of them touches the
  running statistics between passes. (ImbSAM's closure here runs two forwards at ``w``, head and
  tail, where the authors' code back-propagates both from one forward; with ``both_passes`` the
  batch at ``w`` is therefore counted twice here.)
- ``momentum_zero``: later passes behave as with ``momentum = 0``, as davda54/sam
  (``example/utility/bypass_bn.py``) and nblt/F-SAM (``train.py``) do with their
  ``disable_running_stats`` (juntang-zhuang/GSAM's ``step`` calls a helper of that name from its
  ``gsam/util.py`` before the second pass): the statistics keep their values but
  ``num_batches_tracked`` still counts every pass. With the default ``momentum=0.1`` this equals
  ``first_pass`` except for that counter; with ``momentum=None`` (cumulative average, factor
  ``1/num_batches_tracked``) later updates are weighted differently, so results change.
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

BN_POLICIES = ("first_pass", "both_passes", "momentum_zero")


def _tracking_layers(model: nn.Module) -> list[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@contextmanager
def frozen_bn_stats(model: nn.Module) -> Iterator[None]:
    """Inside the block, BatchNorm layers in train mode normalise with the batch statistics and
    their ``running_mean``/``running_var``/``num_batches_tracked`` end up unchanged: they are
    copied aside before the block and copied back after it (bit-exact, two ``_foreach_copy_``).

    No module attribute changes (the older way, switching ``track_running_stats`` off, changed one
    that ``torch.compile`` guards on, so a compiled model recompiled for the second pass)."""
    with _restored(*_bn_snapshot(model, counters=True)):
        yield


@contextmanager
def _restored(buffers: list[Tensor], saved: list[Tensor]) -> Iterator[None]:
    """Copy ``buffers`` into ``saved`` before the block and back after it."""
    if not buffers:
        yield
        return
    with torch.no_grad():
        torch._foreach_copy_(saved, buffers)
    try:
        yield
    finally:
        with torch.no_grad():
            # Through ``.data`` aliases: a graph built inside the block (a loss kept for
            # Hessian-vector products) saved these buffers, and a tracked in-place write would
            # invalidate it. Training-mode BatchNorm's backward does not read their values.
            torch._foreach_copy_(buffers, saved)


_SNAPSHOTS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _bn_snapshot(model: nn.Module, counters: bool) -> tuple[list[Tensor], list[Tensor]]:
    """The running-statistics buffers of ``model``'s BatchNorm layers (``running_mean``,
    ``running_var``, and ``num_batches_tracked`` if ``counters``), as ``.data`` aliases, and
    same-shaped spares to save them in (allocated once per model, again if the buffers were
    replaced or moved)."""
    names = ("running_mean", "running_var") + (("num_batches_tracked",) if counters else ())
    buffers = [b for m in _tracking_layers(model) for b in (getattr(m, n) for n in names)
               if b is not None]
    per_model = _SNAPSHOTS.setdefault(model, {})
    cached = per_model.get(counters)
    if (cached is None or len(cached[0]) != len(buffers)
            or any(a is not b for a, b in zip(cached[0], buffers))):
        cached = per_model[counters] = (buffers, [b.data for b in buffers],
                                        [torch.empty_like(b) for b in buffers])
    return cached[1], cached[2]


@contextmanager
def zero_momentum_bn(model: nn.Module) -> Iterator[None]:
    """Inside the block, BatchNorm layers behave as with ``momentum = 0`` (the davda54/sam
    convention): ``running_mean``/``running_var`` keep their values, ``num_batches_tracked`` is
    still incremented. Done by saving and restoring the two statistics (two ``_foreach_copy_``),
    not by setting ``momentum``: that is a module attribute ``torch.compile`` guards on, so
    flipping it would recompile the model for every later pass. The result is the same bits:
    with momentum 0 the update is ``1·running + 0·batch``."""
    with _restored(*_bn_snapshot(model, counters=False)):
        yield


def check_bn_policy(policy: str) -> str:
    if policy not in BN_POLICIES:
        raise ValueError(f"bn_policy must be one of {BN_POLICIES} (first_pass is the default; "
                         f"both_passes / momentum_zero reproduce public implementations), got "
                         f"{policy!r}")
    return policy


def bn_policy_closure(model: nn.Module, closure: Callable, policy: str = "first_pass") -> Callable:
    """Wrap a closure for ONE optimizer step so that its calls update BatchNorm running
    statistics as ``policy`` says (see the module docstring). Make a new wrapper every step."""
    check_bn_policy(policy)
    if policy == "both_passes":
        return closure
    later = frozen_bn_stats if policy == "first_pass" else zero_momentum_bn
    calls = 0

    def wrapped(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 1:
            return closure(*args, **kwargs)
        with later(model):
            return closure(*args, **kwargs)

    return wrapped


@contextmanager
def later_pass(model: nn.Module, policy: str = "first_pass") -> Iterator[None]:
    """Around a pass a method runs after a step's first one, outside its closure (ESAM's
    forward-only pass at ``w + e`` and its pass over the selected samples): BatchNorm running
    statistics as ``policy`` treats a later pass (frozen; updated; momentum 0)."""
    check_bn_policy(policy)
    if policy == "both_passes":
        yield
        return
    with (frozen_bn_stats if policy == "first_pass" else zero_momentum_bn)(model):
        yield


def chunk_bn_closures(model: nn.Module, closures: list[Callable],
                      policy: str = "first_pass") -> list[Callable]:
    """Wrap the closures over the chunks of ONE step's batch (m-sharpness): the first chunk's
    follows ``policy``; the others never update BatchNorm running statistics (under DDP over
    batch/m devices, rank 0's copy is the one kept)."""
    def frozen(closure: Callable) -> Callable:
        def call(*args, **kwargs):
            with frozen_bn_stats(model):
                return closure(*args, **kwargs)
        return call
    return [bn_policy_closure(model, closures[0], policy)] + [frozen(c) for c in closures[1:]]


def first_pass_updates_bn(model: nn.Module, closure: Callable) -> Callable:
    """Wrap a closure for ONE optimizer step: its first call updates BatchNorm running statistics,
    later calls (SAM's second pass, extra samples …) do not. Make a new wrapper every step::

        loss = opt.step(first_pass_updates_bn(model, closure))
    """
    return bn_policy_closure(model, closure, "first_pass")

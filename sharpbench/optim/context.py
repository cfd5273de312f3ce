"""The step context: what one optimizer step may need beyond the closure.

``opt.step(closure)`` needs nothing else, and that is how most methods are used. A few methods
need more of the step: a loss they can differentiate twice (Hessian-vector products), fresh
training samples (a Fisher estimate), a loss split by class (ImbSAM), the batch's position in
the epoch; and a driver may need a say in the step: averaging gradients across devices (DDP),
clipping them, skipping a step whose fp16 gradients overflowed. All of it travels in one object::

    loss = opt.step(closure, context=StepContext(loss_closure=..., batch_idx=i))

A method declares the fields it reads in its registry entry (``needs``); a driver fills in what it
can offer and leaves the rest ``None``. The Lightning module (``sharpbench.module``), the bench and
a user's own loop build contexts the same way; no driver knows any method by name.

Inputs (set by the driver):

- ``model``: the network being trained.
- ``loss_closure(mode="train")``: the loss on the current batch at the current weights, with its
  graph and without ``backward`` (for Hessian-vector products); full precision. ``"train"``: the
  training objective with BatchNorm in train mode and its running statistics left unchanged;
  ``"eval"``: plain cross-entropy with the model in eval mode.
- ``sample(n)``: ``n`` un-augmented training samples ``(x, y)`` on the model's device, from a
  seeded stream (a Fisher estimate).
- ``extra_pass(samples=None, forward_only=False)``: a context manager a method enters around each
  pass it runs itself (SSAM-F's Fisher passes, MESA's teacher), so that the driver counts it and a
  profiler can tell it apart; a pass over ``samples`` samples counts as ``samples / batch size``
  of a training pass (its FLOPs), one without as a whole pass; a forward-only pass counts
  ``FORWARD_SHARE`` of that.
- ``closure_of(reduce)``: a closure like the step's own, except that its loss is
  ``reduce(per_sample_losses, targets)``.
- ``batch_idx``: the batch's index within its epoch.
- ``chunk_closures(m)``: closures like the step's own, one per consecutive chunk of ``m`` samples
  of the batch (``m`` divides the batch), each counted as ``m / batch`` of a pass; only the first
  chunk's first pass updates BatchNorm running statistics (as rank 0's copy under DDP). For
  m-sharpness on one device (``m`` of a method that takes it).
- ``micro_batch``: the driver runs the batch as micro-batches of this many samples (gradient
  accumulation, :mod:`sharpbench.optim.accumulation`): the step's closures accumulate over them,
  and a method that takes ``m`` perturbs each micro-batch with its own gradient (``m`` defaults to
  it; a set ``m`` must divide it). ``None``: the batch is one pass.
- ``per_sample_losses()``: the training loss of each sample of the batch at the current weights,
  from a forward pass without graph (counted as ``FORWARD_SHARE`` of a pass: its FLOPs), BatchNorm
  running statistics as in a later pass of the step (ESAM's sharpness per sample).
- ``closure_on(index)``: a closure like the step's own over the samples ``index`` of the batch
  (a 1-D tensor of positions), counted as ``len(index) / batch`` of a pass, BatchNorm running
  statistics as in a later pass (ESAM's pass over the samples it selects).
- ``closure_with(term)``: a closure like the step's own whose loss is the training loss plus
  ``term(logits, x, ids)``: the pass's logits (with graph), its inputs and its samples' dataset
  positions (``sample_ids`` of those samples); a trajectory loss (SAF, MESA). Called under the
  step's autocast.
- ``sample_ids``: the dataset positions of the batch's samples (a 1-D tensor on the device;
  ``dataset_size`` of them in all): SAF keys its record of past outputs by them.
- ``dataset_size``: the number of training samples ``sample_ids`` index into.
- ``epoch``: the epoch this step belongs to (0-based).
- ``class_counts``: training images per class (a 1-D tensor).
- ``grad_reducer(grads)``: averages gradients across devices in place; called before the base
  step, and before the perturbation too if ``reduce_perturbation_grads`` (by default each device
  perturbs with its own gradient, SAM's m-sharpness).
- ``before_base_step()``: called after the gradients are reduced, right before the base step; may
  clip them; returns ``False`` to skip the step (fp16 overflow). The weights are restored first
  either way.

Outputs (set by the method, read by the driver after the step):

- ``loss_is_perturbed``: whether the loss ``step`` returned was computed at ``w + e`` rather than
  at ``w`` (A²SAM's one-pass steps); ``None`` (the default) for methods whose loss is always at
  ``w``. The driver logs a perturbed loss under its own name.
- ``logged``: extra values to log for this step, by name (GSAM's ``rho``).
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import Tensor, nn

LossClosure = Callable[..., Tensor]
# A forward pass without backward, as a share of a training pass (forward + backward ≈ 3 forwards).
FORWARD_SHARE = 1.0 / 3.0
Reduce = Callable[[Tensor, Tensor], Tensor]


def chunk_slices(n: int, m: int) -> list[slice]:
    """The consecutive chunks of ``m`` of a batch of ``n`` samples (``chunk_closures``)."""
    if n % m:
        raise ValueError(f"m={m} (samples per perturbation, optimizer.m) must divide the batch "
                         f"({n} samples here): choose m among the divisors of the batch size")
    return [slice(i, i + m) for i in range(0, n, m)]


@dataclass
class StepContext:
    """What a driver offers one step (see the module docstring for each field)."""

    model: nn.Module | None = None
    loss_closure: LossClosure | None = None
    sample: Callable[[int], tuple[Tensor, Tensor]] | None = None
    extra_pass: Callable[..., AbstractContextManager] = field(default=lambda *a, **k: nullcontext())
    closure_of: Callable[[Reduce], Callable[[], Tensor]] | None = None
    batch_idx: int | None = None
    chunk_closures: Callable[[int], list[Callable[[], Tensor]]] | None = None
    micro_batch: int | None = None
    per_sample_losses: Callable[[], Tensor] | None = None
    closure_on: Callable[[Tensor], Callable[[], Tensor]] | None = None
    closure_with: Callable[[Callable[[Tensor, Tensor, Tensor], Tensor]], Callable[[], Tensor]] | None = None
    sample_ids: Tensor | None = None
    dataset_size: int | None = None
    epoch: int | None = None
    class_counts: Tensor | None = None
    grad_reducer: Callable[[list[Tensor]], None] | None = None
    reduce_perturbation_grads: bool = False
    before_base_step: Callable[[], bool] | None = None
    # outputs
    loss_is_perturbed: bool | None = None
    logged: dict[str, Any] = field(default_factory=dict)

    def require(self, name: str, method: str, example: str) -> Any:
        """The field ``name``, or an error that says how to supply it."""
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"{method}.step() needs context.{name} on this step; pass "
                             f"opt.step(closure, context=StepContext({name}=...)), e.g. {example}")
        return value



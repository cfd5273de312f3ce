"""Gradient accumulation: one step's batch run as ``k`` micro-batches, in the memory of one.

``accumulated_closure(closures, params)`` turns closures over the ``k`` micro-batches of a batch
into one closure over the batch::

    ∇ = (1/k) Σ_i ∇L_i(w),   loss = (1/k) Σ_i L_i(w)

(the batch's mean gradient when the micro-batches are equal in size, as
:func:`~sharpbench.optim.context.chunk_slices` makes them). Any optimizer steps with it as with
the batch's own closure: a one-pass optimizer takes one base step after the ``k`` micro-batches,
and a two-pass method that takes no ``m`` perturbs with the accumulated gradient (the same ``e``
for every micro-batch, the whole batch's). A method that takes ``m`` (SAM, ASAM, GSAM) perturbs
each micro-batch with its own gradient instead: the driver gives it the micro-batch size in
``StepContext.micro_batch``, and it takes m-sharpness's step with ``m`` = the micro-batch size
(:meth:`~sharpbench.optim.base.SharpnessAwareOptimizer.m_sharpness_step`), which is what
accumulation over ``k`` micro-batches computes when each perturbs with its own gradient, and
what DDP over ``k`` devices computes.

In a loop of your own (micro-batches ``(x_i, y_i)`` of one batch, ``closure_for(x, y)`` your
usual closure)::

    closure = accumulated_closure([closure_for(x, y) for x, y in micro], model.parameters())
    opt.step(closure)

BatchNorm running statistics: as for the batch (the first pass of a step updates them), from the
first micro-batch only (under DDP, rank 0's copy of its own micro-batch is the one kept); wrap the
closures with :func:`~sharpbench.optim.bn.chunk_bn_closures` for that.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor


def accumulated_closure(closures: list[Callable[..., Tensor]],
                        params: Iterable[Tensor]) -> Callable[..., Tensor]:
    """One closure whose gradient is the mean of ``closures``' gradients and whose loss is the
    mean of their losses; each closure zeroes the gradients, runs its pass and calls backward, as
    usual. Arguments of a call (ImbSAM's ``part``, a ``reduce``) go to every micro-batch's closure,
    so a method's own reduction of the per-sample losses is applied per micro-batch and averaged.
    Adds one ``torch._foreach_add_`` per micro-batch and one ``torch._foreach_mul_`` per call."""
    if not closures:
        raise ValueError("accumulated_closure needs at least one micro-batch closure")
    params = list(params)
    k = len(closures)

    def closure(*args, **kwargs) -> Tensor:
        totals: dict[Tensor, Tensor] = {}
        order: list[Tensor] = []
        losses = []
        with torch.no_grad():   # what .grad held on entry adds to nothing (as in a step's passes)
            for p in params:
                p.grad = None
        for part in closures:
            losses.append(part(*args, **kwargs))
            with torch.no_grad():
                have = [p for p in params if p.grad is not None]
                if len(have) == len(order) and all(a is b for a, b in zip(have, order)):
                    # the usual case: the same tensors every micro-batch
                    torch._foreach_add_([totals[p] for p in have], [p.grad for p in have])
                else:
                    for p in have:  # a tensor unused by some micro-batch: added by itself
                        if p in totals:
                            totals[p].add_(p.grad)
                        else:
                            totals[p] = p.grad
                            order.append(p)
                for p in have:      # the next closure starts from no gradient, zeroed or not
                    p.grad = None
        with torch.no_grad():
            grads = [totals[p] for p in order]
            if grads:
                torch._foreach_mul_(grads, 1.0 / k)
            for p, g in zip(order, grads):
                p.grad = g
        return torch.stack([loss.detach() for loss in losses]).mean()

    return closure

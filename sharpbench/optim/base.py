"""The shared machinery of every two-pass, sharpness-aware method.

A method in this family does, per step::

    g   = ∇L_B(w)                 closure() at w          (pass 1)
    e   = perturbation(g, w)      method-specific          (this is all a subclass writes)
    w  <- w + e
    g_p = ∇L_B(w + e)             closure() at w + e      (pass 2)
    w  <- w                       restore the saved weights exactly
    w  <- base_step(w, g_p)       the wrapped optimizer, with weight decay, at the original w

The wrapped ("base") optimizer owns learning rate, momentum and weight decay; the perturbation
never sees weight decay. The outer optimizer and the base optimizer share one ``param_groups``
list, so an LR scheduler attached to the outer optimizer drives the base step, and a method's
hyperparameters (``rho`` …) live in the same groups (a scheduler may change them too).

Closure protocol (the one PyTorch users know): ``step(closure)`` calls ``closure`` as often as the
method needs; the closure computes the loss, calls ``backward`` and returns the loss. ``step``
clears ``.grad`` before every call, so whatever ``.grad`` holds on entry (davda54/sam's README
calls ``loss.backward()`` before ``step(closure)``, and its closure does not zero the gradients)
never adds to the gradients the method uses. ``step`` returns the loss of the first call, at the
unperturbed weights.

Which steps are sharpness-aware: all by default; ``sam_every=k`` and ``sam_prob=p`` (any method
of this family, :mod:`sharpbench.optim.sharpness_schedule`) make the others plain base steps at
one pass. A method writes its step as :meth:`sharpness_step`; :meth:`step` chooses between it and
:meth:`plain_step`.

What a step needs beyond the closure (DDP gradient averaging, clipping, an fp16 overflow check,
and the inputs a few methods read) reaches it in one object, ``step(closure, context=...)``: see
:mod:`sharpbench.optim.context`.

Finer calls for drivers that need them (mixed precision by hand, DDP, davda54/sam's usage):

- ``first_step()``  perturb: ``w <- w + e`` from the current ``.grad`` (saving ``w``),
- ``restore()``     put the saved ``w`` back, exactly,
- ``base_step()``   the base optimizer's step with the current ``.grad``,
- ``second_step()`` ``restore()`` then the gradient correction, then ``base_step()``.

Each takes the same optional ``context``.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from .context import StepContext
from .sharpness_schedule import SharpnessSchedule

Closure = Callable[..., Tensor]
# Constructor keywords of every two-pass method that choose its sharpness-aware steps
# (``sam_every=k``, ``sam_prob=p``, ``sam_seed``); see sharpbench.optim.sharpness_schedule.
SCHEDULE_KEYS = ("sam_every", "sam_prob", "sam_seed")


class SharpnessAwareOptimizer(Optimizer):
    """Base class: wraps ``base_optimizer`` and implements perturb / restore / base step.

    Subclasses implement :meth:`perturbation` (and, for methods that are not "SAM with another
    perturbation", :meth:`step`). Class attributes document the cost and the protocol:

    - ``passes_per_step``: nominal closure calls per step (the driver measures the real count),
    - ``closure_parts``: if not ``None``, the closure takes one argument, ``part``, from this tuple
      (ImbSAM's head/tail losses).
    """

    passes_per_step: float = 2.0
    closure_parts: tuple[str, ...] | None = None
    # Whether the method's steps may be thinned out by ``sam_every`` / ``sam_prob``
    # (:mod:`sharpbench.optim.sharpness_schedule`); False for methods that have their own.
    takes_schedule: bool = True
    # Whether the method takes ``m`` (samples per perturbation on one device, equal to DDP with
    # batch/m devices): only methods whose perturbation keeps no state that a chunk would advance.
    takes_m: bool = False

    def __init__(self, params: Iterable, base_optimizer: type[Optimizer] | Callable[..., Optimizer],
                 method_defaults: dict, **base_kwargs):
        if isinstance(base_optimizer, Optimizer):
            raise TypeError("base_optimizer must be an optimizer class (e.g. torch.optim.SGD), "
                            "not an instance; pass its hyperparameters as keyword arguments")
        self.m = base_kwargs.pop("m", None)
        if self.m is not None:
            if not self.takes_m:
                raise ValueError(f"{type(self).__name__} does not take m (samples per "
                                 "perturbation): its perturbation keeps state a chunk would "
                                 "advance; leave m unset (null)")
            if isinstance(self.m, bool) or int(self.m) != self.m or self.m < 1:
                raise ValueError(f"m (samples per perturbation) must be an integer >= 1 or "
                                 f"None (the whole batch), got {self.m!r}")
            self.m = int(self.m)
        self.schedule = SharpnessSchedule(**{key[4:]: base_kwargs.pop(key)
                                             for key in SCHEDULE_KEYS if key in base_kwargs})
        if self.schedule.active and not self.takes_schedule:
            raise ValueError(f"{type(self).__name__} chooses its own sharpness-aware steps; "
                             "leave sam_every=1 and sam_prob=1.0")
        defaults = dict(method_defaults, **base_kwargs)
        super().__init__(params, defaults)
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        # One list of groups for both: schedulers and hyperparameter changes reach the base step.
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        # Per-optimizer state that is not per parameter (step counters, eigenvalues); saved and
        # restored by state_dict() like the per-parameter state.
        self.method_state: dict = {}
        self._saved: dict[Tensor, Tensor] = {}  # w before the perturbation (not optimizer state)
        self._perturbed: list[Tensor] = []
        self._buffers: dict = {}  # FlatBuffers by name (flat_buffer / flat_state), allocated once

    # ----------------------------------------------------------------- what a subclass writes
    def perturbation(self) -> dict[Tensor, Tensor]:
        """Return ``{param: e}`` computed from the current ``param.grad`` (no side effects on w)."""
        raise TypeError(f"{type(self).__name__} does not define perturbation()")

    def gradient_correction(self) -> None:
        """Change ``.grad`` (the gradient at ``w + e``) in place before the base step; by default
        nothing. GSAM subtracts part of the orthogonal gradient, X-SAM part of the component along
        the top Hessian eigenvector."""

    # ----------------------------------------------------------------------- the machinery
    def params_with_grad(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.grad is not None]

    def params_and_rhos(self) -> tuple[list[Tensor], list[float]]:
        """The parameters that have a gradient, and each one's group ``rho``."""
        pairs = [(p, g["rho"]) for g in self.param_groups for p in g["params"] if p.grad is not None]
        return [p for p, _ in pairs], [r for _, r in pairs]

    def reduce_grads(self, context: StepContext | None = None) -> None:
        """Average gradients across devices with the context's ``grad_reducer`` (no-op without)."""
        if context is not None and context.grad_reducer is not None:
            context.grad_reducer([p.grad for p in self.params_with_grad()])

    def call_closure(self, closure: Closure, *args) -> Tensor:
        """One pass: clear ``.grad`` (so nothing held on entry is added to), then the closure with
        gradients enabled."""
        self.zero_grad(set_to_none=True)
        with torch.enable_grad():
            return closure(*args)

    @torch.no_grad()
    def perturb(self, eps: dict[Tensor, Tensor]) -> None:
        """Save ``w`` and move to ``w + e`` (two ``torch._foreach_*`` calls for all tensors)."""
        params, deltas = list(eps), list(eps.values())
        if not params:
            self._perturbed = []
            return
        torch._foreach_copy_(self.saved_buffers(params), params)
        torch._foreach_add_(params, deltas)
        self._perturbed = params

    def saved_buffers(self, params: list[Tensor]) -> list[Tensor]:
        """The buffers that hold ``w`` while it is perturbed (allocated once per parameter)."""
        out = []
        for p in params:
            saved = self._saved.get(p)
            if saved is None or saved.shape != p.shape or saved.dtype != p.dtype:
                saved = self._saved[p] = torch.empty_like(p)
            out.append(saved)
        return out

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, context: StepContext | None = None) -> None:
        """``w <- w + e(g)`` with ``g`` the current gradients."""
        if context is not None and context.reduce_perturbation_grads:
            self.reduce_grads(context)
        self.perturb(self.perturbation())
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def restore(self) -> None:
        """Put back the weights saved by :meth:`perturb` (bit-exact, one ``_foreach_copy_``)."""
        params = getattr(self, "_perturbed", [])
        if params:
            torch._foreach_copy_(params, [self._saved[p] for p in params])
        self._perturbed = []

    @torch.no_grad()
    def base_step(self, context: StepContext | None = None) -> bool:
        """Reduce gradients (the context's ``grad_reducer``), call its ``before_base_step``
        (clipping, overflow check), then the base optimizer's step unless that returned False.

        Returns whether the step was taken."""
        self.reduce_grads(context)
        if context is not None and context.before_base_step is not None \
                and not context.before_base_step():
            return False
        self.base_optimizer.step()
        return True

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, context: StepContext | None = None) -> bool:
        """Restore ``w``, then the base step with the (corrected) gradient at ``w + e``."""
        self.restore()
        self.gradient_correction()
        taken = self.base_step(context)
        if zero_grad:
            self.zero_grad()
        return taken

    @torch.no_grad()
    def step(self, closure: Closure | None = None, *args, **kwargs) -> Tensor:
        """One step: the method's :meth:`sharpness_step`, or, on a step that ``sam_every`` /
        ``sam_prob`` leave out, a plain base step (one pass at ``w``, :meth:`plain_step`).
        Further arguments go to :meth:`sharpness_step`."""
        if self.schedule.active and not self.schedule.due(self.method_state):
            context = kwargs.get("context")
            if context is None:
                context = next((a for a in args if isinstance(a, StepContext)), None)
            return self.plain_step(closure, context)
        return self.sharpness_step(closure, *args, **kwargs)

    @torch.no_grad()
    def sharpness_step(self, closure: Closure | None = None,
                       context: StepContext | None = None) -> Tensor:
        """SAM's step; ``closure`` is called twice (at ``w`` and at ``w + e``). A method with
        another step overrides this, not :meth:`step`. With ``m``: :meth:`m_sharpness_step`."""
        closure = require_closure(closure, type(self).__name__)
        if self.samples_per_perturbation(context) is not None:
            return self.m_sharpness_step(context)
        loss = self.call_closure(closure)
        self.perturbed_pass(closure, context)
        self.gradient_correction()
        self.base_step(context)
        return loss

    @torch.no_grad()
    def perturbed_pass(self, closure: Closure, context: StepContext | None = None) -> Tensor:
        """``w <- w + e(g)`` from the current gradients, the closure there (``.grad`` becomes
        ``∇L(w + e)``), then ``w`` restored exactly, also if the closure raises."""
        self.first_step(context=context)
        try:
            return self.call_closure(closure)
        finally:
            self.restore()

    def samples_per_perturbation(self, context: StepContext | None) -> int | None:
        """``m`` for this step: the method's own, else the driver's micro-batch size (gradient
        accumulation: each micro-batch perturbs with its own gradient), for a method that takes
        ``m``; ``None``: one perturbation for the batch."""
        micro = None if context is None else context.micro_batch
        if not self.takes_m or micro is None:
            return self.m
        if self.m is not None and micro % self.m:
            raise ValueError(f"m={self.m} (samples per perturbation, optimizer.m) must divide the "
                             f"micro-batch of {micro} samples (trainer.micro_batches): choose m "
                             f"among the divisors of {micro}, or leave it unset")
        return self.m if self.m is not None else micro

    @torch.no_grad()
    def m_sharpness_step(self, context: StepContext | None) -> Tensor:
        """m-sharpness on one device (Foret et al. 2021, section 4.1): the batch in chunks of
        ``m`` samples, each perturbed with its own gradient::

            for chunk i:  g_i = ∇L_i(w),  e_i = e(g_i),  h_i = corrected ∇L_i(w + e_i)
            w <- base_step(w, mean_i h_i)

        which is what DDP over batch/m devices computes (each device perturbs with its own
        gradient; the base step averages). Two passes over the batch in FLOPs, in 2·batch/m
        smaller ones. Returns the mean chunk loss at ``w`` (the batch loss)."""
        if context is None or context.chunk_closures is None:
            raise ValueError(f"{type(self).__name__} with m={self.m} needs context.chunk_closures "
                             "(closures over chunks of m samples); the Lightning module and the "
                             "bench offer them; in a loop of your own pass "
                             "StepContext(chunk_closures=lambda m: [closure over x[i:i+m], ...])")
        closures = context.chunk_closures(self.samples_per_perturbation(context))
        total, losses = None, []
        for chunk in closures:
            losses.append(self.call_closure(chunk))
            self.perturbed_pass(chunk, context)
            self.gradient_correction()
            params = self.params_with_grad()
            grads = [p.grad for p in params]
            if total is None:
                total = flat_buffer(self._buffers, "m_sum", grads).load(grads) \
                    if FlatBuffer.fits(grads) else [g.clone() for g in grads]
            elif isinstance(total, FlatBuffer):
                torch._foreach_add_(total.views, grads)
            else:
                torch._foreach_add_(total, grads)
        views = total.views if isinstance(total, FlatBuffer) else total
        torch._foreach_mul_(views, 1.0 / len(closures))
        torch._foreach_copy_(grads, views)
        self.base_step(context)
        return torch.stack(losses).mean()

    @torch.no_grad()
    def plain_step(self, closure: Closure | None = None,
                   context: StepContext | None = None) -> Tensor:
        """The base optimizer's step with the gradient at ``w`` (one pass; nothing of the
        method's own runs or advances)."""
        closure = require_closure(closure, type(self).__name__)
        loss = self.call_closure(closure)
        self.base_step(context)
        self.method_state["plain_steps"] = self.method_state.get("plain_steps", 0) + 1
        return loss

    # ------------------------------------------------------------------ state (checkpoints)
    def state_dict(self) -> dict:
        state = super().state_dict()
        state["base_optimizer"] = self.base_optimizer.state_dict()
        state["method_state"] = dict(self.method_state)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        base_state = state_dict.pop("base_optimizer")
        method_state = dict(state_dict.pop("method_state", {}))
        super().load_state_dict(state_dict)
        self.base_optimizer.load_state_dict(base_state)
        # torch rebuilds the group dicts on load: carry this optimizer's view of them over and
        # share them again.
        for mine, base in zip(self.param_groups, self.base_optimizer.param_groups):
            for key, value in mine.items():
                base.setdefault(key, value)
        self.param_groups = self.base_optimizer.param_groups
        like = next(p for g in self.param_groups for p in g["params"])
        self.method_state.update({k: v.to(device=like.device, dtype=like.dtype)
                                  if isinstance(v, Tensor) and v.is_floating_point() else v
                                  for k, v in method_state.items()})


class HessianCounters:
    """Mixin for methods that use Hessian-vector products (A²SAM, X-SAM): cost counters kept in
    ``method_state`` (so they survive a checkpoint), as python ints."""

    def init_counters(self) -> None:
        self.method_state.update(num_closure_calls=0, num_loss_closure_calls=0, num_hvps=0,
                                 num_eigen_solves=0)

    @property
    def num_hvps(self) -> int:
        return self.method_state["num_hvps"]

    @property
    def num_closure_calls(self) -> int:
        return self.method_state["num_closure_calls"]

    @property
    def num_loss_closure_calls(self) -> int:
        return self.method_state["num_loss_closure_calls"]

    @property
    def num_eigen_solves(self) -> int:
        return self.method_state["num_eigen_solves"]

    @property
    def passes(self) -> int:
        """Forward/backward passes so far, an HVP and a ``loss_closure`` call counted as one each."""
        s = self.method_state
        return s["num_closure_calls"] + s["num_loss_closure_calls"] + s["num_hvps"]

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]


def require_closure(closure: Closure | None, name: str) -> Closure:
    if closure is None:
        raise ValueError(
            f"{name}.step() needs a closure: def closure(): opt.zero_grad(); loss = loss_fn(); "
            "loss.backward(); return loss — then call opt.step(closure). The method evaluates the "
            "gradient more than once per step, so it cannot be stepped without one.")
    return closure


class FlatBuffer:
    """One contiguous buffer with a view per tensor of ``like`` (same shapes, order, dtype):
    copying a list of tensors in is one ``_foreach_copy_``, and a reduction over all of them
    (a dot product, a sum) is one op on ``.flat``."""

    def __init__(self, like: list[Tensor]):
        self.shapes = [t.shape for t in like]
        self.flat = torch.empty(sum(t.numel() for t in like), dtype=like[0].dtype,
                                device=like[0].device)
        self.views = [v.view(shape) for v, shape in
                      zip(self.flat.split([t.numel() for t in like]), self.shapes)]

    @staticmethod
    def fits(like: list[Tensor]) -> bool:
        """Whether one buffer can hold them (one dtype, one device)."""
        return bool(like) and all(t.dtype == like[0].dtype and t.device == like[0].device
                                  for t in like)

    def holds(self, tensors: list[Tensor]) -> bool:
        """Whether ``tensors`` are this buffer's views (the very objects, in order)."""
        return len(tensors) == len(self.views) and all(a is b for a, b in zip(self.views, tensors))

    def matches(self, like: list[Tensor]) -> bool:
        return (len(like) == len(self.shapes) and self.flat.dtype == like[0].dtype
                and self.flat.device == like[0].device
                and all(t.shape == s for t, s in zip(like, self.shapes)))

    def load(self, tensors: list[Tensor]) -> "FlatBuffer":
        torch._foreach_copy_(self.views, tensors)
        return self


def flat_buffer(cache: dict, key: str, like: list[Tensor]) -> FlatBuffer:
    """The ``FlatBuffer`` cached under ``key`` if it fits ``like``, else a new one."""
    buf = cache.get(key)
    if buf is None or not buf.matches(like):
        buf = cache[key] = FlatBuffer(like)
    return buf


def flat_state(state: dict, cache: dict, key: str, params: list[Tensor]) -> FlatBuffer | None:
    """Per-parameter state ``state[p][key]`` for every ``p`` in ``params``, kept as the views of one
    ``FlatBuffer`` (cached under ``key``), so a method can use it flat (one dot product, one
    matrix product) or per tensor (a foreach op) without a per-tensor op.

    When the entries are not that buffer's views (the first call, after ``load_state_dict``, or
    when a user assigned them), they are copied into a new buffer (one ``_foreach_copy_``) and
    ``state[p][key]`` is rebound to its views. Returns ``None`` if some ``p`` has no entry or the
    entries do not fit one buffer (mixed dtypes or devices): the caller then works per tensor."""
    current = [state[p].get(key) for p in params]
    if not current or any(t is None for t in current):
        return None
    buf = cache.get(key)
    if buf is not None and buf.holds(current):
        return buf
    if not FlatBuffer.fits(current):
        return None
    return new_flat_state(state, cache, key, params, like=current).load(current)


def new_flat_state(state: dict, cache: dict, key: str, params: list[Tensor],
                   like: list[Tensor] | None = None) -> FlatBuffer:
    """A new ``FlatBuffer`` shaped like ``like`` (default: ``params``), cached under ``key``, whose
    views become ``state[p][key]`` (uninitialised: the caller fills ``.flat``)."""
    buf = cache[key] = FlatBuffer(list(params if like is None else like))
    bind_views(state, key, params, buf)
    return buf


def bind_views(state: dict, key: str, params: list[Tensor], buf: FlatBuffer) -> None:
    """``state[p][key] = `` the buffer's view for ``p``, for every ``p`` in ``params``."""
    for p, view in zip(params, buf.views):
        state[p][key] = view


def global_grad_norm(grads: list[Tensor], ord: float = 2.0) -> Tensor:
    """``||g||_ord`` over all tensors together: the norm of the per-tensor norms (one
    ``torch._foreach_norm`` and one reduction, whatever the number of tensors; on the gradients'
    device, no host sync)."""
    if not grads:
        raise ValueError("no parameter has a gradient: did the closure call backward()?")
    with torch.no_grad():
        per_tensor = torch.stack(torch._foreach_norm(grads, ord))
        return torch.linalg.vector_norm(per_tensor, ord)


def scaled(tensors: list[Tensor], factor: Tensor | None, per_tensor: list[float]) -> list[Tensor]:
    """``[t · (factor · c_i)]`` for a 0-d tensor ``factor`` (``None``: 1) and python scalars
    ``c_i`` (a group's ``rho``): one ``torch._foreach_mul`` per distinct ``c`` (per parameter
    group, in practice), no host sync."""
    out: list[Tensor | None] = [None] * len(tensors)
    for c, idx in group_indices(per_tensor).items():
        by = c if factor is None else factor * c
        for i, t in zip(idx, torch._foreach_mul([tensors[i] for i in idx], by)):
            out[i] = t
    return out


def group_indices(keys: list) -> dict:
    """``{key: [positions]}`` in first-seen order (to call one foreach op per distinct key)."""
    groups: dict = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    return groups


def check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")

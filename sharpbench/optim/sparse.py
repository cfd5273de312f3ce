"""Sparse SAM (SSAM-F, SSAM-D): the SAM perturbation restricted to a binary mask."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .base import (FlatBuffer, SharpnessAwareOptimizer, check_positive, flat_buffer, flat_state,
                   global_grad_norm, new_flat_state, require_closure, scaled)
from .context import StepContext
from .fisher import check_fisher_options, fisher_terms
from .registry import register_method
from ..typed_config import key
from .step_config import ScheduleKeys, SGDStep, bn_policy_key, rho_key

FisherClosure = Callable[[], "int | tuple[list[Tensor], int]"]

PERTURBATION_NORMS = ("masked", "full")
MASK_ROUNDINGS = ("half_up", "floor")
UPDATE_UNITS = ("step", "epoch")
REFRESH_TIMINGS = ("current_step", "next_step")


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


@dataclass
class SparseSAMConfig(SGDStep, ScheduleKeys):
    """SSAM's keys. The benchmark recipe (Feldman 2025, Table 1): sparsity 0.5, K = 5, rho 0.05.
    The authors' released code (Mi-Peng/Sparse-Sharpness-Aware-Minimization, solver/sam.py)
    differs in four places; each is a switch (theirs: full, floor, epoch, next_step)."""
    rho: float = rho_key(0.05)
    sparsity: float = key(0.5, "SSAM: fraction of coordinates NOT perturbed", spec="float in [0, 1)")
    update_interval: int = key(5, "SSAM: steps (or epochs, see update_unit) between mask updates (K)",
                               spec="int >= 1")
    perturbation_norm: str = key("masked", "SSAM: normalise the perturbation by the masked "
                                           "gradient's norm, e = rho (m*g)/||m*g|| (masked, norm "
                                           "rho), or by the full gradient's (full: theirs)",
                                 spec="masked | full")
    mask_rounding: str = key("half_up", "SSAM: perturbed coordinates round((1-s) d) (half_up) or "
                                        "int((1-s) d) (floor: theirs)", spec="half_up | floor")
    update_unit: str = key("step", "SSAM: update_interval counts optimizer steps (the benchmark) or "
                                   "epochs (theirs)", spec="step | epoch")
    refresh_timing: str = key("current_step", "SSAM: a new mask is used from the step that "
                                              "computed it or from the next one (next_step: theirs)",
                              spec="current_step | next_step")
    bn_policy: str = bn_policy_key()    # both_passes: theirs


@dataclass
class SSAMFConfig(SparseSAMConfig):
    """n_s = 256 (the benchmark; the authors' argument default: 1024)."""
    num_samples: int = key(256, "SSAM-F: training samples of the Fisher estimate per mask update "
                                "(n_s)", spec="int >= 1")
    fisher_estimator: str = key("per_sample", "SSAM-F: empirical Fisher from per-sample gradients "
                                              "(the paper; the authors loop a batch-1 loader) or "
                                              "from squared chunk-mean gradients (chunked: cheaper, "
                                              "neither the paper's nor the authors')",
                                spec="per_sample | chunked")
    fisher_method: str = key("auto", "SSAM-F: how the exact per-sample gradients are computed "
                                     "(same result): one backward per sample (loop), torch.func "
                                     "vmap, a batched backward (batched, fisher_bn=eval only), or "
                                     "auto: the one measured fastest on the device (loop on CPU, "
                                     "vmap on a GPU)", spec="auto | loop | vmap | batched")
    fisher_batch_size: int = key(32, "SSAM-F: samples per Fisher call (per_sample: per vectorised "
                                     "pass, memory only; chunked: the chunk whose mean gradient is "
                                     "squared)", spec="int >= 1")
    fisher_bn: str = key("eval", "SSAM-F: BatchNorm during the Fisher estimate: running statistics "
                                 "(eval) or each sample normalised by its own (train, as the "
                                 "authors' batch-1 loop in train mode)", spec="eval | train")


@dataclass
class SSAMDConfig(SparseSAMConfig):
    """Drop 20% / grow 20% (the benchmark; the authors' argument default drop_rate: 0.5)."""
    drop_rate: float = key(0.2, "SSAM-D: fraction of active mask coordinates dropped (and as many "
                                "grown) per update", spec="float in [0, 1]")
    seed: int = key(0, "SSAM-D: seed of the initial mask and the random growth (draws come from "
                       "(seed, step))", spec="int >= 0")
    drop_schedule: str = key("constant", "SSAM-D: drop rate constant, or decayed on a cosine over "
                                         "the epochs (cosine: theirs, drop_rate (1 + cos(pi epoch "
                                         "/ epochs)) / 2)", spec="constant | cosine")


class SparseSAM(SharpnessAwareOptimizer):
    """Common machinery of SSAM-F and SSAM-D (Mi et al., "Make Sharpness-Aware Minimization
    Stronger: A Sparsified Perturbation Approach", NeurIPS 2022).

    A binary mask ``m`` with ``||m||₀ = round((1-s)·d)`` ones, counted *globally* over all ``d``
    parameters of the optimizer (not per tensor), restricts SAM's perturbation::

        e  = rho · (m ⊙ g) / ||m ⊙ g||₂
        w <- base_step(w, ∇L_B(w + e))          (at the original w)

    The subclasses differ only in how the mask is chosen and refreshed (every
    ``update_interval`` = K steps, at steps 0, K, 2K, …). Optimizer state, all saved by
    ``state_dict()``: ``self.state[p]["mask"]`` (0/1 in the parameter's dtype: torch casts
    floating state to the parameter's dtype on load, so a bool mask would not survive a round
    trip unchanged) and ``self.state[p]["step"]`` (python int, steps taken; identical for every
    parameter). A mask that does not exist yet counts as full (a dense SAM perturbation); each
    subclass makes sure one exists before it is first used.

    Switches (defaults: the paper's formulas; the other value: the authors' released code,
    Mi-Peng/Sparse-Sharpness-Aware-Minimization, ``solver/sam.py``):

    - ``perturbation_norm``: ``"masked"`` normalises by ``||m ⊙ g||`` (``||e|| = rho``);
      ``"full"`` by ``||g||`` as their ``first_step`` does (``e = rho·(m ⊙ g)/||g||``,
      ``||e|| < rho``).
    - ``mask_rounding``: ``"half_up"`` keeps ``floor((1-s)·d + 0.5)`` coordinates; ``"floor"``
      keeps ``int((1-s)·d)`` (their SSAM-F) or ``d - ceil(s·d)`` (their SSAM-D's initial mask).
    - ``update_unit``: ``"step"`` refreshes every K optimizer steps (the benchmark recipe);
      ``"epoch"`` every K epochs (their ``update_freq``, at the first batch of epochs 0, K, 2K, …),
      which needs ``steps_per_epoch`` (the Lightning module supplies it).
    - ``refresh_timing``: ``"current_step"`` uses a refreshed mask on the step that refreshes
      it; ``"next_step"`` refreshes after the step's perturbation is formed, as their code does
      (see each subclass).

    Cost: masks multiply a *dense* perturbation and the second pass is a dense forward/backward,
    so there is no wall-clock saving on GPUs (measured in the README).
    """

    def __init__(self, params, base_optimizer=torch.optim.SGD, rho: float = 0.05,
                 sparsity: float = 0.5, update_interval: int = 5, *,
                 perturbation_norm: str = "masked", mask_rounding: str = "half_up",
                 update_unit: str = "step", steps_per_epoch: int | None = None,
                 refresh_timing: str = "current_step", **base_kwargs):
        check_positive("rho", rho)
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity s must be in [0, 1) (fraction of coordinates NOT perturbed; "
                             f"0.5 in the paper), got {sparsity}")
        if int(update_interval) != update_interval or update_interval < 1:
            raise ValueError(f"update_interval K must be a positive integer, got {update_interval}")
        self.perturbation_norm = _choice("perturbation_norm", perturbation_norm, PERTURBATION_NORMS)
        self.mask_rounding = _choice("mask_rounding", mask_rounding, MASK_ROUNDINGS)
        self.update_unit = _choice("update_unit", update_unit, UPDATE_UNITS)
        self.refresh_timing = _choice("refresh_timing", refresh_timing, REFRESH_TIMINGS)
        if steps_per_epoch is not None and (int(steps_per_epoch) != steps_per_epoch
                                            or steps_per_epoch < 1):
            raise ValueError(f"steps_per_epoch must be a positive integer, got {steps_per_epoch}")
        if update_unit == "epoch" and steps_per_epoch is None:
            raise ValueError("update_unit='epoch' needs steps_per_epoch (optimizer steps per "
                             "epoch); the Lightning module passes it, plain PyTorch users pass "
                             "len(train_loader)")
        super().__init__(params, base_optimizer, dict(rho=rho), **base_kwargs)
        self.sparsity = float(sparsity)
        self.update_interval = int(update_interval)
        self.steps_per_epoch = None if steps_per_epoch is None else int(steps_per_epoch)

    # ---------------------------------------------------------------------------- bookkeeping
    def all_params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.all_params())

    @property
    def num_active(self) -> int:
        """``||m||₀``: ``floor((1-s)·d + 0.5)`` (``half_up``) or ``int((1-s)·d)`` (``floor``)."""
        d = self.num_params
        if self.mask_rounding == "floor":
            return int(d * (1.0 - self.sparsity))
        return int(math.floor((1.0 - self.sparsity) * d + 0.5))

    @property
    def refresh_period(self) -> int:
        """Steps between refreshes: K, or K·steps_per_epoch with ``update_unit='epoch'``."""
        if self.update_unit == "epoch":
            return self.update_interval * self.steps_per_epoch
        return self.update_interval

    @property
    def steps_taken(self) -> int:
        params = self.all_params()
        return int(self.state[params[0]].get("step", 0)) if params else 0

    def refresh_due(self) -> bool:
        """Whether the mask is refreshed on the coming step (steps 0, P, 2P, …, P the
        :attr:`refresh_period`)."""
        return self.steps_taken % self.refresh_period == 0

    def _advance_step(self) -> None:
        t = self.steps_taken + 1
        for p in self.all_params():
            self.state[p]["step"] = t

    def masks(self) -> dict[Tensor, Tensor]:
        """``{param: mask}`` for the parameters that have one."""
        return {p: self.state[p]["mask"] for p in self.all_params() if "mask" in self.state[p]}

    def mask_density(self) -> float:
        """Fraction of coordinates in the mask (1.0 before any mask exists)."""
        masks = self.masks()
        if not masks:
            return 1.0
        return float(sum(m.sum().item() for m in masks.values())) / self.num_params

    def _flat(self, tensors: list[Tensor]) -> Tensor:
        device = tensors[0].device
        return torch.cat([t.reshape(-1).to(device) for t in tensors])

    @torch.no_grad()
    def _set_masks(self, flat_mask: Tensor, active: int | None = None) -> None:
        """Store a flat bool mask as every parameter's mask (in its dtype). The masks are the
        views of one flat buffer when the parameters share a dtype and device, so storing one
        is a single copy and reading them back flat costs nothing. ``active``: the number of
        ones, when the caller knows it (kept so that the next refresh need not count them on
        the device and read the count back)."""
        self.method_state["mask_active"] = active
        params = self.all_params()
        buf = flat_state(self.state, self._buffers, "mask", params)
        if buf is None and FlatBuffer.fits(params):
            buf = new_flat_state(self.state, self._buffers, "mask", params)
        if buf is not None:
            buf.flat.copy_(flat_mask)
            return
        offset = 0
        for p in params:
            n = p.numel()
            self.state[p]["mask"] = (flat_mask[offset:offset + n].view_as(p)
                                     .to(device=p.device, dtype=p.dtype))
            offset += n

    def _flat_masks(self, params: list[Tensor]) -> Tensor:
        """The current mask as one flat bool vector."""
        buf = flat_state(self.state, self._buffers, "mask", params)
        if buf is not None:
            return buf.flat.bool()
        return self._flat([self.state[p]["mask"] for p in params]).bool()

    def _flat_abs_grads(self, params: list[Tensor]) -> Tensor:
        """``|g|`` of every parameter as one flat vector (zeros where a gradient is missing)."""
        grads = [p.grad for p in params]
        if all(g is not None for g in grads) and FlatBuffer.fits(grads):
            return flat_buffer(self._buffers, "grad", grads).load(grads).flat.abs()
        return self._flat([g.detach().abs() if g is not None else torch.zeros_like(p)
                           for g, p in zip(grads, params)])

    @torch.no_grad()
    def _top_k_mask(self, scores: Tensor, k: int) -> Tensor:
        """Flat bool mask with ones at the ``k`` largest ``scores`` (ties broken arbitrarily)."""
        mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
        if k > 0:
            mask[torch.topk(scores, k, sorted=False).indices] = True
        return mask

    # ------------------------------------------------------------------------- the method
    def _before_perturbation(self) -> None:
        """Subclass hook: make sure the mask of the current step exists (refresh it if due)."""

    def _after_perturbation(self) -> None:
        """Subclass hook, after ``e`` is formed and before the step counter advances."""

    @torch.no_grad()
    def masked_perturbation(self) -> dict[Tensor, Tensor]:
        """``rho·(m ⊙ g)/||m ⊙ g||`` (or ``/||g||`` with ``perturbation_norm='full'``); a fixed
        number of foreach ops for all tensors once every parameter has its mask."""
        params, masks, rhos = [], [], []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                params.append(p)
                masks.append(self.state[p].get("mask"))
                rhos.append(group["rho"])
        if not params:
            raise ValueError("no parameter has a gradient: did the closure call backward()?")
        grads = [p.grad for p in params]
        if all(m is not None for m in masks):
            masked = torch._foreach_mul(grads, masks)
        else:
            masked = [g * m if m is not None else g.clone() for g, m in zip(grads, masks)]
        norm_of = masked if self.perturbation_norm == "masked" else grads
        inv_norm = 1.0 / (global_grad_norm(norm_of, 2.0) + 1e-12)
        return dict(zip(params, scaled(masked, inv_norm, rhos)))

    @torch.no_grad()
    def perturbation(self) -> dict[Tensor, Tensor]:
        self._before_perturbation()
        eps = self.masked_perturbation()
        self._after_perturbation()
        self._advance_step()
        return eps


@register_method("ssam_f", label="SSAM-F", passes=2, order=40, needs=("sample", "model"),
                 config=SSAMFConfig,
                 claimed_cost="2 (the benchmark's two-pass group)",
                 paper='Mi et al., "Make Sharpness-Aware Minimization Stronger: A Sparsified '
                       'Perturbation Approach", NeurIPS 2022 (Fisher mask)')
class SSAMF(SparseSAM):
    """SSAM-F: Sparse SAM with a Fisher-information mask (Mi et al., NeurIPS 2022).

    Every K steps (steps 0, K, 2K, …), *before* the step's own closure, the mask is rebuilt from
    the empirical Fisher diagonal over ``num_samples`` = n_s training samples::

        F_i = (1/n_s) Σ_j (∂ log p(y_j | x_j; w) / ∂w_i)²        (one squared gradient per sample)

    keeping the ``round((1-s)·d)`` coordinates with the largest ``F_i`` (global top-k, ties broken
    arbitrarily); then the step is a sparse SAM step (see :class:`SparseSAM`). Because step 0
    refreshes, a mask always exists before it is used.

    ``step(closure, fisher_closure=None, context=None)``. With a step context that offers ``model``
    and ``sample`` (the Lightning module's), the step builds the Fisher closure itself: each call
    draws ``fisher_batch_size`` un-augmented training samples (``context.sample``) and returns
    :func:`sharpbench.optim.fisher.fisher_terms` of them, with ``fisher_estimator``,
    ``fisher_method`` and BatchNorm per ``fisher_bn``. Otherwise ``fisher_closure()`` (given by
    hand) is called until ``num_samples``
    samples are seen; each call returns either

    - ``(S, n)``: for every parameter of the optimizer (:meth:`all_params` order), ``S`` the sum
      over ``n`` samples of squared per-sample gradients of the negative log-likelihood (true
      labels). :func:`sharpbench.optim.fisher.fisher_terms` computes it in batched passes
      (``torch.func``), per sample (the default, the paper's and the authors' estimator) or
      chunked; or
    - ``n`` (an ``int``): the closure zeroed the gradients and back-propagated the *mean* NLL over
      ``n`` samples; SSAM-F accumulates ``n·grad²``. With ``n = 1`` per call this is the
      per-sample Fisher at one backward per sample; larger chunks give the chunked estimator
      ``Σ n_c·ḡ_c²``, which also contains the cross terms ``∇ℓ_i ⊙ ∇ℓ_j`` and which neither the
      paper nor the authors' code uses (their ``update_mask`` loops a ``batch_size=1`` loader),
      and which selects a different mask (``tests/test_parity.py`` shows one).

    The Fisher sum is divided by the samples seen; the gradients are zeroed after the Fisher
    passes, so the step itself is unaffected. ``num_fisher_passes`` counts ``fisher_closure``
    calls. The driver should leave BatchNorm running statistics alone during the estimate (the
    closure built from a step context evaluates it with BatchNorm in eval mode by default,
    ``fisher_bn``) and, under DDP, skip the gradient all-reduce. Drivers that call :meth:`first_step` themselves
    call :meth:`refresh_mask` first whenever :meth:`refresh_due` is true.

    The authors' schedule (``refresh_timing="next_step"``, with ``update_unit="epoch"`` their
    ``update_freq``): the mask starts all zeros, so the first step perturbs nothing (a plain
    base step at two passes' cost), and a due refresh runs *after* that step's base step, from
    the Fisher at the updated weights; the new mask is used from the next step on. Not
    reproduced: their first Fisher sample is back-propagated onto the gradient left by the step
    (their ``update_mask`` does not zero it first), and their ``batch_size=1`` forwards in train
    mode overwrite the BatchNorm running statistics.

    Defaults (the benchmark recipe, Feldman 2025, Table 1): s = 0.5, K = 5 steps, n_s = 256,
    rho 0.05. The authors' argument defaults (``configs/defaulf_cfg.py``): sparsity 0.2,
    ``update_freq`` 5 (epochs), ``num_samples`` 1024, rho 0.05.
    """

    def __init__(self, params, base_optimizer=torch.optim.SGD, rho: float = 0.05,
                 sparsity: float = 0.5, update_interval: int = 5, num_samples: int = 256,
                 fisher_estimator: str = "per_sample", fisher_method: str = "auto",
                 fisher_batch_size: int = 32, fisher_bn: str = "eval", **kwargs):
        if int(num_samples) != num_samples or num_samples < 1:
            raise ValueError(f"num_samples (n_s) must be a positive integer, got {num_samples}")
        check_fisher_options(fisher_estimator, fisher_bn, fisher_batch_size, fisher_method)
        super().__init__(params, base_optimizer, rho=rho, sparsity=sparsity,
                         update_interval=update_interval, **kwargs)
        self.num_samples = int(num_samples)
        self.fisher_estimator, self.fisher_method = fisher_estimator, fisher_method
        self.fisher_batch_size, self.fisher_bn = int(fisher_batch_size), fisher_bn
        self.num_fisher_passes = 0

    def fisher_closure_of(self, context: StepContext) -> FisherClosure:
        """A Fisher closure over ``fisher_batch_size`` samples per call from ``context.sample``."""
        model = context.require("model", "SSAMF", "the network being trained")
        sample = context.require("sample", "SSAMF", "a function n -> (x, y) of training samples")
        params = self.all_params()

        def fisher_closure():
            x, y = sample(self.fisher_batch_size)
            with context.extra_pass(len(y)):
                return fisher_terms(model, params, x, y, estimator=self.fisher_estimator,
                                    batch_size=self.fisher_batch_size, bn=self.fisher_bn,
                                    method=self.fisher_method)
        return fisher_closure

    @torch.no_grad()
    def fisher_diagonal(self, fisher_closure: FisherClosure) -> list[Tensor]:
        """Estimate of ``F`` for every parameter (``self.all_params()`` order): views of one flat
        buffer that the next call overwrites (copy them to keep them)."""
        params = self.all_params()
        if FlatBuffer.fits(params):   # one zero_ and one foreach op per chunk, flat for the top-k
            buf = flat_buffer(self._buffers, "fisher", params)
            buf.flat.zero_()
            acc = buf.views
        else:
            acc = [torch.zeros_like(p) for p in params]
        seen = 0
        while seen < self.num_samples:
            with torch.enable_grad():
                out = fisher_closure()
            self.num_fisher_passes += 1
            if isinstance(out, tuple):
                sums, n = out
                if len(sums) != len(params):
                    raise ValueError(f"fisher_closure returned {len(sums)} tensors; expected one "
                                     f"per optimizer parameter ({len(params)})")
                torch._foreach_add_(acc, list(sums))
            else:
                n = out
                have = [i for i, p in enumerate(params) if p.grad is not None]
                grads = [params[i].grad for i in have]
                if grads:
                    torch._foreach_addcmul_([acc[i] for i in have], grads, grads,
                                            value=float(int(n)))
            n = int(n)
            if n <= 0:
                raise ValueError(f"fisher_closure must report the number of samples it used (> 0), "
                                 f"got {n}")
            seen += n
        self.zero_grad()
        torch._foreach_div_(acc, float(seen))
        return acc

    @torch.no_grad()
    def refresh_mask(self, fisher_closure: FisherClosure | None) -> None:
        """Rebuild the mask from the Fisher diagonal (top ``||m||₀`` coordinates)."""
        if fisher_closure is None:
            raise ValueError(
                "SSAMF refreshes its mask on this step and needs fisher_closure: call "
                "opt.step(closure, fisher_closure=fc), where fc() returns "
                "sharpbench.optim.fisher.fisher_terms(model, opt.all_params(), x, y) for a chunk "
                "of training samples (or back-propagates their mean NLL and returns their "
                f"count); it is called until {self.num_samples} samples are seen, every "
                f"{self.refresh_period} steps")
        diagonal = self.fisher_diagonal(fisher_closure)
        buf = self._buffers.get("fisher")
        scores = buf.flat if buf is not None and buf.holds(diagonal) else self._flat(diagonal)
        self._set_masks(self._top_k_mask(scores, self.num_active), active=self.num_active)
        t = self.steps_taken
        for p in self.all_params():
            self.state[p]["mask_step"] = t

    def _before_perturbation(self) -> None:
        params = self.all_params()
        if self.refresh_timing == "next_step":
            if "mask" not in self.state[params[0]]:
                self._set_masks(torch.zeros(self.num_params, dtype=torch.bool,
                                            device=params[0].device), active=0)
            return
        if self.refresh_due() and self.state[params[0]].get("mask_step") != self.steps_taken:
            raise RuntimeError(
                "SSAMF: the mask is due for a refresh on this step; call "
                "opt.refresh_mask(fisher_closure) before first_step() (opt.step(closure, "
                "fisher_closure=...) does this itself)")

    @torch.no_grad()
    def sharpness_step(self, closure=None, fisher_closure: FisherClosure | None = None,
             context: StepContext | None = None) -> Tensor:
        """One step: the Fisher passes if a refresh is due, then the two SAM passes (with
        ``refresh_timing="next_step"``: the two passes, then the Fisher passes)."""
        closure = require_closure(closure, type(self).__name__)
        due = self.refresh_due()
        if due and fisher_closure is None and context is not None and context.sample is not None:
            fisher_closure = self.fisher_closure_of(context)
        if due and self.refresh_timing == "current_step":
            self.refresh_mask(fisher_closure)
        elif due and fisher_closure is None:
            self.refresh_mask(None)                       # the clear error, before any pass
        loss = super().sharpness_step(closure, context)
        if due and self.refresh_timing == "next_step":
            self.refresh_mask(fisher_closure)
        return loss


DROP_SCHEDULES = ("constant", "cosine")


@register_method("ssam_d", label="SSAM-D", passes=2, order=50, config=SSAMDConfig,
                 claimed_cost="2 (the benchmark's two-pass group)",
                 paper='Mi et al., "Make Sharpness-Aware Minimization Stronger: A Sparsified '
                       'Perturbation Approach", NeurIPS 2022 (dynamic mask)')
class SSAMD(SparseSAM):
    """SSAM-D: Sparse SAM with a dynamic mask (Mi et al., NeurIPS 2022; dynamic sparse training).

    The initial mask is random (``round((1-s)·d)`` ones, seeded). Every K steps (steps 0, K, 2K,
    …), using the current step's gradient ``g`` at ``w`` (after the first pass, before ``e`` is
    formed):

    - drop: the ``round(r_t · ||m||₀)`` *active* coordinates with the smallest ``|g|``
      (coordinates without a gradient count as ``|g| = 0``) leave the mask;
    - grow: the same number of coordinates, chosen uniformly at random among those that were
      *inactive before the drop* (so a dropped coordinate is not regrown at once), join it;

    so ``||m||₀`` stays ``round((1-s)·d)``. Growth is random, as in the paper and in the
    authors' default (``growth_strategy='random'``, drop by ``'gradient'``). The number dropped
    is capped by the number of inactive coordinates. The drop rate ``r_t`` is ``drop_rate``
    (``drop_schedule="constant"``, the benchmark recipe) or, as in the authors' code
    (``DeathRate_Scheduler``), ``drop_rate·(1 + cos(π·epoch/total_epochs))/2``
    (``drop_schedule="cosine"``; needs ``steps_per_epoch`` and ``total_epochs``, supplied by the
    Lightning module).

    The authors' released code (Mi-Peng/Sparse-Sharpness-Aware-Minimization, ``solver/sam.py``)
    also differs in when the new mask is used: its ``step`` forms ``e`` with the old mask and
    updates the mask afterwards (from the same ``g``), so the new mask is first used on the next
    step (``refresh_timing="next_step"``); it keeps ``int((d - s·d)(1 - r_t))`` active
    coordinates and grows ``int(min((d - s·d)·r_t, s·d))`` (``mask_rounding="floor"``, so
    ``||m||₀`` may drift by rounding), refreshes every K *epochs*
    (``update_unit="epoch"``) and normalises ``e`` by ``||g||`` (``perturbation_norm="full"``).

    Randomness is reproducible and resumable: every draw uses a fresh ``torch.Generator`` on the
    parameters' device seeded from ``(seed, step)`` (the step counter is optimizer state), so a
    resumed optimizer draws exactly what the uninterrupted one would. The random stream depends
    on the device type (CPU and CUDA generators differ), and differs from the authors' (global
    ``torch.rand``).

    Defaults (the benchmark recipe, Feldman 2025, Table 1): s = 0.5, K = 5 steps, drop fraction
    0.2, rho 0.05. The authors' argument defaults (``configs/defaulf_cfg.py``): sparsity 0.2,
    ``drop_rate`` 0.5, ``update_freq`` 5 (epochs), rho 0.05.
    """

    def __init__(self, params, base_optimizer=torch.optim.SGD, rho: float = 0.05,
                 sparsity: float = 0.5, update_interval: int = 5, drop_rate: float = 0.2,
                 seed: int = 0, *, drop_schedule: str = "constant",
                 total_epochs: int | None = None, **kwargs):
        if not 0.0 <= drop_rate <= 1.0:
            raise ValueError(f"drop_rate must be in [0, 1] (0.2 in the paper), got {drop_rate}")
        _choice("drop_schedule", drop_schedule, DROP_SCHEDULES)
        if drop_schedule == "cosine" and (total_epochs is None or kwargs.get("steps_per_epoch")
                                          is None):
            raise ValueError("drop_schedule='cosine' decays the drop rate over epochs and needs "
                             "total_epochs and steps_per_epoch (the Lightning module supplies "
                             "both)")
        super().__init__(params, base_optimizer, rho=rho, sparsity=sparsity,
                         update_interval=update_interval, **kwargs)
        self.drop_rate = float(drop_rate)
        self.seed = int(seed)
        self.drop_schedule = drop_schedule
        self.total_epochs = None if total_epochs is None else int(total_epochs)

    def _generator(self, step: int, device: torch.device) -> torch.Generator:
        gen = torch.Generator(device=device)
        # Distinct (seed, step) pairs give distinct seeds for any realistic run length; step -1
        # is the initial mask.
        gen.manual_seed((self.seed * 1_000_000_007 + step + 1) % (2 ** 63 - 1))
        return gen

    def drop_rate_at(self, step: int) -> float:
        """``r_t``: constant, or the authors' cosine over epochs."""
        if self.drop_schedule == "constant":
            return self.drop_rate
        epoch = step // self.steps_per_epoch
        return self.drop_rate * (1.0 + math.cos(math.pi * epoch / self.total_epochs)) / 2.0

    @torch.no_grad()
    def init_mask(self) -> None:
        """Random mask with ``||m||₀`` ones (``d - ceil(s·d)`` with ``mask_rounding='floor'``),
        from ``(seed, step=-1)``."""
        device = self.all_params()[0].device
        d = self.num_params
        k = d - math.ceil(d * self.sparsity) if self.mask_rounding == "floor" else self.num_active
        scores = torch.rand(d, generator=self._generator(-1, device), device=device)
        self._set_masks(self._top_k_mask(scores, k), active=min(k, d))

    def _keep_and_grow(self, n_active: int, d: int, rate: float) -> tuple[int, int]:
        """How many active coordinates stay and how many inactive ones join."""
        if self.mask_rounding == "floor":
            dense = d - d * self.sparsity
            keep = int(dense * (1.0 - rate))
            grow = int(min(dense * rate, d * self.sparsity))
            return min(keep, n_active), min(grow, d - n_active)
        n_drop = min(int(math.floor(rate * n_active + 0.5)), d - n_active)
        return n_active - n_drop, n_drop

    @torch.no_grad()
    def update_mask(self) -> None:
        """Drop the smallest-|g| active coordinates, grow random inactive ones."""
        params = self.all_params()
        device = params[0].device
        active = self._flat_masks(params)
        n_active = self.method_state.get("mask_active")
        if n_active is None:  # masks set by hand or by an older sharpbench: count them (one read)
            n_active = int(active.sum().item())
        n_keep, n_grow = self._keep_and_grow(n_active, active.numel(),
                                             self.drop_rate_at(self.steps_taken))
        n_drop = n_active - n_keep
        if n_drop <= 0 and n_grow <= 0:
            return
        new = active.clone()
        if n_drop > 0:
            grad_abs = self._flat_abs_grads(params)
            drop_scores = grad_abs.masked_fill(~active, math.inf)
            new[torch.topk(drop_scores, n_drop, largest=False, sorted=False).indices] = False
        if n_grow > 0:
            grow_scores = torch.rand(active.numel(),
                                     generator=self._generator(self.steps_taken, device),
                                     device=device).masked_fill(active, -1.0)
            new[torch.topk(grow_scores, n_grow, sorted=False).indices] = True
        # the dropped coordinates were active (inactive ones scored +inf), the grown ones not
        self._set_masks(new, active=n_keep + n_grow)

    def _before_perturbation(self) -> None:
        if not self.masks():
            self.init_mask()
        if self.refresh_timing == "current_step" and self.refresh_due():
            self.update_mask()

    def _after_perturbation(self) -> None:
        if self.refresh_timing == "next_step" and self.refresh_due():
            self.update_mask()

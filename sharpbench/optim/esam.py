"""ESAM: SAM with stochastic weight perturbation and sharpness-sensitive data selection."""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import Tensor

from .base import SharpnessAwareOptimizer, check_positive, global_grad_norm, require_closure, scaled
from .context import StepContext
from .registry import register_method
from .step_config import SGDStep, bn_policy_key, rho_key
from ..typed_config import key

SDS_COUNTS = ("authors", "paper")
# The constant the authors add to the gradient norm before dividing (utils/Esam.py).
NORM_EPS = 1e-7


@dataclass
class ESAMConfig(SGDStep):
    """Du et al., ICLR 2022; the authors' ResNet-18 CIFAR settings (dydjw9/Efficient_SAM,
    run.sh): rho 0.05, beta 0.6, gamma 0.5 (their lr 0.05, weight decay 1e-3, batch 2 x 64 and
    cosine schedule are a recipe, not set here)."""
    rho: float = rho_key(0.05)
    beta: float = key(0.6, "ESAM's SWP: each parameter tensor is perturbed with probability beta "
                           "(drawn per tensor and step; the perturbation is scaled by 1/beta); "
                           "1: every tensor", spec="float in (0, 1]")
    gamma: float = key(0.5, "ESAM's SDS: the second pass runs on this fraction of the batch, the "
                            "samples whose loss rises most at w + e; >= 0.99: the whole batch",
                       spec="float in (0, 1]")
    sds_count: str = key("authors", "ESAM: how many samples SDS keeps of floor(gamma*batch) = k: "
                                    "k - 1 (authors: the authors' code keeps the samples strictly "
                                    "above the k-th largest) or k (paper)",
                         spec="authors | paper")
    adaptive: bool = key(False, "ESAM with ASAM's perturbation (e ∝ w²g, norm of |w|g), the "
                                "authors' isASAM switch", spec="bool")
    swp_seed: int = key(0, "seed of ESAM's SWP draws (the same on every DDP rank)", spec="int")
    bn_policy: str = bn_policy_key()


@register_method("esam", label="ESAM", passes=2, order=115, config=ESAMConfig,
                 needs=("closure_of", "per_sample_losses", "closure_on"),
                 claimed_cost="about 1.4 (ESAM's extra computation about 40% of SGD's, "
                              "SAM's 100%)",
                 paper='Du et al., "Efficient Sharpness-aware Minimization for Improved Training '
                       'of Neural Networks", ICLR 2022')
class ESAM(SharpnessAwareOptimizer):
    """Efficient SAM (Du, Yan, Feng, Zhou, Zhen, Goh, Tan, "Efficient Sharpness-aware Minimization
    for Improved Training of Neural Networks", ICLR 2022): SAM with two savings.

    Per step, with ``D`` the set of parameter tensors drawn for this step (each with probability
    ``beta``, independently; SWP), ``B`` the batch and ``ℓ_i`` sample ``i``'s loss::

        g   = ∇_D L_B(w)                            (pass 1; no gradient for tensors outside D)
        e   = rho/beta · g / ||g||   on D,  0 elsewhere
        s_i = ℓ_i(w + e) - ℓ_i(w)                   (a forward pass without graph at w + e)
        B+  = the samples with the largest s_i:     k - 1 of them (the authors' code) or k (paper),
                                                    k = floor(gamma · |B|)       (SDS)
        w  <- base_step(w, ∇L_{B+}(w + e))          (pass 2, on B+ only, all tensors)

    Cost in FLOPs: 1 + 1/3 + gamma passes (the forward at ``w + e`` counts a third of a pass),
    less the weight gradients SWP skips in the first backward (not priced). ``adaptive=True``
    uses ASAM's perturbation ``rho/beta · w²g / || |w| g ||`` (the authors' ``isASAM``).

    Reproduced from the authors' code (dydjw9/Efficient_SAM, ``utils/Esam.py``): the SWP draw is
    one ``random.random() > beta`` per parameter tensor after each step (from the second step on;
    on the first, every tensor is perturbed), drawn here from a ``random.Random(swp_seed)`` in the
    same order; a dropped tensor gets no gradient in the next first pass (``requires_grad`` is off
    during it) and no perturbation, and the norm is over the drawn tensors; the norm guard is
    ``1e-7``. SDS ranks the per-sample losses of the first pass and of the forward at ``w + e``
    (both in train mode) and keeps the samples strictly above the k-th largest change: k - 1 of
    them (``sds_count="authors"``, the default; ``"paper"`` keeps k). The pass over them runs in
    the batch's order, as the authors' boolean mask does. Differences: if every tensor is drawn
    out, the step has ``e = 0`` (the authors' code raises there: nothing requires a gradient);
    with ``gamma >= 0.99`` the forward at ``w + e`` is skipped (the authors' code runs it and
    ignores it, updating BatchNorm statistics with it). With ties at the k-th largest change the
    authors keep fewer samples; sharpbench keeps the k - 1 largest by rank (no host sync).

    The loss a step returns is the batch's at ``w``. ESAM chooses no steps and keeps per-step
    state (the SWP draws): ``sam_every``, ``sam_prob`` and ``m`` do not apply.
    """

    takes_schedule = False

    def __init__(self, params, base_optimizer=torch.optim.SGD, rho: float = 0.05,
                 beta: float = 0.6, gamma: float = 0.5, sds_count: str = "authors",
                 adaptive: bool = False, swp_seed: int = 0, **base_kwargs):
        check_positive("rho", rho)
        if not 0 < beta <= 1:
            raise ValueError(f"ESAM's beta (probability a tensor is perturbed) must be in (0, 1], "
                             f"got {beta}")
        if not 0 < gamma <= 1:
            raise ValueError(f"ESAM's gamma (fraction of the batch in the second pass) must be in "
                             f"(0, 1], got {gamma}")
        if sds_count not in SDS_COUNTS:
            raise ValueError(f"ESAM's sds_count must be one of {SDS_COUNTS}, got {sds_count!r}")
        self.beta, self.gamma, self.sds_count = float(beta), float(gamma), sds_count
        self.adaptive = bool(adaptive)
        super().__init__(params, base_optimizer, dict(rho=rho), **base_kwargs)
        self.rng = random.Random(swp_seed)
        # positions (in param_groups order) of the tensors drawn out for the next step
        self.method_state.update(swp_dropped=[], swp_rng=self.rng.getstate())

    # ---------------------------------------------------------------------------------- SWP
    def all_params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def draw_swp(self) -> None:
        """After a step: one draw per tensor that has a gradient, ``u > beta`` drops it from the
        next step's perturbation (the authors' ``second_step``)."""
        dropped = [i for i, p in enumerate(self.all_params())
                   if p.grad is not None and self.rng.random() > self.beta]
        self.method_state["swp_dropped"] = dropped
        self.method_state["swp_rng"] = self.rng.getstate()

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        rng_state = self.method_state.get("swp_rng")
        if rng_state is not None:
            self.rng.setstate(_as_rng_state(rng_state))

    @torch.no_grad()
    def perturbation(self) -> dict[Tensor, Tensor]:
        """``e = rho/beta · g/(||g|| + 1e-7)`` over the tensors with a gradient (the drawn ones);
        adaptive: ``rho/beta · w²g/(|| |w| g || + 1e-7)``."""
        params, rhos = self.params_and_rhos()
        if not params:
            return {}
        grads = [p.grad for p in params]
        if self.adaptive:
            weighted = torch._foreach_mul(grads, torch._foreach_abs(params))
            inv = 1.0 / (global_grad_norm(weighted, 2.0) + NORM_EPS) / self.beta
            return dict(zip(params, scaled(torch._foreach_mul(weighted, torch._foreach_abs(params)),
                                           inv, rhos)))
        inv = 1.0 / (global_grad_norm(grads, 2.0) + NORM_EPS) / self.beta
        return dict(zip(params, scaled(grads, inv, rhos)))

    # ------------------------------------------------------------------------------- a step
    def sds_keep(self, n: int) -> int | None:
        """Samples SDS keeps of a batch of ``n`` (``None``: the whole batch, no selection)."""
        if self.gamma >= 0.99:
            return None
        k = int(n * self.gamma)
        keep = k - 1 if self.sds_count == "authors" else k
        if keep < 1:
            raise ValueError(f"ESAM's gamma={self.gamma} keeps {keep} of a batch of {n} samples "
                             f"(sds_count={self.sds_count}): raise gamma or the batch size")
        return keep

    @torch.no_grad()
    def sharpness_step(self, closure=None, context: StepContext | None = None) -> Tensor:
        closure = require_closure(closure, type(self).__name__)
        params = self.all_params()
        dropped = [params[i] for i in self.method_state["swp_dropped"] if i < len(params)]
        trainable = [p for p in params if p.requires_grad]
        if len(dropped) >= len(trainable):
            dropped = []      # every tensor drawn out: e = 0 (gradients taken, then ignored)
            drop_all = True
        else:
            drop_all = False
        sds = self.gamma < 0.99
        before: list[Tensor] = []
        if sds:
            closure_of = _require(context, "closure_of", "closure_of=lambda reduce: ...")

            def mean_recording(per_sample: Tensor, y: Tensor) -> Tensor:
                before.append(per_sample.detach())
                return per_sample.mean()
            first = closure_of(mean_recording)
        else:
            first = closure
        for p in dropped:
            p.requires_grad_(False)
        try:
            loss = self.call_closure(first)
        finally:
            for p in dropped:
                p.requires_grad_(True)
        eps = {} if drop_all else self.perturbation()
        self.perturb(eps)
        try:
            if sds:
                after = _require(context, "per_sample_losses", "per_sample_losses=lambda: ...")()
                keep = self.sds_keep(int(after.shape[0]))
                index = torch.topk(after - torch.cat(before), keep, sorted=False).indices.sort().values
                second = _require(context, "closure_on", "closure_on=lambda index: ...")(index)
            else:
                second = closure
            self.call_closure(second)
        finally:
            self.restore()
        self.base_step(context)
        self.draw_swp()
        return loss


def _require(context: StepContext | None, name: str, example: str):
    if context is None:
        raise ValueError(f"ESAM.step() with gamma < 0.99 (SDS) needs context.{name}; pass "
                         f"opt.step(closure, context=StepContext({example}, ...)) (the Lightning "
                         f"module and the bench offer it), or set gamma=1 for SWP alone")
    return context.require(name, "ESAM", example)


def _as_rng_state(state):
    """``random.Random.setstate`` wants tuples; a checkpoint may hold lists."""
    version, internal, gauss = state
    return version, tuple(internal), gauss

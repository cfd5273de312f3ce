"""Momentum-SAM: the perturbation along the base step's momentum, one pass per step."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import SharpnessAwareOptimizer, check_positive, global_grad_norm, require_closure, scaled
from .context import StepContext
from .registry import register_method
from .step_config import SGDStep, bn_policy_key, rho_key
from ..typed_config import key

WEIGHT_DECAY_AT = ("w", "perturbed")
# The base optimizer's state that holds its momentum: SGD's buffer, Adam's first moment.
MOMENTUM_STATE = ("momentum_buffer", "exp_avg")


@dataclass
class MSAMConfig(SGDStep):
    """Becker et al. 2024; the authors' CIFAR-100 WRN-16-4 config (MarlonBecker/MSAM,
    configs/CIFAR100_WRN16_4.ini and the README's command): rho 3, momentum 0.9, weight decay
    5e-4 (their lr 0.5 at batch 256 with label smoothing 0.1 is a recipe, not set here)."""
    rho: float = rho_key(3.0)
    weight_decay_at: str = key("w", "MSAM: the weights the base step's L2 weight decay reads: w "
                                    "(sharpbench's rule) or the perturbed w - rho v/||v|| (the "
                                    "authors' msam.py)", spec="w | perturbed")
    bn_policy: str = bn_policy_key()


@register_method("msam", label="MSAM", passes=1, order=120, config=MSAMConfig,
                 claimed_cost="1 (no computational overhead over SGD)",
                 paper='Becker, Altrock & Risse, "Momentum-SAM: Sharpness Aware Minimization '
                       'without Computational Overhead", arXiv 2024')
class MSAM(SharpnessAwareOptimizer):
    """Momentum-SAM (Becker, Altrock, Risse, "Momentum-SAM: Sharpness Aware Minimization without
    Computational Overhead", arXiv:2401.12033, 2024).

    SAM's ascent direction is replaced by the negative momentum of the base step, which costs no
    extra pass. With ``v_t`` the base optimizer's momentum before step ``t`` (SGD's
    ``momentum_buffer``; Adam's/AdamW's first moment ``exp_avg``)::

        e   = -rho · v_t / ||v_t||            (e = 0 on the first step, before any momentum)
        g_p = ∇L_B(w + e)                     (the only pass)
        w  <- base_step(w, g_p)               (at the original w; v_{t+1} = mu·v_t + g_p + wd·w)

    One pass per step; the loss a step returns is at ``w + e`` (``context.loss_is_perturbed``).
    ``rho`` is per parameter group; the norm is global over all parameters.

    The authors' ``msam.py`` (MarlonBecker/MSAM) keeps the weights at ``w + e`` between steps
    and moves them at the end of each step from the old perturbed point to the new one; it
    computes the same points. sharpbench keeps ``w`` between steps (so evaluation, checkpoints
    and schedulers see the unperturbed weights; the authors call ``move_back_from_momentumAscent``
    before evaluating). One difference is a switch: their SGD step adds the L2 weight decay of
    the *perturbed* weights to the gradient (``weight_decay_at="perturbed"``); sharpbench's base
    step decays ``w`` (``"w"``, the default), as for every method. Their AdamW variant
    (``adamW_msam.py``) decays after the Adam step where ``torch.optim.AdamW`` decays before it:
    with ``base=adamw`` this is torch's order (not parity-tested).

    Defaults: ``rho = 3`` (the authors' CIFAR-100 setting; MSAM's ``rho`` is on another scale
    than SAM's). MSAM chooses no steps: ``sam_every`` / ``sam_prob`` do not apply.
    """

    passes_per_step = 1.0
    takes_schedule = False

    def __init__(self, params, base_optimizer=torch.optim.SGD, rho: float = 3.0,
                 weight_decay_at: str = "w", **base_kwargs):
        check_positive("rho", rho)
        if weight_decay_at not in WEIGHT_DECAY_AT:
            raise ValueError(f"MSAM's weight_decay_at must be one of {WEIGHT_DECAY_AT}, got "
                             f"{weight_decay_at!r}")
        self.weight_decay_at = weight_decay_at
        super().__init__(params, base_optimizer, dict(rho=rho), **base_kwargs)
        if weight_decay_at == "perturbed" and not isinstance(self.base_optimizer, torch.optim.SGD):
            raise ValueError("MSAM's weight_decay_at='perturbed' reproduces the authors' SGD step "
                             "(L2 weight decay in the gradient): use it with base sgd")
        if not any(g.get("momentum", 0) or g.get("betas") for g in self.param_groups):
            raise ValueError("MSAM perturbs along the base step's momentum: give the base "
                             "optimizer momentum (e.g. optimizer.momentum=0.9) or use adam/adamw")

    def _momenta(self) -> tuple[list[Tensor], list[Tensor], list[float]] | None:
        """The parameters, their momentum buffers and ``rho``s, or ``None`` before the first step."""
        params, moms, rhos = [], [], []
        for group in self.param_groups:
            for p in group["params"]:
                state = self.base_optimizer.state.get(p, {})
                buf = next((state[k] for k in MOMENTUM_STATE if state.get(k) is not None), None)
                if buf is None:
                    continue
                params.append(p)
                moms.append(buf)
                rhos.append(group["rho"])
        return (params, moms, rhos) if params else None

    @torch.no_grad()
    def perturbation(self) -> dict[Tensor, Tensor]:
        """``e = -rho · v/||v||`` from the base optimizer's momentum (empty before it has any)."""
        found = self._momenta()
        if found is None:
            return {}
        params, moms, rhos = found
        inv_norm = -1.0 / (global_grad_norm(moms, 2.0) + 1e-12)
        return dict(zip(params, scaled(moms, inv_norm, rhos)))

    @torch.no_grad()
    def sharpness_step(self, closure=None, context: StepContext | None = None) -> Tensor:
        closure = require_closure(closure, type(self).__name__)
        eps = self.perturbation()
        self.perturb(eps)
        try:
            loss = self.call_closure(closure)
        finally:
            self.restore()
        if eps and self.weight_decay_at == "perturbed":
            for group in self.param_groups:      # g + wd·(w + e) = (g + wd·e) + wd·w
                ps = [p for p in group["params"] if p in eps and p.grad is not None]
                if ps and group["weight_decay"]:
                    torch._foreach_add_([p.grad for p in ps], [eps[p] for p in ps],
                                        alpha=group["weight_decay"])
        self.base_step(context)
        if context is not None:
            context.loss_is_perturbed = bool(eps)
        return loss

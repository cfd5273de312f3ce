"""SAM: sharpness-aware minimisation in an l_p ball."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import math

import torch
from torch import Tensor

from .base import SharpnessAwareOptimizer, check_positive, global_grad_norm, scaled
from .asam import ASAM
from .registry import register_method
from ..typed_config import key
from .step_config import ScheduleKeys, SGDStep, bn_policy_key, m_key, rho_key


def dual_exponent(p: float) -> float:
    """q with 1/p + 1/q = 1 (p=∞ → q=1, p=1 → q=∞)."""
    if p == math.inf:
        return 1.0
    if p == 1:
        return math.inf
    return p / (p - 1)


def parse_p(p: float | str) -> float:
    if isinstance(p, str):
        if p.lower() in ("inf", "infinity", "linf"):
            return math.inf
        p = float(p)
    if not p >= 1:
        raise ValueError(f"SAM's norm p must be >= 1 (2 is standard, 'inf' for l_inf), got {p}")
    return float(p)


def lp_ball_argmax(grads: list[Tensor], rho: list[float], p: float) -> list[Tensor]:
    """``argmax_{||e||_p <= rho} eᵀg`` (Foret et al. 2021, eq. 2):

        e_i = rho · sign(g_i) · |g_i|^(q-1) / ||g||_q^(q-1),   1/p + 1/q = 1

    The denominator is Foret et al.'s ``(||g||_q^q)^(1/p)``, which equals ``||g||_q^(q-1)``; one
    lecture-note transcription of this formula prints ``(||g||_q^2)^(1/p)`` (and as a factor, not a
    divisor): a typo, since ``||e||_p = rho`` holds only with the form used here.

    p=2 gives ``rho·g/||g||_2``; p=∞ gives ``rho·sign(g)``; p=1 puts all of rho on the largest
    |g_i| (split evenly between ties). ``rho`` is given per tensor; the norm is global.
    """
    q = dual_exponent(p)
    if q == 2.0:   # the default: a fixed number of foreach ops for any number of tensors
        scale = 1.0 / (global_grad_norm(grads, 2.0) + 1e-12)
        return scaled(grads, scale, rho)
    if q == 1.0:
        return scaled(torch._foreach_sign(grads), None, rho)
    g_max = global_grad_norm(grads, math.inf)
    if q == math.inf:
        hits = [(g.abs() == g_max).to(g.dtype) for g in grads]
        count = torch.stack([h.sum() for h in hits]).sum()
        return [torch.sign(g) * h * (r / count) for g, h, r in zip(grads, hits, rho)]
    # General q: work with u = g / max|g| so |u|^(q-1) neither under- nor overflows.
    units = [g / (g_max + 1e-30) for g in grads]
    norm = global_grad_norm(units, q) + 1e-12
    return [torch.sign(u) * u.abs().pow(q - 1) * (r / norm.pow(q - 1)) for u, r in zip(units, rho)]


@dataclass
class SAMConfig(SGDStep, ScheduleKeys):
    """Foret et al. 2021: rho 0.05 on CIFAR-10, 0.1 on CIFAR-100, the l_2 ball."""
    rho: float = rho_key(0.05)
    p: Any = key(2, "SAM's l_p neighbourhood: 2 (the standard ball), any p >= 1, or inf (the box)",
                 spec="float >= 1 | inf")
    m: Optional[int] = m_key()
    bn_policy: str = bn_policy_key()


@register_method("sam", label="SAM", passes=2, order=10, config=SAMConfig,
                 claimed_cost="2 (two sequential gradient computations)",
                 paper='Foret et al., "Sharpness-Aware Minimization for Efficiently Improving '
                       'Generalization", ICLR 2021')
class SAM(SharpnessAwareOptimizer):
    """Sharpness-Aware Minimization (Foret et al., "Sharpness-Aware Minimization for Efficiently
    Improving Generalization", ICLR 2021), with the general l_p neighbourhood of their eq. 2.

    Per step, with ``g = ∇L_B(w)`` and ``1/p + 1/q = 1``::

        e   = rho · sign(g)·|g|^(q-1) / ||g||_q^(q-1)        (p=2: rho·g/||g||₂)
        w  <- base_step(w, ∇L_B(w + e))                      (at the original w)

    Two forward/backward passes per step. ``rho`` is per parameter group (a scheduler may change
    it); ``p`` is 2 by default and may be any value >= 1 or ``float('inf')`` / ``"inf"``.

    ``adaptive=True`` is davda54/sam's adaptive SAM: ASAM (:class:`~sharpbench.optim.ASAM`) with
    ``eta = 0``, ``e = rho·w²g/||w g||₂``, so that code written for their ``SAM`` runs with only
    its import changed (their ``rho`` for it is 2.0).

    Example::

        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
        def closure():
            opt.zero_grad(); loss = F.cross_entropy(model(x), y); loss.backward(); return loss
        loss = opt.step(closure)
    """

    takes_m = True

    def __init__(self, params, base_optimizer=torch.optim.SGD, rho: float = 0.05,
                 p: float | str = 2.0, adaptive: bool = False, **base_kwargs):
        check_positive("rho", rho)
        self.p = parse_p(p)
        self.adaptive = bool(adaptive)
        if self.adaptive and self.p != 2:
            raise ValueError(f"SAM(adaptive=True) is davda54/sam's adaptive SAM (ASAM with eta=0), "
                             f"defined for p=2; got p={p}")
        defaults = dict(rho=rho, adaptive=True, eta=0.0) if self.adaptive else dict(rho=rho)
        super().__init__(params, base_optimizer, defaults, **base_kwargs)

    @torch.no_grad()
    def perturbation(self) -> dict[Tensor, Tensor]:
        if self.adaptive:
            return ASAM.perturbation(self)  # T = |w| + 0 in every group
        params, rhos = self.params_and_rhos()
        eps = lp_ball_argmax([p.grad for p in params], rhos, self.p)
        return dict(zip(params, eps))

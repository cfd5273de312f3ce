"""GSAM: SAM plus an ascent step that shrinks the surrogate gap."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from .base import (FlatBuffer, SharpnessAwareOptimizer, check_positive, flat_buffer,
                   global_grad_norm, group_indices)
from .sam import lp_ball_argmax
from .context import StepContext
from .registry import register_method
from ..typed_config import key
from .step_config import ScheduleKeys, SGDStep, bn_policy_key, m_key, rho_key


@dataclass
class GSAMConfig(SGDStep, ScheduleKeys):
    """Zhuang et al. 2022: the paper tunes alpha in about [0.01, 0.3] (0.1 here); named
    ``gsam_alpha`` because ``alpha`` is RMSprop's. The authors' CIFAR example
    (juntang-zhuang/GSAM, example/train.py): gsam_alpha 0.4, adaptive true, rho 2.0, cosine lr."""
    rho: float = rho_key(0.05)          # rho_max when rho_min is set
    gsam_alpha: float = key(0.1, "GSAM: weight of the orthogonal gradient component removed from "
                                 "the step", spec="float >= 0")
    adaptive: bool = key(False, "GSAM: ASAM-style scaling of the perturbation by |w| + eta, e = rho "
                                "T^2 g / ||T g|| (the authors' adaptive=True, eta 0)", spec="bool")
    eta: float = key(0.0, "GSAM: eta of the adaptive scaling", spec="float >= 0")
    rho_min: Optional[float] = key(None, "GSAM: with it, rho follows the lr: rho_t = rho_min + "
                                         "(rho - rho_min)(lr - lr_min)/(lr_max - lr_min) (null: "
                                         "constant rho)", spec="null | float >= 0")
    lr_max: Optional[float] = key(None, "GSAM: lr at which rho reaches its maximum (null: the "
                                        "initial lr)", spec="null | float > 0")
    lr_min: float = key(0.0, "GSAM: lr at which rho reaches rho_min", spec="float >= 0")
    m: Optional[int] = m_key()
    bn_policy: str = bn_policy_key()


@register_method("gsam", label="GSAM", passes=2, order=100, config=GSAMConfig,
                 claimed_cost="2 (as SAM, negligible overhead)",
                 paper='Zhuang et al., "Surrogate Gap Guided Sharpness-Aware Minimization", '
                       'ICLR 2022')
class GSAM(SharpnessAwareOptimizer):
    """Surrogate Gap Guided SAM (Zhuang et al., "Surrogate Gap Guided Sharpness-Aware
    Minimization", ICLR 2022; the paper's title on OpenReview: "Surrogate Gap Minimization
    Improves Sharpness-Aware Training").

    Per step, with ``g = ∇L_B(w)`` and global (all-parameter) dot products and norms::

        e    = rho_t · g / ||g||₂                       (SAM, p = 2)
        g_p  = ∇L_B(w + e)
        g_⊥  = g - (g·ĝ_p) ĝ_p,   ĝ_p = g_p / ||g_p||₂  (the part of g orthogonal to g_p)
        w   <- base_step(w, g_p - α·g_⊥)               (at the original w)

    Descending along ``g_p`` minimises the perturbed loss; ``-α·g_⊥`` is an ascent step on
    ``L`` orthogonal to it that shrinks the surrogate gap ``L(w+e) - L(w)`` without changing the
    first-order decrease of the perturbed loss. Two forward/backward passes per step.

    rho following the learning rate (the paper's ImageNet setting): if ``rho_min`` is given, each
    step uses, per parameter group,
    ``rho_t = rho_min + (rho - rho_min)·(lr - lr_min)/(lr_max - lr_min)``, clipped to
    ``[min(rho_min, rho), max(rho_min, rho)]`` (so warm-up below ``lr_min`` cannot make it
    negative), where ``lr`` is the group's current learning rate and ``lr_max`` defaults to the
    group's initial ``lr``. ``rho`` is then rho_max. Without ``rho_min``, ``rho_t = rho``. The
    last value used is kept in each group as ``rho_t`` (for logging).

    Adaptive variant (``adaptive=True``, ASAM-style scaling inside GSAM, as the authors'
    ``GSAM(..., adaptive=True)``): with ``T = diag(|w| + eta)``,
    ``e = rho_t · T²g / ||T g||₂``; the decomposition still uses the raw ``g`` and ``g_p``. The
    authors' code (juntang-zhuang/GSAM, ``gsam/gsam.py``) scales every parameter with
    ``T = |w|`` (``eta = 0``, the default here).

    Defaults: ``alpha = 0.1`` (the paper tunes α in about [0.01, 0.3] and reports it robust in
    that range), rho 0.05 as every method in the benchmark, ``rho_min = None`` (constant rho; the
    benchmark's step schedule has no linear decay to follow), ``adaptive = False``. The authors'
    CIFAR example (``example/train.py`` at HEAD) uses α = 0.4, ``adaptive=True`` and
    rho_max = rho_min = 2.0 (a constant rho of 2, sensible only with the adaptive scaling), with
    a cosine learning rate; an earlier version of that example used α = 0.2.

    ``alpha`` and RMSprop's smoothing constant share a name. ``gsam_alpha`` (the authors' argument
    name) sets α unambiguously; when it is given, an ``alpha`` argument is passed on to the base
    optimizer instead (``GSAM(params, torch.optim.RMSprop, gsam_alpha=0.1, alpha=0.99)``). Configs
    use ``gsam_alpha``, because ``sharpbench.optim.factory`` treats ``alpha`` as a base-optimizer
    field.

    DDP: the correction is formed from each device's own ``g`` and ``g_p`` (before the base step's
    gradient reduction), as in the authors' code; the corrected gradients are then averaged.
    """

    takes_m = True

    def __init__(self, params, base_optimizer=torch.optim.SGD, rho: float = 0.05,
                 alpha: float | None = None, rho_min: float | None = None,
                 lr_max: float | None = None, lr_min: float = 0.0, *,
                 gsam_alpha: float | None = None, adaptive: bool = False, eta: float = 0.0,
                 **base_kwargs):
        if gsam_alpha is not None:
            if alpha is not None:
                base_kwargs["alpha"] = alpha        # the base optimizer's (RMSprop's) alpha
            alpha = gsam_alpha
        elif alpha is None:
            alpha = 0.1
        check_positive("rho", rho)
        if alpha < 0:
            raise ValueError(f"GSAM's alpha must be >= 0 (0.1 by default), got {alpha}")
        if eta < 0:
            raise ValueError(f"GSAM's eta (adaptive offset, T = |w| + eta) must be >= 0, got {eta}")
        if rho_min is not None and rho_min < 0:
            raise ValueError(f"GSAM's rho_min must be >= 0, got {rho_min}")
        super().__init__(params, base_optimizer,
                         dict(rho=rho, gsam_alpha=alpha, rho_min=rho_min, lr_max=lr_max,
                              lr_min=lr_min, adaptive=bool(adaptive), eta=eta), **base_kwargs)
        for group in self.param_groups:
            if group["lr_max"] is None:
                group["lr_max"] = group["lr"]
            if group["rho_min"] is not None and not group["lr_max"] > group["lr_min"]:
                raise ValueError(f"GSAM's rho schedule needs lr_max > lr_min, got lr_max="
                                 f"{group['lr_max']}, lr_min={group['lr_min']}")
            group["rho_t"] = group["rho"]
        self._grad_at_w: dict[Tensor, Tensor] = {}  # g, kept between the two passes of one step

    @staticmethod
    def rho_at(group: dict) -> float:
        """``rho_t`` of a parameter group at its current learning rate."""
        rho, rho_min = group["rho"], group["rho_min"]
        if rho_min is None:
            return rho
        frac = (group["lr"] - group["lr_min"]) / (group["lr_max"] - group["lr_min"])
        lo, hi = min(rho_min, rho), max(rho_min, rho)
        return min(max(rho_min + (rho - rho_min) * frac, lo), hi)

    @torch.no_grad()
    def sharpness_step(self, closure=None, context: StepContext | None = None) -> Tensor:
        """SAM's two passes and the corrected base step; ``context.logged["rho"]`` gets the radius
        this step used (the first group's ``rho_t``)."""
        loss = super().sharpness_step(closure, context)
        if context is not None:
            context.logged["rho"] = self.param_groups[0]["rho_t"]
        return loss

    @torch.no_grad()
    def perturbation(self) -> dict[Tensor, Tensor]:
        for group in self.param_groups:
            group["rho_t"] = self.rho_at(group)
        params = self.params_with_grad()
        rhos = [g["rho_t"] for g in self.param_groups for p in g["params"] if p.grad is not None]
        grads = [p.grad for p in params]
        if FlatBuffer.fits(grads):   # g in one flat buffer: the dot product later is one op
            saved = flat_buffer(self._buffers, "g", grads).load(grads).views
        else:
            saved = [g.clone() for g in grads]
        self._grad_at_w = dict(zip(params, saved))
        if not any(g["adaptive"] for g in self.param_groups):
            return dict(zip(params, lp_ball_argmax(grads, rhos, 2.0)))
        return dict(zip(params, self.adaptive_perturbation(params, grads, rhos)))

    def adaptive_perturbation(self, params: list[Tensor], grads: list[Tensor],
                              rhos: list[float]) -> list[Tensor]:
        """``rho_t · T²g / ||T g||₂``, ``T = |w| + eta`` in adaptive groups (``T = 1`` elsewhere)."""
        group_of = {p: group for group in self.param_groups for p in group["params"]}
        scales = [p.abs().add_(group_of[p]["eta"]) if group_of[p]["adaptive"] else None
                  for p in params]
        t_g = [g if t is None else t * g for g, t in zip(grads, scales)]
        inv_norm = 1.0 / (global_grad_norm(t_g, 2.0) + 1e-12)
        return [(tg if t is None else t * tg) * (inv_norm * r) for tg, t, r in zip(t_g, scales, rhos)]

    @torch.no_grad()
    def apply_gap_correction(self) -> None:
        """``.grad <- g_p - α·g_⊥`` (current ``.grad`` is ``g_p``; ``g`` saved by the perturbation)."""
        saved = self._grad_at_w
        self._grad_at_w = {}
        params = [p for p in self.params_with_grad() if p in saved]
        if not params:
            return
        g_p = [p.grad for p in params]
        g = [saved[p] for p in params]
        norm_p = global_grad_norm(g_p, 2.0) + 1e-12
        g_buf = self._buffers.get("g")
        if g_buf is not None and len(params) == len(saved) and g_buf.matches(g_p):
            dot = torch.dot(g_buf.flat, flat_buffer(self._buffers, "g_p", g_p).load(g_p).flat)
        else:
            dot = torch.stack([torch.sum(a * b) for a, b in zip(g, g_p)]).sum()
        coef = dot / norm_p ** 2                       # (g·ĝ_p)/||g_p|| = g·g_p / ||g_p||²
        vertical = torch._foreach_sub(g, torch._foreach_mul(g_p, coef))   # g_⊥
        alphas = {p: group["gsam_alpha"] for group in self.param_groups for p in group["params"]}
        for alpha, idx in group_indices([alphas[p] for p in params]).items():
            torch._foreach_add_([g_p[i] for i in idx], [vertical[i] for i in idx], alpha=-alpha)

    def gradient_correction(self) -> None:
        self.apply_gap_correction()

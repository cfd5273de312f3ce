"""FriendlySAM: SAM whose perturbation ignores the full-gradient component."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from .base import SharpnessAwareOptimizer, check_positive, global_grad_norm, scaled
from .registry import register_method
from ..typed_config import key
from .step_config import ScheduleKeys, SGDStep, bn_policy_key, rho_key


EMA_ORDERS = ("update_first", "subtract_previous")


@dataclass
class FriendlySAMConfig(SGDStep, ScheduleKeys):
    """Li et al. 2024; the authors' run.sh (nblt/F-SAM): sigma 1, lmbda 0.95; rho 0.05 (the
    benchmark's, CIFAR-10; their run.sh uses 0.2 on CIFAR-100)."""
    rho: float = rho_key(0.05)
    sigma: float = key(1.0, "FriendlySAM: weight of the gradient EMA removed from the batch "
                            "gradient", spec="float >= 0")
    lmbda: float = key(0.95, "FriendlySAM: EMA factor of the batch gradients", spec="float in [0, 1)")
    ema_order: str = key("update_first", "FriendlySAM: update the gradient EMA before subtracting "
                                         "it (update_first, the paper: m_t = lmbda m_(t-1) + "
                                         "(1 - lmbda) g_t, d_t = g_t - sigma m_t) or subtract the "
                                         "previous one (subtract_previous, the authors' utils.py)",
                         spec="update_first | subtract_previous")
    bn_policy: str = bn_policy_key()    # momentum_zero: the authors' train.py


@register_method("friendly_sam", label="FriendlySAM", passes=2, order=30, config=FriendlySAMConfig,
                 claimed_cost="2 (as SAM)",
                 paper='Li et al., "Friendly Sharpness-Aware Minimization", CVPR 2024')
class FriendlySAM(SharpnessAwareOptimizer):
    """Friendly Sharpness-Aware Minimization (Li et al., "Friendly Sharpness-Aware Minimization",
    CVPR 2024).

    The batch gradient is split into a full-gradient estimate (an EMA of past batch gradients)
    and the batch-specific "noise"; only the noise drives the adversarial perturbation. Per step,
    with ``g_t = ∇L_B(w_t)``::

        m_t = λ·m_{t-1} + (1-λ)·g_t        (m_{-1} = 0; the EMA is updated first)
        d_t = g_t - σ·m_t
        e_t = rho · d_t / ||d_t||₂
        w  <- base_step(w, ∇L_B(w + e_t))   (at the original w)

    Two forward/backward passes per step, like SAM. ``rho``, ``sigma`` and ``lmbda`` live in the
    parameter groups (a scheduler may change them); the norm is global over all parameters.
    The EMA ``m`` is optimizer state (``self.state[p]["ema"]``), saved by ``state_dict()``.

    Order of operations (``ema_order``): by default (``"update_first"``, the paper's algorithm)
    the EMA is updated with ``g_t`` *before* ``d_t`` is formed, starting from ``m_{-1} = 0``; with
    σ = 1, λ = 0.95 the first step is then a SAM step (``d_0 = 0.95·g_0``, same direction).
    The authors' code (nblt/F-SAM, ``utils.py``, ``FriendlySAM.first_step``) subtracts the
    *previous* EMA and initialises it to the first gradient (``ema_order="subtract_previous"``)::

        d_0 = g_0,  m_0 = g_0;     d_t = g_t - σ·m_{t-1},  m_t = λ·m_{t-1} + (1-λ)·g_t

    Defaults: σ = 1, λ = 0.95 (the authors' CIFAR runs; they also report λ = 0.6), rho 0.05.

    Mixed precision: the EMA must see *unscaled* gradients; unscale before :meth:`first_step`.
    Calling :meth:`perturbation` advances the EMA, so call it once per step (``first_step`` does).
    """

    def __init__(self, params, base_optimizer=torch.optim.SGD, rho: float = 0.05,
                 sigma: float = 1.0, lmbda: float = 0.95, ema_order: str = "update_first",
                 **base_kwargs):
        check_positive("rho", rho)
        if ema_order not in EMA_ORDERS:
            raise ValueError(f"FriendlySAM's ema_order must be one of {EMA_ORDERS}, got "
                             f"{ema_order!r}")
        self.ema_order = ema_order
        if not 0.0 <= lmbda < 1.0:
            raise ValueError(f"FriendlySAM's lmbda (EMA factor λ) must be in [0, 1), got {lmbda}")
        if sigma < 0:
            raise ValueError(f"FriendlySAM's sigma must be >= 0 (1 in the paper), got {sigma}")
        super().__init__(params, base_optimizer, dict(rho=rho, sigma=sigma, lmbda=lmbda),
                         **base_kwargs)

    @torch.no_grad()
    def perturbation(self) -> dict[Tensor, Tensor]:
        # Per parameter group, a fixed number of foreach ops for all its tensors.
        params, directions, rhos = [], [], []
        for group in self.param_groups:
            lmbda, sigma = group["lmbda"], group["sigma"]
            ps = [p for p in group["params"] if p.grad is not None]
            if not ps:
                continue
            grads = [p.grad for p in ps]
            if self.ema_order == "subtract_previous":       # the authors' order (per tensor)
                for p, g in zip(ps, grads):
                    state = self.state[p]
                    if "ema" not in state:
                        state["ema"] = g.clone()                    # m_0 = g_0, d_0 = g_0
                        directions.append(g.clone())
                    else:
                        directions.append(g - sigma * state["ema"])  # d_t = g_t - σ·m_{t-1}
                        state["ema"].mul_(lmbda).add_(g, alpha=1.0 - lmbda)
            else:                                           # the paper's: foreach over all tensors
                emas = [self._ema(p) for p in ps]
                torch._foreach_mul_(emas, lmbda)                            # m_t
                torch._foreach_add_(emas, grads, alpha=1.0 - lmbda)
                directions.extend(torch._foreach_sub(grads, torch._foreach_mul(emas, sigma)))  # d_t
            params.extend(ps)
            rhos.extend([group["rho"]] * len(ps))
        if not params:
            raise ValueError("no parameter has a gradient: did the closure call backward()?")
        inv_norm = 1.0 / (global_grad_norm(directions, 2.0) + 1e-12)
        return dict(zip(params, scaled(directions, inv_norm, rhos)))

    def _ema(self, p: Tensor) -> Tensor:
        state = self.state[p]
        if "ema" not in state:
            state["ema"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state["ema"]

"""ASAM: adaptive (scale-invariant) sharpness-aware minimisation."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from .base import SharpnessAwareOptimizer, check_positive, global_grad_norm
from .registry import register_method
from ..typed_config import key
from .step_config import ScheduleKeys, SGDStep, bn_policy_key, m_key, rho_key


@dataclass
class ASAMConfig(SGDStep, ScheduleKeys):
    """Kwon et al. 2021: rho 0.5 (CIFAR-10), 1.0 (CIFAR-100), eta 0.01."""
    rho: float = rho_key(0.5)
    eta: float = key(0.01, "ASAM: T = |w| + eta, the scale of the adaptive neighbourhood "
                           "(SamsungLabs/ASAM: class default 0.01, example_cifar.py 0.0; eta 0 with "
                           "adaptive_params all is davda54/sam's SAM(adaptive=True))", spec="float >= 0")
    adaptive_params: str = key("all", "ASAM: scale every parameter (all, the formula) or only those "
                                      "named *weight* (weights: the authors' code)",
                               spec="all | weights")
    m: Optional[int] = m_key()
    bn_policy: str = bn_policy_key()    # both_passes: SamsungLabs/ASAM


@register_method("asam", label="ASAM", passes=2, order=20, config=ASAMConfig,
                 claimed_cost="2 (as SAM)",
                 paper='Kwon et al., "ASAM: Adaptive Sharpness-Aware Minimization for '
                       'Scale-Invariant Learning of Deep Neural Networks", ICML 2021')
class ASAM(SharpnessAwareOptimizer):
    """Adaptive SAM (Kwon et al., "ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant
    Learning of Deep Neural Networks", ICML 2021), p = 2.

    With ``T = diag(|w| + eta)`` and ``g = ∇L_B(w)``::

        e  = rho · T² g / ||T g||₂
        w <- base_step(w, ∇L_B(w + e))

    By default *every* parameter is scaled (the formula as written in the paper). The authors'
    code (SamsungLabs/ASAM, ``asam.py``) scales only parameters whose name contains ``weight``; to
    reproduce that, put the others in a parameter group with ``adaptive=False`` (there
    ``T = 1``, a plain SAM component under the same global norm).
    ``sharpbench.optim.factory`` does this for ``adaptive_params: weights``. Their class defaults
    to ``eta = 0.01`` (the paper's value) but their ``example_cifar.py`` passes ``--eta``, whose
    default is 0.0.

    davda54/sam's ``SAM(..., adaptive=True)`` is this method with ``eta = 0`` and every
    parameter scaled: ``T = |w|``, ``e = rho·w²g/||w g||`` (``eta: 0``, ``adaptive_params: all``).
    Parameters that are exactly 0 then get no perturbation.
    """

    takes_m = True

    def __init__(self, params, base_optimizer=torch.optim.SGD, rho: float = 0.5,
                 eta: float = 0.01, adaptive: bool = True, **base_kwargs):
        check_positive("rho", rho)
        if eta < 0:
            raise ValueError(f"ASAM's eta must be >= 0, got {eta}")
        super().__init__(params, base_optimizer, dict(rho=rho, eta=eta, adaptive=adaptive),
                         **base_kwargs)

    @torch.no_grad()
    def perturbation(self) -> dict[Tensor, Tensor]:
        # Per parameter group, a fixed number of foreach ops (T, T·g, T²·g) for all its tensors.
        params, t_g, scales, rhos = [], [], [], []
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            if not ps:
                continue
            grads = [p.grad for p in ps]
            if group["adaptive"]:
                t = torch._foreach_abs(ps)
                torch._foreach_add_(t, group["eta"])
                t_g.extend(torch._foreach_mul(t, grads))
                scales.append(t)
            else:
                t_g.extend(grads)
                scales.append(None)
            params.append(ps)
            rhos.append(group["rho"])
        inv_norm = 1.0 / (global_grad_norm(t_g, 2.0) + 1e-12)
        eps, start = {}, 0
        for ps, t, r in zip(params, scales, rhos):
            tg = t_g[start:start + len(ps)]
            start += len(ps)
            e = tg if t is None else torch._foreach_mul(t, tg)
            eps.update(zip(ps, torch._foreach_mul(e, inv_norm * r)))
        return eps

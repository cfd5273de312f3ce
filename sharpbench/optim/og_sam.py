"""OG-SAM: EG-SAM's extrapolation from the previous step's gradient, one pass per step."""
from __future__ import annotations

import torch
from torch import Tensor

from .base import SharpnessAwareOptimizer, check_positive, require_closure
from .context import StepContext
from .eg_sam import PAPER, LookaheadConfig, lookahead_perturbation
from .registry import register_method


@register_method("og_sam", label="OG-SAM", passes=1, order=126, config=LookaheadConfig,
                 claimed_cost="1 (one gradient per step)", paper=PAPER)
class OGSAM(SharpnessAwareOptimizer):
    """OG-SAM (Yu, Zhang & Kwok, "Improving Sharpness-Aware Minimization by Lookahead", ICML
    2024): EG-SAM (:class:`~sharpbench.optim.EGSAM`) with the optimistic-gradient trick: the
    extrapolation uses the gradient of the previous step, taken at the previous extrapolated
    point, so each step costs one pass::

        w̃_t = w_t + (rho/||ĝ_{t-1}|| - eta)·ĝ_{t-1}     (w̃_0 = w_0: no gradient yet)
        ĝ_t = ∇L_B(w̃_t)                                 (the only pass)
        w_{t+1} = base_step(w_t, ĝ_t)

    ``ĝ`` is kept as the gradient the base step used (after DDP averaging and clipping) in the
    optimizer state (``og_grad``), so a resumed run continues exactly. The loss a step returns is
    at ``w̃`` (``context.loss_is_perturbed``). Provenance as for EG-SAM: written from a summary of
    the paper, not checked against its algorithm text or code, which were not available to us.
    """

    passes_per_step = 1.0
    takes_schedule = False

    def __init__(self, params, base_optimizer=torch.optim.SGD, rho: float = 0.05,
                 lookahead_lr: float | None = None, **base_kwargs):
        check_positive("rho", rho)
        if lookahead_lr is not None and not lookahead_lr >= 0:
            raise ValueError(f"lookahead_lr must be >= 0 or None (the lr), got {lookahead_lr}")
        super().__init__(params, base_optimizer, dict(rho=rho, lookahead_lr=lookahead_lr),
                         **base_kwargs)

    @torch.no_grad()
    def sharpness_step(self, closure=None, context: StepContext | None = None) -> Tensor:
        closure = require_closure(closure, type(self).__name__)
        params = [p for g in self.param_groups for p in g["params"]
                  if self.state[p].get("og_grad") is not None]
        eps = lookahead_perturbation(self, [self.state[p]["og_grad"] for p in params], params) \
            if params else {}
        self.perturb(eps)
        try:
            loss = self.call_closure(closure)
        finally:
            self.restore()
        if context is not None:
            context.loss_is_perturbed = bool(eps)
        if not self.base_step(context):      # skipped (fp16 overflow): keep the previous ĝ
            return loss
        have = self.params_with_grad()
        fresh = [p for p in have if self.state[p].get("og_grad") is None]
        for p in fresh:                      # allocated once, on the first step
            self.state[p]["og_grad"] = torch.empty_like(p.grad)
        if have:
            torch._foreach_copy_([self.state[p]["og_grad"] for p in have], [p.grad for p in have])
        return loss

"""LookSAM: SAM every k steps; in between, the reused component of the SAM gradient orthogonal to
the plain gradient."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import (FlatBuffer, SharpnessAwareOptimizer, check_positive, flat_buffer,
                   global_grad_norm, require_closure, scaled)
from .context import StepContext
from .registry import register_method
from .step_config import SGDStep, bn_policy_key, rho_key
from ..typed_config import key


@dataclass
class LookSAMConfig(SGDStep):
    """Liu et al. 2022: k 5 (their LookSAM-5); alpha 0.7 (MarlonBecker/MSAM's CIFAR config for its
    LookSAM baseline, with k 10); rho 0.05 (SAM's CIFAR-10 value)."""
    rho: float = rho_key(0.05)
    k: int = key(5, "LookSAM: a full SAM step (two passes) every k steps, one pass between",
                 spec="int >= 1")
    alpha: float = key(0.7, "LookSAM: weight of the reused orthogonal component, relative to "
                            "||g||", spec="float >= 0")
    bn_policy: str = bn_policy_key()


@register_method("looksam", label="LookSAM", passes=1.2, order=110, config=LookSAMConfig,
                 claimed_cost="1 + 1/k (SAM's second pass every k steps)",
                 paper='Liu et al., "Towards Efficient and Scalable Sharpness-Aware Minimization", '
                       'CVPR 2022')
class LookSAM(SharpnessAwareOptimizer):
    """LookSAM (Liu, Mai, Chen, Hsieh, You, "Towards Efficient and Scalable Sharpness-Aware
    Minimization", CVPR 2022, Algorithm 1).

    SAM's gradient ``g_s = ∇L(w + e)`` differs from ``g = ∇L(w)`` mostly by a component
    orthogonal to ``g`` that changes slowly; LookSAM computes it every ``k`` steps and reuses it
    in between. With ``g = ∇L_B(w_t)``::

        t mod k == 0:  e   = rho · g / ||g||
                       g_s = ∇L_B(w + e)                               (second pass)
                       g_v = g_s - (g·g_s / ||g||²) · g                (kept, as g_v / ||g_v||)
        otherwise:     g_s = g + alpha · ||g|| · g_v / ||g_v||         (one pass)
        w <- base_step(w, g_s)                                         (at the original w)

    ``1 + 1/k`` passes per step (1.2 at k = 5). Norms and the dot product are global over all
    parameters, as in the paper; ``alpha`` and ``rho`` are per parameter group. The unit
    ``g_v`` is optimizer state (``state[p]["looksam_gv"]``), saved by ``state_dict()``; its
    step counter is ``method_state["step"]``. The small constant 1e-12 guards each division.
    LookSAM chooses its own sharpness-aware steps, so ``sam_every`` / ``sam_prob`` do not apply.

    Defaults: ``k = 5`` (the paper's LookSAM-5), ``alpha = 0.7`` (the value MarlonBecker/MSAM's
    CIFAR config gives its LookSAM baseline, there with k = 10), ``rho = 0.05``. The paper's
    layer-wise variant (Look-LayerSAM, with LAMB-style layer scaling for large batches) is not
    included. The authors released no code; unofficial PyTorch ports differ in where the norms
    are taken (some decompose each parameter tensor on its own), which is not this rule.

    Under DDP the decomposition uses each device's own ``g`` and ``g_s`` (each device perturbs
    with its own gradient, as SAM does here); the base step averages the resulting ``g_s``.
    """

    takes_schedule = False

    def __init__(self, params, base_optimizer=torch.optim.SGD, rho: float = 0.05, k: int = 5,
                 alpha: float = 0.7, **base_kwargs):
        check_positive("rho", rho)
        if isinstance(k, bool) or int(k) != k or k < 1:
            raise ValueError(f"LookSAM's k (steps between full SAM steps) must be an integer "
                             f">= 1, got {k!r}")
        if alpha < 0:
            raise ValueError(f"LookSAM's alpha must be >= 0 (0.7 in the paper), got {alpha}")
        self.k = int(k)
        self.passes_per_step = 1.0 + 1.0 / self.k
        super().__init__(params, base_optimizer, dict(rho=rho, alpha=alpha), **base_kwargs)
        self.method_state["step"] = 0

    @torch.no_grad()
    def perturbation(self) -> dict[Tensor, Tensor]:
        """SAM's ``e = rho · g/||g||``; ``g`` is kept for the decomposition."""
        params, rhos = self.params_and_rhos()
        grads = [p.grad for p in params]
        if FlatBuffer.fits(grads):
            self._g = flat_buffer(self._buffers, "g", grads).load(grads)
        else:
            self._g = [g.clone() for g in grads]
        inv_norm = 1.0 / (global_grad_norm(grads, 2.0) + 1e-12)
        return dict(zip(params, scaled(grads, inv_norm, rhos)))

    @property
    def refresh_period(self) -> int:
        """Steps between full SAM steps (``k``)."""
        return self.k

    def refresh_due(self) -> bool:
        """Whether the coming step is a full SAM step (steps 0, k, 2k, …)."""
        return self.method_state["step"] % self.k == 0

    @torch.no_grad()
    def sharpness_step(self, closure=None, context: StepContext | None = None) -> Tensor:
        closure = require_closure(closure, type(self).__name__)
        loss = self.call_closure(closure)
        full = self.refresh_due() or not self._has_direction()   # (which parameters have a grad)
        if full:
            self.perturbed_pass(closure, context)
            self._keep_orthogonal_direction()
        else:
            self._add_reused_direction()
        self.base_step(context)
        self.method_state["step"] += 1
        return loss

    def _params(self) -> list[Tensor]:
        return self.params_with_grad()

    def _has_direction(self) -> bool:
        params = self._params()
        return bool(params) and all("looksam_gv" in self.state[p] for p in params)

    @torch.no_grad()
    def _keep_orthogonal_direction(self) -> None:
        """``g_v / ||g_v||`` from ``g`` (kept by the perturbation) and ``g_s`` (now ``.grad``)."""
        params = self._params()
        g_s = [p.grad for p in params]
        g = self._g
        self._g = None
        if isinstance(g, FlatBuffer) and g.matches(g_s):
            gs_flat = flat_buffer(self._buffers, "g_s", g_s).load(g_s).flat
            g_flat = g.flat
            coef = torch.dot(g_flat, gs_flat) / (torch.dot(g_flat, g_flat) + 1e-12)
            gv = gs_flat - coef * g_flat
            gv.mul_(1.0 / (torch.linalg.vector_norm(gv) + 1e-12))
            out = flat_buffer(self._buffers, "looksam_gv", g_s)
            out.flat.copy_(gv)
            for p, view in zip(params, out.views):
                self.state[p]["looksam_gv"] = view
            return
        g_list = g.views if isinstance(g, FlatBuffer) else g
        dot = torch.stack([torch.sum(a * b) for a, b in zip(g_list, g_s)]).sum()
        sq = torch.stack([torch.sum(a * a) for a in g_list]).sum()
        gv = torch._foreach_sub(g_s, torch._foreach_mul(g_list, dot / (sq + 1e-12)))
        inv = 1.0 / (global_grad_norm(gv, 2.0) + 1e-12)
        for p, v in zip(params, torch._foreach_mul(gv, inv)):
            self.state[p]["looksam_gv"] = v

    @torch.no_grad()
    def _add_reused_direction(self) -> None:
        """``.grad <- g + alpha · ||g|| · (g_v / ||g_v||)``."""
        params = self._params()
        grads = [p.grad for p in params]
        alphas = [g["alpha"] for g in self.param_groups for p in g["params"] if p.grad is not None]
        norm = global_grad_norm(grads, 2.0)
        units = [self.state[p]["looksam_gv"] for p in params]
        torch._foreach_add_(grads, scaled(units, norm, alphas))

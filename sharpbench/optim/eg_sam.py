"""EG-SAM: SAM's ascent combined with an extragradient (lookahead) descent step."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .base import SharpnessAwareOptimizer, check_positive, global_grad_norm
from .registry import register_method
from .step_config import ScheduleKeys, SGDStep, bn_policy_key, rho_key
from ..typed_config import key

PAPER = ('Yu, Zhang & Kwok, "Improving Sharpness-Aware Minimization by Lookahead", ICML 2024')


def lookahead_key() -> object:
    return key(None, "EG-SAM/OG-SAM: step size eta of the lookahead descent inside the "
                     "perturbation, w + (rho/||g|| - eta)·g; null: the base step's current lr",
               spec="null | float >= 0")


@dataclass
class LookaheadConfig(SGDStep):
    """Yu, Zhang & Kwok, ICML 2024: rho 0.05 (SAM's CIFAR-10 value; the source of the rule gives
    none), the lookahead step eta = the learning rate (EG-SAM's and OG-SAM's keys)."""
    rho: float = rho_key(0.05)
    lookahead_lr: Optional[float] = lookahead_key()
    bn_policy: str = bn_policy_key()


@dataclass
class EGSAMConfig(LookaheadConfig, ScheduleKeys):
    """EG-SAM: the lookahead keys and, as every two-pass method, sam_every / sam_prob."""


def lookahead_perturbation(opt: SharpnessAwareOptimizer, grads: list[Tensor],
                           params: list[Tensor]) -> dict[Tensor, Tensor]:
    """``e = (rho/||g|| - eta)·g`` per parameter group (``eta``: the group's ``lookahead_lr``, else
    its ``lr``), the norm global (a fixed number of foreach ops per group, no host sync)."""
    inv = 1.0 / (global_grad_norm(grads, 2.0) + 1e-12)
    group_of = {p: g for g in opt.param_groups for p in g["params"]}
    out: dict[Tensor, Tensor] = {}
    for group in opt.param_groups:
        idx = [i for i, p in enumerate(params) if group_of[p] is group]
        if not idx:
            continue
        eta = group["lr"] if group.get("lookahead_lr") is None else group["lookahead_lr"]
        scale = inv * group["rho"] - eta
        for i, e in zip(idx, torch._foreach_mul([grads[i] for i in idx], scale)):
            out[params[i]] = e
    return out


@register_method("eg_sam", label="EG-SAM", passes=2, order=125, config=EGSAMConfig,
                 claimed_cost="2 (as SAM)", paper=PAPER)
class EGSAM(SharpnessAwareOptimizer):
    """EG-SAM (Yu, Zhang & Kwok, "Improving Sharpness-Aware Minimization by Lookahead", ICML 2024):
    SAM's inner ascent preceded by an extragradient lookahead, a descent step of size ``eta`` from
    the same gradient, simplified to one extrapolation::

        g  = ∇L_B(w)                                 (pass 1)
        w̃  = w + (rho/||g|| - eta)·g                 (ascent rho·g/||g|| after a descent -eta·g)
        w <- base_step(w, ∇L_B(w̃))                   (pass 2, at the original w)

    ``eta`` is the base step's current learning rate unless ``lookahead_lr`` sets it. With
    ``eta = 0`` this is SAM. Provenance: the rule is written from a summary of the paper (its
    algorithm text and any code by its authors were not available to us), so it has not been
    checked against the authors' own statement; the docs say so beside the method.
    """

    takes_m = False

    def __init__(self, params, base_optimizer=torch.optim.SGD, rho: float = 0.05,
                 lookahead_lr: float | None = None, **base_kwargs):
        check_positive("rho", rho)
        if lookahead_lr is not None and not lookahead_lr >= 0:
            raise ValueError(f"lookahead_lr must be >= 0 or None (the lr), got {lookahead_lr}")
        super().__init__(params, base_optimizer, dict(rho=rho, lookahead_lr=lookahead_lr),
                         **base_kwargs)

    @torch.no_grad()
    def perturbation(self) -> dict[Tensor, Tensor]:
        params = self.params_with_grad()
        return lookahead_perturbation(self, [p.grad for p in params], params)

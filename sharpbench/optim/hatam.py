"""HATAM: AdamW with an anisotropic trajectory correction (one forward/backward per step)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional

import math

import torch
from torch import Tensor
from torch.optim import Optimizer

from .base import group_indices
from .registry import register_method
from ..typed_config import key
from .step_config import MethodConfig, betas_key, eps_key, lr_key, weight_decay_key

MODULATORS = ("tensor", "global")


@dataclass
class HATAMConfig(MethodConfig):
    """Its description gives no beta_c / gamma: chosen by a small CPU sweep (the module
    docstring): no setting beat AdamW (gamma = 0); stronger corrections were worse."""
    lr: float = lr_key(1e-3)
    betas: List[float] = betas_key()
    eps: float = eps_key()
    weight_decay: float = weight_decay_key(1e-2)
    beta_c: float = key(0.99, "HATAM: EMA factor of the gradient differences", spec="float in [0, 1)")
    gamma: float = key(0.1, "HATAM: weight of the curvature correction (0: AdamW)", spec="float >= 0")
    modulator: str = key("tensor", "HATAM: normalise the modulator per tensor or over all "
                                   "parameters", spec="tensor | global")


@register_method("hatam", label="HATAM", passes=1, order=80, baseline="adamw", config=HATAMConfig,
                 claimed_cost="1 (one pass, as AdamW)",
                 paper='"HATAM: Heuristic Anisotropic Trajectory-Aware Minimization", an '
                       'unpublished method description (specified in docs/methods.md)')
class HATAM(Optimizer):
    """HATAM, "Heuristic Anisotropic Trajectory-Aware Minimization" (described in the project's ``docs/methods.md``): AdamW
    fed with a gradient corrected by a smoothed gradient difference, scaled per coordinate by
    Adam's second moment. Exactly one forward/backward per step. Per parameter tensor, step ``t``::

        y   = g − g_prev;                  c = β_c·c + (1 − β_c)·y
        v̄   = v / (1 − β2^(t−1)) if t > 1 else v          (v of the PREVIOUS step, bias-corrected)
        h   = sqrt(v̄) + eps;               S = h / (mean(h) + eps)
        g_h = g + γ·S⊙c
        m   = β1·m + (1 − β1)·g_h;         v = β2·v + (1 − β2)·g_h²
        w  <- w − lr·( m̂/(sqrt(v̂) + eps) + wd·w ),   m̂ = m/(1 − β1^t),  v̂ = v/(1 − β2^t)
        g_prev = g

    Exactly the method's pseudocode, including its start: ``m = v = c = g_prev = 0``, so at ``t = 1``
    ``y = g`` and ``h = eps`` everywhere (``S = 1/2``). ``mean(h)`` is over each parameter tensor
    (``modulator="tensor"``, the default) or over all parameters of the group
    together (``modulator="global"``). With ``γ = 0`` this is AdamW exactly (tested against
    ``torch.optim.AdamW``); the weight decay is decoupled, applied as ``w·(1 − lr·wd)`` first,
    which is the same update as the formula above.

    ``beta_c`` and ``gamma`` are not given by the method's description; the defaults ``beta_c=0.99, gamma=0.1``
    come from a small, CPU-only sweep (``scripts/hatam_sweep.py``: TinyCNN, 5,000 CIFAR-10
    training images with crop+flip, 5,000 test images, lr 1e-3, wd 1e-2, batch 128, 8 epochs,
    3 seeds; Δ = paired by seed against γ = 0, i.e. AdamW)::

        beta_c  gamma   test acc %     test loss   Δacc    Δtest loss   (train loss)
          —     0       36.50 ± 0.58   1.754       —       —            1.734   (= AdamW)
          0.9   0.1     36.50 ± 0.59   1.755       +0.00   +0.0008      1.734
          0.9   0.5     36.42 ± 0.62   1.758       −0.08   +0.0037      1.738
          0.9   1.0     36.19 ± 0.63   1.762       −0.31   +0.0081      1.742
          0.99  0.1     36.52 ± 0.60   1.754       +0.02   +0.0000      1.734
          0.99  0.5     36.47 ± 0.65   1.754       −0.03   +0.0005      1.734
          0.99  1.0     36.47 ± 0.62   1.755       −0.03   +0.0008      1.734

    (A shorter run, 5 epochs and 2,000 test images, showed the same pattern.) No setting beat
    AdamW beyond noise; the stronger the correction (it scales roughly with γ·(1 − β_c)), the
    higher both train and test loss. The default keeps it weak, so HATAM at its defaults is close
    to AdamW; a sweep this small (a 5.5k-parameter CNN, 8 epochs, underfitting) says nothing about
    ResNet-18 at 80 epochs: tune ``gamma`` there before drawing conclusions.

    State per parameter: ``step``, ``exp_avg`` (m), ``exp_avg_sq`` (v), ``curvature`` (c),
    ``prev_grad`` (g_prev): twice AdamW's memory. ``modulator="global"`` takes the mean over all
    parameters of a parameter group that have a gradient.
    """

    takes_base_optimizer = False
    passes_per_step: float = 1.0

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, beta_c: float = 0.99,
                 gamma: float = 0.1, modulator: str = "tensor"):
        if not lr >= 0:
            raise ValueError(f"HATAM's lr must be >= 0, got {lr}")
        if not eps >= 0:
            raise ValueError(f"HATAM's eps must be >= 0, got {eps}")
        betas = tuple(betas)
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"HATAM's betas must be two values in [0, 1), got {betas}")
        if not 0 <= beta_c < 1:
            raise ValueError(f"HATAM's beta_c must be in [0, 1), got {beta_c}")
        if weight_decay < 0:
            raise ValueError(f"HATAM's weight_decay must be >= 0, got {weight_decay}")
        if modulator not in MODULATORS:
            raise ValueError(f"HATAM's modulator must be one of {MODULATORS}, got {modulator!r}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, beta_c=beta_c,
                        gamma=gamma, modulator=modulator)
        super().__init__(params, defaults)

    def _init_state(self, p: Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["curvature"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["prev_grad"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _numels(self, tensors: list[Tensor], like: Tensor) -> Tensor:
        """Element counts of ``tensors`` as a tensor on ``like``'s device, built once (a fresh
        host-to-device copy every step would wait for the device)."""
        cache = self.__dict__.setdefault("_numel_cache", {})
        key = (like.device, like.dtype, tuple(t.numel() for t in tensors))
        if key not in cache:
            cache[key] = torch.tensor(key[2], dtype=like.dtype, device=like.device)
        return cache[key]

    @torch.no_grad()
    def step(self, closure=None):
        """One step; ``closure`` (optional, as for ``torch.optim.AdamW``) is called exactly once."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            eps, gamma, beta_c = group["eps"], group["gamma"], group["beta_c"]
            params = [p for p in group["params"] if p.grad is not None]
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("HATAM does not support sparse gradients")
            states = [self._init_state(p) for p in params]
            # Tensors at the same step share their bias corrections: one set of foreach ops each
            # (all of them, after the first step of a freshly built optimizer).
            by_step = group_indices([st["step"] for st in states])
            hs: list[Tensor | None] = [None] * len(params)
            for t_prev, idx in by_step.items():     # the modulator's h from the previous v
                v_prev = [states[i]["exp_avg_sq"] for i in idx]
                if t_prev >= 1:
                    h = torch._foreach_div(v_prev, 1 - beta2 ** t_prev)
                    torch._foreach_sqrt_(h)
                else:
                    h = torch._foreach_sqrt(v_prev)
                torch._foreach_add_(h, eps)
                for i, hi in zip(idx, h):
                    hs[i] = hi
            if not params:
                continue
            # From here on the h buffers are worked in place: S, then γ·S⊙c, then g_h.
            sums = torch.stack(torch._foreach_norm(hs, 1))     # h > 0: its l1 norm is its sum
            if group["modulator"] == "global":
                mean = sums.sum() / sum(h.numel() for h in hs)
                torch._foreach_div_(hs, mean + eps)
            else:
                numels = self._numels(hs, sums)
                torch._foreach_div_(hs, list((sums / numels + eps).unbind()))
            grads = [p.grad for p in params]
            curv = [st["curvature"] for st in states]
            prev = [st["prev_grad"] for st in states]
            torch._foreach_mul_(curv, beta_c)                  # c += (1-β_c)(g - g_prev), written
            torch._foreach_sub_(prev, grads)                   # as c -= (1-β_c)(g_prev - g): the
            torch._foreach_add_(curv, prev, alpha=-(1 - beta_c))  # same bits, no temporary
            torch._foreach_mul_(hs, gamma)
            torch._foreach_mul_(hs, curv)
            torch._foreach_add_(hs, grads)                     # g_h = g + γ·S⊙c
            g_h = hs
            exp_avg = [st["exp_avg"] for st in states]
            exp_avg_sq = [st["exp_avg_sq"] for st in states]
            torch._foreach_mul_(exp_avg, beta1)
            torch._foreach_add_(exp_avg, g_h, alpha=1 - beta1)
            torch._foreach_mul_(exp_avg_sq, beta2)
            torch._foreach_addcmul_(exp_avg_sq, g_h, g_h, value=1 - beta2)
            torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
            for t_prev, idx in by_step.items():
                t = t_prev + 1
                for i in idx:
                    states[i]["step"] = t
                bias1 = 1 - beta1 ** t
                bias2_sqrt = math.sqrt(1 - beta2 ** t)
                denom = torch._foreach_sqrt([exp_avg_sq[i] for i in idx])
                torch._foreach_div_(denom, bias2_sqrt)
                torch._foreach_add_(denom, eps)
                torch._foreach_addcdiv_([params[i] for i in idx], [exp_avg[i] for i in idx], denom,
                                        value=-group["lr"] / bias1)
            torch._foreach_copy_(prev, grads)
        return loss

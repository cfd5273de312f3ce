"""MESA: SAF's trajectory loss against an exponential moving average of the model."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from .base import SharpnessAwareOptimizer, require_closure
from .context import StepContext
from .registry import register_method
from .saf import (check_trajectory_keys, context_fields, end_key, kl_active, lambda_key,
                  start_key, tau_key, trajectory_kl)
from .step_config import SGDStep
from ..typed_config import key


@dataclass
class MESAConfig(SGDStep):
    """Du et al., NeurIPS 2022 (MESA); the authors' command (AngusDujw/SAF, run.sh, ImageNet
    ResNet-50): lambda 0.8, tau 5, kl_start_epoch 5, EMA decay 0.9998 (timm's default there)."""
    lmbda: float = lambda_key(0.8)
    tau: float = tau_key()
    kl_start_epoch: int = start_key()
    kl_end_epoch: Optional[int] = end_key()
    ema_decay: float = key(0.9998, "MESA: decay of the moving average of the weights (and "
                                   "BatchNorm statistics) that provides the targets",
                           spec="float in (0, 1)")


@register_method("mesa", label="MESA", passes=1, order=119, config=MESAConfig,
                 needs=("closure_with", "epoch", "model"),
                 claimed_cost="",
                 paper='Du et al., "Sharpness-Aware Training for Free", NeurIPS 2022 (MESA)')
class MESA(SharpnessAwareOptimizer):
    """Memory-Efficient Sharpness-Aware training (MESA; Du, Zhou, Feng, Tan, Zhou,
    "Sharpness-Aware Training for Free", NeurIPS 2022): SAF's trajectory loss with an exponential
    moving average of the model as the target, in place of SAF's record of past outputs::

        w̄ <- decay·w̄ + (1 - decay)·w                  (after every step, from the first;
                                                         BatchNorm statistics too)
        L  = CE_B(w) + lambda · tau² · mean_i KL(softmax(f(w̄; x_i)/tau) ‖ softmax(f(w; x_i)/tau))
                                                        (when kl_start_epoch < epoch < kl_end_epoch)
        w <- base_step(w, ∇L)

    The teacher ``f(w̄; ·)`` runs in eval mode (its moving-average BatchNorm statistics), without
    graph, on the same (augmented) batch: a third of a pass more per step while the loss is on
    (counted as such), and one model's worth of memory. ``w̄`` starts as a copy of the model at the
    first step and is saved in checkpoints.

    From the authors' code (AngusDujw/SAF, ``MESA_train.py`` with timm's ``ModelEmaV2``): the
    moving average over the whole ``state_dict`` (``ema·decay + (1 - decay)·w``), updated after
    every optimizer step; the teacher in eval mode; the window and the loss as SAF's. Integer
    buffers (``num_batches_tracked``) are copied, where ``ModelEmaV2`` averages and truncates them
    (eval-mode BatchNorm does not read them). The loss a step returns (and the one logged) is the
    cross-entropy; the trajectory term is logged as ``trajectory_loss``.
    """

    passes_per_step = 1.0
    takes_schedule = False

    def __init__(self, params, base_optimizer=torch.optim.SGD, lmbda: float = 0.8,
                 tau: float = 5.0, kl_start_epoch: int = 5, kl_end_epoch: Optional[int] = None,
                 ema_decay: float = 0.9998, **base_kwargs):
        check_trajectory_keys(lmbda, tau, kl_start_epoch, kl_end_epoch)
        if not 0 < ema_decay < 1:
            raise ValueError(f"MESA's ema_decay must be in (0, 1), got {ema_decay}")
        self.lmbda, self.tau, self.ema_decay = float(lmbda), float(tau), float(ema_decay)
        self.kl_start_epoch, self.kl_end_epoch = int(kl_start_epoch), kl_end_epoch
        super().__init__(params, base_optimizer, {}, **base_kwargs)
        self.teacher: nn.Module | None = None
        self._pairs: tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]] | None = None

    def teacher_of(self, model: nn.Module) -> nn.Module:
        """The moving-average model: a copy of ``model`` at the first step (or the saved one)."""
        if self.teacher is None:
            teacher = copy.deepcopy(model)
            saved = self.method_state.get("teacher")
            if saved is not None:
                teacher.load_state_dict(saved)
            teacher.eval()
            teacher.requires_grad_(False)
            self.teacher = teacher
            self.method_state["teacher"] = teacher.state_dict(keep_vars=False)
            mine, theirs = teacher.state_dict(), model.state_dict()
            floats = [k for k, v in mine.items() if v.is_floating_point()]
            others = [k for k, v in mine.items() if not v.is_floating_point()]
            self._pairs = ([mine[k] for k in floats], [theirs[k] for k in floats],
                           [mine[k] for k in others], [theirs[k] for k in others])
        return self.teacher

    @torch.no_grad()
    def update_teacher(self) -> None:
        """``w̄ <- w̄·decay + (1 - decay)·w`` over the state_dict (a fixed number of foreach ops)."""
        ema, live, ema_int, live_int = self._pairs
        if ema:
            torch._foreach_mul_(ema, self.ema_decay)
            torch._foreach_add_(ema, live, alpha=1.0 - self.ema_decay)
        if ema_int:
            torch._foreach_copy_(ema_int, live_int)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.teacher, self._pairs = None, None    # rebuilt from the saved average at the next step

    @torch.no_grad()
    def sharpness_step(self, closure=None, context: StepContext | None = None) -> Tensor:
        require_closure(closure, type(self).__name__)
        closure_with, epoch, model = context_fields(context, "MESA",
                                                    ("closure_with", "epoch", "model"))
        teacher = self.teacher_of(model)
        active = kl_active(epoch, self.kl_start_epoch, self.kl_end_epoch)

        def term(logits: Tensor, x: Tensor, ids: Tensor) -> Tensor | None:
            if not active:
                return None
            with context.extra_pass(int(x.shape[0]), forward_only=True), torch.no_grad():
                target = teacher(x)
            out = self.lmbda * trajectory_kl(logits, target, self.tau)
            context.logged["trajectory_loss"] = out.detach()
            return out

        loss = self.call_closure(closure_with(term))
        self.base_step(context)
        self.update_teacher()   # after every step, as timm's ModelEmaV2 (also a skipped fp16 one)
        return loss

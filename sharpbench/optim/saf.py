"""SAF: sharpness-aware training for free, with a trajectory loss to each sample's past outputs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import SharpnessAwareOptimizer, require_closure
from .context import StepContext
from .registry import register_method
from .step_config import SGDStep
from ..typed_config import key


def trajectory_kl(logits: Tensor, target_logits: Tensor, tau: float) -> Tensor:
    """``τ² · mean_i KL(softmax(t_i/τ) ‖ softmax(z_i/τ))``, the trajectory loss of SAF and MESA
    (gradient through the current logits ``z`` only), in the authors' form: ``F.kl_div`` of the log
    of the softmax (not ``log_softmax``) against the target probabilities, summed over classes."""
    if logits.dtype in (torch.float16, torch.bfloat16):   # autocast's logits: computed in fp32
        logits = logits.float()
    log_now = F.softmax(logits / tau, dim=1).log()
    target = F.softmax(target_logits.to(logits.dtype) / tau, dim=1)
    return F.kl_div(log_now, target, reduction="none").sum(-1).mean() * tau ** 2


def kl_active(epoch: int, start: int, end: Optional[int]) -> bool:
    """The authors' window: ``start < epoch < end`` (0-based epochs; ``end`` None: no end)."""
    return epoch > start and (end is None or epoch < end)


def lambda_key(default: float) -> object:
    return key(default, "SAF/MESA: weight lambda of the trajectory loss (the authors' --reinforce)",
               spec="float >= 0")


def tau_key() -> object:
    return key(5.0, "SAF/MESA: temperature tau of the trajectory loss's softmaxes (the loss is "
                    "scaled by tau²)", spec="float > 0")


def start_key() -> object:
    return key(5, "SAF/MESA: the trajectory loss applies from the epoch after this one "
                  "(epoch > kl_start_epoch, 0-based; the authors' --kl_start_epoch)", spec="int >= 0")


def end_key() -> object:
    return key(None, "SAF/MESA: and before this epoch (epoch < kl_end_epoch); null: to the end",
               spec="null | int >= 1")


@dataclass
class SAFConfig(SGDStep):
    """Du et al., NeurIPS 2022; the authors' command (AngusDujw/SAF, run.sh, ImageNet ResNet-50):
    lambda 0.3, tau 5 (their default), kl_start_epoch 5, past_epochs 2."""
    lmbda: float = lambda_key(0.3)
    tau: float = tau_key()
    kl_start_epoch: int = start_key()
    kl_end_epoch: Optional[int] = end_key()
    past_epochs: int = key(2, "SAF: the outputs of this many epochs ago are the trajectory loss's "
                              "targets (the authors' --minus_epoch, Ẽ)", spec="int >= 1")


@register_method("saf", label="SAF", passes=1, order=118, config=SAFConfig,
                 needs=("closure_with", "sample_ids", "dataset_size", "epoch"),
                 claimed_cost="1 (almost zero additional computational cost over the base "
                              "optimizer)",
                 paper='Du et al., "Sharpness-Aware Training for Free", NeurIPS 2022')
class SAF(SharpnessAwareOptimizer):
    """Sharpness-Aware Training for Free (Du, Zhou, Feng, Tan, Zhou, "Sharpness-Aware Training for
    Free", NeurIPS 2022).

    No perturbation: the loss gains a trajectory term that keeps each sample's outputs close to
    what the network output for it ``Ẽ`` epochs ago, which the paper shows penalises sharpness
    along the trajectory. With ``z_i`` the logits of sample ``i`` now and ``ẑ_i`` its logits
    recorded at its pass ``Ẽ = past_epochs`` epochs ago::

        L = CE_B(w) + lambda · tau² · mean_i KL(softmax(ẑ_i/tau) ‖ softmax(z_i/tau))
                                                        (when kl_start_epoch < epoch < kl_end_epoch)
        w <- base_step(w, ∇L)                           (one pass)

    and every step records ``z_i`` (detached) for its samples. The record holds ``Ẽ + 1`` epochs
    of logits for every training sample, ``(Ẽ + 1) × N × C`` floats on the model's device (6 MB for
    CIFAR-10 at ``Ẽ = 2``, 60 MB for CIFAR-100), saved in checkpoints; a sample not seen in that
    epoch (the batch dropped at an epoch's end) has zero logits there, a uniform target, as in the
    authors' zero-initialised array. The loss a step returns (and the one logged) is the
    cross-entropy; the trajectory term is logged as ``trajectory_loss``.

    From the authors' code (AngusDujw/SAF, ``SAF_train.py``): the ring of ``Ẽ + 1`` slots indexed
    by ``epoch mod (Ẽ + 1)``, the window ``kl_start_epoch < epoch < kl_end_epoch``, the loss
    ``F.kl_div(softmax(z/tau).log(), softmax(ẑ/tau)).sum(-1).mean() · tau²``, recorded logits
    as the training forward produced them (augmented inputs, train mode). Under DDP each device
    records the samples it sees; a sample seen ``Ẽ`` epochs ago on another device has no record
    here (a uniform target), as in their per-process array. Needs ``sample_ids``, ``epoch`` and
    ``dataset_size`` from the step context (the Lightning module gives them).
    """

    passes_per_step = 1.0
    takes_schedule = False

    def __init__(self, params, base_optimizer=torch.optim.SGD, lmbda: float = 0.3,
                 tau: float = 5.0, kl_start_epoch: int = 5, kl_end_epoch: Optional[int] = None,
                 past_epochs: int = 2, **base_kwargs):
        check_trajectory_keys(lmbda, tau, kl_start_epoch, kl_end_epoch)
        if int(past_epochs) != past_epochs or past_epochs < 1:
            raise ValueError(f"SAF's past_epochs must be an integer >= 1, got {past_epochs}")
        self.lmbda, self.tau = float(lmbda), float(tau)
        self.kl_start_epoch, self.kl_end_epoch = int(kl_start_epoch), kl_end_epoch
        self.past_epochs = int(past_epochs)
        super().__init__(params, base_optimizer, {}, **base_kwargs)

    def record(self, n: int, like: Tensor) -> Tensor:
        """The ``(Ẽ + 1, N, C)`` record of logits (zeros when first made)."""
        rec = self.method_state.get("record")
        shape = (self.past_epochs + 1, n, like.shape[1])
        if rec is None or tuple(rec.shape) != shape or rec.device != like.device:
            if rec is not None and tuple(rec.shape) != shape:
                raise ValueError(f"SAF's record of past outputs has shape {tuple(rec.shape)}, "
                                 f"this run needs {shape}: resume with the same data and "
                                 f"past_epochs")
            rec = torch.zeros(shape, dtype=torch.float32, device=like.device) if rec is None \
                else rec.to(like.device, torch.float32)
            self.method_state["record"] = rec
        return rec

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        rec = self.method_state.get("record")
        if rec is not None:                 # the record stays float32 (the base casts to params')
            self.method_state["record"] = rec.float()

    @torch.no_grad()
    def sharpness_step(self, closure=None, context: StepContext | None = None) -> Tensor:
        require_closure(closure, type(self).__name__)
        closure_with, n, epoch, _ = context_fields(
            context, "SAF", ("closure_with", "dataset_size", "epoch", "sample_ids"))
        active = kl_active(epoch, self.kl_start_epoch, self.kl_end_epoch)
        now, past = epoch % (self.past_epochs + 1), (epoch - self.past_epochs) % (self.past_epochs + 1)

        def term(logits: Tensor, x: Tensor, ids: Tensor) -> Tensor | None:
            rec = self.record(n, logits)
            out = None
            if active:
                out = self.lmbda * trajectory_kl(logits, rec[past].index_select(0, ids), self.tau)
                context.logged["trajectory_loss"] = out.detach()
            rec[now].index_copy_(0, ids, logits.detach().float())
            return out

        loss = self.call_closure(closure_with(term))
        self.base_step(context)
        return loss


def context_fields(context: StepContext | None, method: str, names: tuple[str, ...]) -> list:
    """The step-context fields ``names`` a trajectory method reads, or an error saying how to
    pass them."""
    example = ", ".join(f"{name}=..." for name in names)
    if context is None:
        raise ValueError(f"{method}.step() needs a StepContext({example}); the Lightning module "
                         "gives one")
    return [context.require(name, method, example) for name in names]


def check_trajectory_keys(lmbda: float, tau: float, start: int, end: Optional[int]) -> None:
    if not lmbda >= 0:
        raise ValueError(f"lmbda (weight of the trajectory loss) must be >= 0, got {lmbda}")
    if not tau > 0:
        raise ValueError(f"tau (temperature) must be > 0, got {tau}")
    if int(start) != start or start < 0:
        raise ValueError(f"kl_start_epoch must be an integer >= 0, got {start}")
    if end is not None and (int(end) != end or end <= start):
        raise ValueError(f"kl_end_epoch must be null or an integer > kl_start_epoch={start}, "
                         f"got {end}")

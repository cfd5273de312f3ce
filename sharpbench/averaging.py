"""An average of the weights beside the trained ones, for any method: SWA or an EMA, evaluated on
the test set at the end and recorded as an extra accuracy (``test_acc_swa`` / ``test_acc_ema``).

Kaddour, Liu, Silva & Kusner ("When Do Flat Minima Optimizers Work?", NeurIPS 2022) made SWA the
standard comparison for SAM. ``monitor.weight_average``:

- ``swa`` (Izmailov et al., "Averaging Weights Leads to Wider Optima and Better Generalization",
  UAI 2018): the mean of the weights at the end of each epoch from epoch
  ``ceil(swa_start · max_epochs)`` on, ``w̄ <- w̄ + (w - w̄)/n``, along the method's own learning
  rate schedule (no SWA schedule is imposed); BatchNorm statistics are recomputed for ``w̄`` with
  ``torch.optim.swa_utils.update_bn`` over one pass of the training loader before the test;
- ``ema``: after every optimizer step ``w̄ <- w̄ + (1 - decay)(w - w̄)``, weights and BatchNorm
  buffers alike (as timm's ``ModelEmaV2``), starting from the initial weights.

The averages are written here with ``torch._foreach_lerp_`` rather than ``AveragedModel``, whose
``update_parameters`` compares a device tensor with 0 on every call (a host sync per step). The
average is callback state, saved in every checkpoint, so a resumed run continues it exactly. It
never touches the trained weights: the final-epoch accuracy stays the headline number.
"""
from __future__ import annotations

import copy
import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

KINDS = ("none", "swa", "ema")


class WeightAveraging(L.Callback):
    """``kind`` ``swa`` or ``ema`` (see the module docstring)."""

    def __init__(self, kind: str, swa_start: float = 0.75, ema_decay: float = 0.999):
        if kind not in KINDS[1:]:
            raise ValueError(f"weight_average must be one of {KINDS}, got {kind!r}")
        if not 0.0 <= swa_start < 1.0:
            raise ValueError(f"swa_start must be in [0, 1) (a fraction of the epochs), got {swa_start}")
        if not 0.0 < ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {ema_decay}")
        self.kind, self.swa_start, self.ema_decay = kind, float(swa_start), float(ema_decay)
        self.average: nn.Module | None = None
        self.n_averaged = 0
        self._pending: dict | None = None
        self._listed: tuple | None = None

    # ---------------------------------------------------------------------------- state
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.average is None:
            self.average = copy.deepcopy(pl_module.model).eval()
            for p in self.average.parameters():
                p.requires_grad_(False)
        if self._pending is not None:
            self._load(self._pending)
            self._pending = None

    def state_dict(self) -> dict[str, Any]:
        if self.average is None:
            return {}
        return {"kind": self.kind, "n_averaged": self.n_averaged,
                "average": {k: v.detach().clone() for k, v in self.average.state_dict().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if self.average is None:
            self._pending = state
        else:
            self._load(state)

    def _load(self, state: dict[str, Any]) -> None:
        if state.get("kind") != self.kind:
            return   # another average was kept before: start this one afresh
        self.average.load_state_dict(state["average"])
        self.n_averaged = int(state["n_averaged"])

    # --------------------------------------------------------------------------- updates
    def _pairs(self, model: nn.Module, buffers: bool) -> tuple[list[Tensor], list[Tensor]]:
        """(the average's tensors, the model's), listed once and kept: EMA updates every step,
        and both modules keep their tensor objects (a checkpoint loads into them in place)."""
        key = (id(model), buffers)
        if self._listed is None or self._listed[0] != key:
            # setup() copied the model before Lightning moved it to its device: follow it
            self.average.to(next(model.parameters()).device)
            avg = list(self.average.parameters())
            cur = [p.detach() for p in model.parameters()]
            if buffers:
                avg += [b for b in self.average.buffers() if b.is_floating_point()]
                cur += [b for b in model.buffers() if b.is_floating_point()]
            self._listed = (key, avg, cur)
        return self._listed[1], self._listed[2]

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.kind == "ema":
            avg, cur = self._pairs(pl_module.model, buffers=True)
            torch._foreach_lerp_(avg, cur, 1.0 - self.ema_decay)
            self.n_averaged += 1

    def first_epoch(self, max_epochs: int) -> int:
        """The first epoch (0-based) whose end weights SWA averages."""
        return min(max_epochs - 1, math.ceil(self.swa_start * max_epochs))

    @torch.no_grad()
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.kind == "swa" and trainer.current_epoch >= self.first_epoch(trainer.max_epochs):
            self.n_averaged += 1
            avg, cur = self._pairs(pl_module.model, buffers=False)
            torch._foreach_lerp_(avg, cur, 1.0 / self.n_averaged)

    # ------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, module, data) -> dict[str, Any]:
        """The average's test loss and accuracy (``test_loss_<kind>``, ``test_acc_<kind>``) and how
        many weights it holds (``<kind>_averaged``); empty if nothing was averaged yet."""
        if self.average is None or self.n_averaged == 0:
            return {}
        device = module.device
        average = self.average.to(device)
        if self.kind == "swa":   # BatchNorm statistics of the averaged weights
            from torch.optim.swa_utils import update_bn
            update_bn(data.train_dataloader(), average, device=device)
        average.eval()
        loss = torch.zeros((), device=device, dtype=torch.float64)
        correct = torch.zeros((), device=device, dtype=torch.float64)
        count = torch.zeros((), device=device, dtype=torch.float64)
        for x, y in data.test_dataloader():
            x, y = x.to(device), y.to(device)
            with module.autocast():
                logits = average(x)
            loss += F.cross_entropy(logits.float(), y, reduction="sum").double()
            correct += (logits.argmax(1) == y).sum().double()
            count += y.numel()
        if trainer.world_size > 1:
            stats = trainer.strategy.reduce(torch.stack([loss, correct, count]), reduce_op="sum")
            loss, correct, count = stats
        n = float(count)
        if n == 0:
            return {}
        return {f"test_loss_{self.kind}": float(loss) / n,
                f"test_acc_{self.kind}": 100.0 * float(correct) / n,
                f"{self.kind}_averaged": self.n_averaged}


def build_averaging(cfg) -> list[WeightAveraging]:
    """The callback ``monitor.weight_average`` asks for (an empty list for ``none``)."""
    node = cfg.get("monitor") or {}
    kind = str(node.get("weight_average") or "none")
    if kind == "none":
        return []
    return [WeightAveraging(kind, swa_start=float(node.get("swa_start", 0.75)),
                            ema_decay=float(node.get("ema_decay", 0.999)))]

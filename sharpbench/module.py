"""The Lightning module: a thin driver of any optimizer in ``sharpbench.optim``.

One ``training_step`` serves one-pass optimizers (SGD, Adam, HATAM …) and multi-pass ones (SAM and
its family) alike. It builds the closure the optimizer calls as often as it needs; the closure

- counts forward/backward passes (``passes_per_step`` in metrics.json is measured, not assumed),
- runs under autocast (bf16 or fp16) and, for fp16, scales the loss and unscales the gradients
  after *every* pass (``sharpbench.amp``), so the optimizer only ever sees true gradients,
- lets only the first pass of a step update BatchNorm running statistics (``optimizer.bn_policy``
  selects the conventions of public implementations instead: ``sharpbench.optim.bn``).

What a method needs from a step beyond the closure (a loss it can differentiate twice, training
samples for a Fisher estimate, a loss split by class, the batch index, DDP gradient averaging,
clipping, the fp16 overflow check) reaches it in one ``StepContext``
(``sharpbench.optim.context``), built here the same way for every method: the module knows no
method by name. The step goes through Lightning's optimizer wrapper, which counts it.

DDP: gradients are averaged by the context's ``grad_reducer`` (an all-reduce) right before the
base step, and the perturbation uses each device's own gradient unless ``sync_perturbation``.
"""
from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from functools import partial
from typing import Any, Iterator, Mapping

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .amp import DynamicLossScaler
from .optim.accumulation import accumulated_closure
from .optim.base import SharpnessAwareOptimizer
from .optim.bn import (bn_policy_closure, check_bn_policy, chunk_bn_closures, frozen_bn_stats,
                       later_pass)
from .optim.context import FORWARD_SHARE, StepContext, chunk_slices
from .optim.factory import build_optimizer
from . import run_logging
from .schedule import build_scheduler

PRECISIONS = {"32": None, "32-true": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


class DivergenceError(RuntimeError):
    """The training loss became inf/NaN."""


class SharpnessModule(L.LightningModule):
    """``model`` is a built network, or ``None`` with ``model_cfg`` (``{"name", "num_classes",
    **constructor kwargs}`` for :func:`sharpbench.models.build_model`) to build it here. Every
    argument but ``model`` and ``class_counts`` is saved in the checkpoint's hyperparameters, so
    with ``model_cfg`` given ``SharpnessModule.load_from_checkpoint(path)`` rebuilds the module;
    ``run_config`` (the run's identity) and ``data_source`` (where its data were read,
    :mod:`sharpbench.data_location`) travel with it for ``sharpbench eval`` and ``analyze``.
    ``fisher_batch_size`` is accepted for checkpoints of earlier versions and unused: it is now
    SSAM-F's own hyperparameter (``optimizer.fisher_batch_size``)."""

    def __init__(self, model: nn.Module | None = None, optimizer_cfg: Mapping[str, Any] | None = None,
                 schedule_cfg: Mapping[str, Any] | None = None, *, num_classes: int, epochs: int,
                 precision: str = "32", label_smoothing: float = 0.0, grad_clip: float = 0.0,
                 class_counts: Tensor | None = None, fisher_batch_size: int | None = None,
                 sync_perturbation: bool = False, compile: bool = False, micro_batches: int = 1,
                 model_cfg: Mapping[str, Any] | None = None,
                 run_config: Mapping[str, Any] | None = None,
                 data_source: Mapping[str, Any] | None = None):
        super().__init__()
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
        if optimizer_cfg is None or schedule_cfg is None:
            raise TypeError("SharpnessModule needs optimizer_cfg and schedule_cfg")
        # In the checkpoint only; what the loggers get is the run's config (sent by train.py).
        self.save_hyperparameters(ignore=["model", "class_counts"], logger=False)
        if model is None:
            if model_cfg is None:
                raise ValueError("SharpnessModule needs a model, or model_cfg to build one "
                                 "({'name': 'resnet18', 'num_classes': 10, ...})")
            from .models import build_model
            model = build_model(**dict(model_cfg))
        self.model = model
        self.automatic_optimization = False
        self.optimizer_cfg = dict(optimizer_cfg)
        self.schedule_cfg = dict(schedule_cfg)
        self.num_classes = num_classes
        self.epochs = epochs
        self.precision_name = precision
        self.amp_dtype = PRECISIONS[precision]
        self.label_smoothing = label_smoothing
        self.grad_clip = grad_clip
        self.bn_policy = check_bn_policy(self.optimizer_cfg.get("bn_policy") or "first_pass")
        self.sync_perturbation = sync_perturbation
        if isinstance(micro_batches, bool) or int(micro_batches) != micro_batches \
                or micro_batches < 1:
            raise ValueError(f"micro_batches must be an integer >= 1, got {micro_batches!r}")
        self.micro_batches = int(micro_batches)
        self.scaler = DynamicLossScaler() if self.amp_dtype == torch.float16 else None
        self.register_buffer("class_counts", class_counts if class_counts is not None
                             else torch.zeros(0, dtype=torch.long), persistent=False)
        # What a run measured (python ints: counting costs no host synchronisation).
        self.passes = 0
        self.input_shape: tuple | None = None  # shape of a training batch (for the FLOP count)
        self.steps_done = 0
        self.skipped_steps = 0
        self._forward = torch.compile(model) if compile else model
        self._eval: dict[str, dict[str, Tensor]] = {}
        self.eval_results: dict[str, dict[str, Any]] = {}
        self.train_loss_epoch: float | None = None  # mean training loss of the last epoch
        # mean loss of the last epoch's steps whose loss is at w + e (MSAM, A²SAM's one-pass steps)
        self.train_loss_perturbed_epoch: float | None = None
        self.train_acc_epoch: float | None = None   # training accuracy (%) of the last epoch
        self._first_bad: Tensor | None = None
        self._ddp = False
        self._loss_sum: Tensor | float = 0.0
        self._loss_count = 0
        self._ploss_sum: Tensor | float = 0.0   # the same for losses at w + e
        self._ploss_count = 0
        self._hits: Tensor | int = 0   # correct first-pass predictions this epoch (on the device)
        self._seen = 0
        self._bar_mark = (0.0, 0)      # (loss sum, count) when the progress bar was last updated

    # ------------------------------------------------------------------ optimizer & schedule
    def configure_optimizers(self):
        opt = build_optimizer(self.model, self.optimizer_cfg,
                              context={"steps_per_epoch": self.steps_per_epoch(),
                                       "total_epochs": self.epochs})
        sched = build_scheduler(opt, self.schedule_cfg, self.steps_per_epoch(), self.epochs)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch, from the training loader's length and ``limit_train_batches``.

        (Not ``trainer.estimated_stepping_batches``: asking for it sets Lightning's training data
        up early, before a checkpoint's loader position is restored, which breaks exact resume.)"""
        n = len(self.trainer.datamodule.train_dataloader())
        limit = self.trainer.limit_train_batches
        if isinstance(limit, int):
            n = min(n, limit)
        elif limit is not None:
            n = int(n * float(limit))
        return max(1, n)

    def on_train_start(self) -> None:
        # Short epochs are logged at (nearly) every step, so every run has a loss curve.
        self.trainer.log_every_n_steps = run_logging.dense_log_interval(self.trainer.log_every_n_steps,
                                                            self.steps_per_epoch())
        ddp = self.trainer.model
        self._ddp = isinstance(ddp, torch.nn.parallel.DistributedDataParallel)
        if self._ddp:
            # We average gradients ourselves, once, right before the base step: DDP's own
            # bucketed all-reduce would fire on every pass, perturbation included.
            ddp.require_backward_grad_sync = False

    # ---------------------------------------------------------------------------- training
    def forward(self, x: Tensor) -> Tensor:
        return self._forward(x)

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def training_loss(self, logits: Tensor, y: Tensor, reduce=None) -> Tensor:
        """The cross-entropy (with the run's label smoothing): the batch mean, or
        ``reduce(per_sample_losses, y)`` (a method's own reduction, e.g. ImbSAM's head/tail split)."""
        if reduce is None:
            return F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)
        per_sample = F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing,
                                     reduction="none")
        return reduce(per_sample, y)

    def backward_pass(self, loss: Tensor) -> None:
        if self.scaler is None:
            loss.backward()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(list(self.model.parameters()))

    def make_closure(self, opt: torch.optim.Optimizer, x: Tensor, y: Tensor,
                     ids: Tensor | None = None):
        """The step's closure: zero the gradients, forward (autocast), loss, backward (scaled and
        unscaled for fp16), return the detached loss. ``closure(reduce)`` uses a method's own
        reduction of the per-sample losses. BatchNorm statistics follow ``bn_policy`` over all
        the calls of one step.

        With ``micro_batches = k > 1`` the batch runs as ``k`` micro-batches of ``batch/k`` and
        the closure's gradient is their mean (gradient accumulation,
        :mod:`sharpbench.optim.accumulation`); BatchNorm statistics come from the first
        micro-batch, as rank 0's under DDP over ``k`` devices."""
        if self.micro_batches == 1:
            return bn_policy_closure(self.model, self.pass_closure(opt, x, y, ids=ids),
                                     self.bn_policy)
        return accumulated_closure(self.chunk_closures(opt, x, y, self.micro_size(x), ids),
                                   self.model.parameters())

    def micro_size(self, x: Tensor) -> int | None:
        """Samples per micro-batch (``None`` without gradient accumulation)."""
        if self.micro_batches == 1:
            return None
        n = int(x.shape[0])
        if n % self.micro_batches:
            raise ValueError(f"trainer.micro_batches={self.micro_batches} must divide the batch "
                             f"({n} samples here): choose a divisor of dataset.batch_size")
        return n // self.micro_batches

    def pass_closure(self, opt: torch.optim.Optimizer, x: Tensor, y: Tensor,
                     pass_fraction: float = 1.0, count_hits: bool = True,
                     ids: Tensor | None = None):
        """The closure of :meth:`make_closure` without a BatchNorm policy; each call counts
        ``pass_fraction`` of a pass (a chunk of the batch: its share); the first call's
        predictions count for the training accuracy unless ``count_hits`` is False.
        ``closure(term=...)`` adds ``term(logits, x, ids)`` to the loss (``closure_with``)."""
        first = [count_hits]

        def closure(reduce=None, term=None) -> Tensor:
            self.passes += pass_fraction
            opt.zero_grad(set_to_none=True)
            with self.autocast():
                logits = self(x)
                extra = None if term is None else term(logits, x, ids)
            if first[0]:  # training accuracy: the first pass of a step, at the weights it starts from
                first[0] = False
                self._hits = self._hits + (logits.detach().argmax(1) == y).sum()
                self._seen += int(y.shape[0])
            loss = self.training_loss(logits, y, reduce)
            # a term (SAF's trajectory loss) is trained on but not reported as the training loss
            self.backward_pass(loss if extra is None else loss + extra.float())
            return loss.detach()
        return closure

    def chunk_closures(self, opt: torch.optim.Optimizer, x: Tensor, y: Tensor,
                       m: int, ids: Tensor | None = None) -> list:
        """Closures over consecutive chunks of ``m`` samples (m-sharpness on one device): each
        counts ``m / batch`` of a pass; only the first chunk's first pass updates BatchNorm
        running statistics (under DDP with ``batch / m`` devices, rank 0's copy is the one kept)."""
        n = int(x.shape[0])
        return chunk_bn_closures(self.model, [
            self.pass_closure(opt, x[s], y[s], m / n, ids=None if ids is None else ids[s])
            for s in chunk_slices(n, m)], self.bn_policy)

    def closure_on(self, opt: torch.optim.Optimizer, x: Tensor, y: Tensor):
        """``closure_on(index)``: the step's closure over the samples ``index`` of the batch,
        counted as their share of a pass, BatchNorm statistics as in a later pass."""
        n = int(x.shape[0])

        def on(index: Tensor):
            inner = self.pass_closure(opt, x[index], y[index], int(index.numel()) / n,
                                      count_hits=False)

            def closure(*args, **kwargs) -> Tensor:
                with later_pass(self.model, self.bn_policy):
                    return inner(*args, **kwargs)
            return closure
        return on

    def per_sample_losses(self, x: Tensor, y: Tensor):
        """``per_sample_losses()``: each sample's training loss at the current weights, from a
        forward pass without graph (``FORWARD_SHARE`` of a pass), BatchNorm statistics as in a
        later pass."""
        def losses() -> Tensor:
            self.passes += FORWARD_SHARE
            with torch.no_grad(), later_pass(self.model, self.bn_policy), self.autocast():
                logits = self(x)
            return F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing,
                                   reduction="none")
        return losses

    def step_context(self, closure, x: Tensor, y: Tensor, batch_idx: int,
                     opt: torch.optim.Optimizer | None = None, ids: Tensor | None = None,
                     dataset_size: int | None = None) -> StepContext:
        """Everything a method may read from this step (``sharpbench.optim.context``); the
        closures in it are built now and run only if the method calls them."""
        return StepContext(
            model=self.model, loss_closure=self.hessian_loss_closure(x, y),
            sample=self.training_sampler(), extra_pass=self.extra_pass, closure_of=lambda reduce: partial(closure, reduce=reduce),
            batch_idx=batch_idx,
            chunk_closures=None if opt is None else (lambda m: self.chunk_closures(opt, x, y, m)),
            micro_batch=self.micro_size(x),
            per_sample_losses=self.per_sample_losses(x, y),
            closure_on=None if opt is None else self.closure_on(opt, x, y),
            closure_with=lambda term: partial(closure, term=term),
            sample_ids=ids, dataset_size=dataset_size, epoch=self.current_epoch,
            class_counts=self.class_counts if self.class_counts.numel() else None,
            grad_reducer=all_reduce_mean if self._ddp else None,
            reduce_perturbation_grads=self.sync_perturbation and self._ddp,
            before_base_step=self.before_base_step)

    def hessian_loss_closure(self, x: Tensor, y: Tensor):
        """``loss_closure(mode)``: the loss with its graph at the current weights, for
        Hessian-vector products; always fp32 (outside autocast: fp16 double backward through
        BatchNorm overflows to NaN). ``"train"``: the objective being trained (train-mode BN with
        running statistics frozen, label smoothing); ``"eval"``: plain cross-entropy with the
        model in eval mode."""
        def loss_closure(mode: str = "train") -> Tensor:
            if mode not in ("train", "eval"):
                raise ValueError(f"loss_closure mode must be 'train' or 'eval', got {mode!r}")
            self.passes += 1
            with torch.autocast(self.device.type, enabled=False):
                if mode == "eval":
                    was_training = self.model.training
                    self.model.eval()
                    try:
                        return F.cross_entropy(self.model(x).float(), y)
                    finally:
                        self.model.train(was_training)
                with frozen_bn_stats(self.model):
                    logits = self.model(x)
                return self.training_loss(logits, y)
        return loss_closure

    def training_sampler(self):
        """``sample(n)``: ``n`` un-augmented training samples on this device, from a stream seeded by
        the step (so a resumed run draws the same ones)."""
        data = self.trainer.datamodule
        step = self.global_step
        gen: list[torch.Generator] = []

        def sample(n: int) -> tuple[Tensor, Tensor]:
            if not gen:
                gen.append(torch.Generator().manual_seed(10_007 * (step + 1) + 17))
            idx = torch.randint(len(data.train_y), (int(n),), generator=gen[0])
            return data.fisher_batch(idx, self.device)
        return sample

    @contextmanager
    def extra_pass(self, samples: int | None = None, forward_only: bool = False) -> Iterator[None]:
        """A pass a method runs itself (SSAM-F's Fisher passes, MESA's teacher), counted in
        ``passes`` at its FLOP price: ``samples / batch size`` of a training pass over ``samples``
        samples, else 1; ``FORWARD_SHARE`` of that for a forward-only pass."""
        batch = self.input_shape[0] if self.input_shape else None
        share = 1 if samples is None or not batch else samples / batch
        self.passes += share * (FORWARD_SHARE if forward_only else 1)
        yield

    def before_base_step(self) -> bool:
        """Clip the gradients (``trainer.gradient_clip_val``); ``False`` if fp16 overflowed."""
        if self.grad_clip and self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip, foreach=True)
        if self.scaler is not None:
            return self.scaler.step_is_finite()
        return True

    def one_pass_closure(self, closure):
        """For one-pass optimizers (torch's, HATAM), which call the closure once and then step:
        the pass, the gradient average (DDP), then clipping and the overflow check; on overflow the
        gradients are dropped, so the optimizer's step leaves every parameter as it is."""
        def one_pass() -> Tensor:
            loss = closure()
            if self._ddp:
                all_reduce_mean([p.grad for p in self.model.parameters() if p.grad is not None])
            if not self.before_base_step():
                self.model.zero_grad(set_to_none=True)
            return loss
        return one_pass

    def training_step(self, batch, batch_idx: int) -> Tensor:
        x, y = batch
        loader = self.trainer.train_dataloader
        if hasattr(loader, "mark_consumed"):  # checkpoints record the batches used, not prefetched
            loader.mark_consumed(self.current_epoch, batch_idx + 1)
        opt = self.optimizers()  # Lightning's wrapper: its step is counted (global_step)
        raw = opt.optimizer
        lr = raw.param_groups[0]["lr"]  # the learning rate this step uses
        self.input_shape = tuple(x.shape)  # for the FLOP count of a pass (record.py)
        # the samples' dataset positions (SAF's record of past outputs is keyed by them)
        ids = loader.sample_ids(self.current_epoch, batch_idx) \
            if hasattr(loader, "sample_ids") else None
        closure = self.make_closure(raw, x, y, ids)
        if isinstance(raw, SharpnessAwareOptimizer):
            context = self.step_context(closure, x, y, batch_idx, opt=raw, ids=ids,
                                        dataset_size=len(loader.y) if ids is not None else None)
            loss = opt.step(closure=closure, context=context)
        else:  # one-pass optimizers: SGD, Adam, HATAM …
            context = StepContext()
            loss = opt.step(closure=self.one_pass_closure(closure))
        if self.scaler is not None and not self.scaler.update():
            self.skipped_steps += 1
        self.lr_schedulers().step()
        self.steps_done += 1
        self.watch_divergence(loss)
        if not context.loss_is_perturbed:  # the epoch's train loss: at the unperturbed weights only
            self._loss_sum = self._loss_sum + loss.double()
            self._loss_count += 1
        else:
            self._ploss_sum = self._ploss_sum + loss.double()
            self._ploss_count += 1
        if self.is_logging_step():
            self.log_step_values(raw, lr, loss, context)
        return loss

    def is_logging_step(self) -> bool:
        """Lightning's rule for when loggers take step values: every ``log_every_n_steps``
        optimizer steps (counted after this step), and when training is about to stop."""
        n = self.trainer.log_every_n_steps
        return bool(n) and (self.global_step % n == 0 or self.trainer.should_stop)

    def log_step_values(self, opt: torch.optim.Optimizer, lr: float, loss: Tensor,
                        context: StepContext) -> None:
        """At logging steps only: Lightning's ``self.log`` costs about a millisecond of Python per
        call, a visible share of a small model's step, and the logger writes step values only
        at these steps anyway (the epoch mean is logged from our own sum at epoch end). Logged:
        the step's loss (``train/loss_step``, at the unperturbed weights), the learning rate, what
        the method put in ``context.logged`` (GSAM's ``rho``), the passes counted so far, and the
        progress bar's ``loss`` = mean training loss since its last update (the logger reads
        values back here anyway, so this adds no host sync)."""
        perturbed = context.loss_is_perturbed
        if perturbed is None:
            self.log("train/loss_step", loss, on_step=True, on_epoch=False)
        else:
            # A²SAM's one-pass steps only have the loss at w + e: logged under its own name, so
            # that train/loss is the loss at the unperturbed weights for every method (NaN under
            # the name that does not apply to this step).
            nan = torch.full_like(loss, float("nan"))
            self.log("train/loss_step", nan if perturbed else loss, on_step=True, on_epoch=False)
            self.log("train/loss_perturbed_step", loss if perturbed else nan, on_step=True,
                     on_epoch=False)
        self.log("train/lr", float(lr), on_step=True, on_epoch=False)
        for name, value in context.logged.items():
            self.log(f"train/{name}", float(value), on_step=True, on_epoch=False)
        self.log("train/passes", float(self.passes), on_step=True, on_epoch=False)
        total, count = float(self._loss_sum), self._loss_count
        last_total, last_count = self._bar_mark
        if count > last_count:
            self.log("loss", (total - last_total) / (count - last_count), prog_bar=True,
                     logger=False, on_step=True, on_epoch=False)
        self._bar_mark = (total, count)

    # ------------------------------------------------------------------ divergence watch
    def on_train_epoch_start(self) -> None:
        # (Lightning does not call this hook when it resumes mid-epoch: the sums are restored.)
        self._first_bad = None
        self._loss_sum, self._loss_count, self._hits, self._seen = 0.0, 0, 0, 0
        self._ploss_sum, self._ploss_count = 0.0, 0
        self._bar_mark = (0.0, 0)

    def watch_divergence(self, loss: Tensor) -> None:
        """Remember the first non-finite loss on the device (no sync); checked every
        ``trainer.log_every_n_steps`` and at epoch end."""
        if self._first_bad is None:
            self._first_bad = torch.full((2,), -1.0, device=loss.device, dtype=torch.float64)
            self._step_on_device = torch.full((), float(self.global_step), device=loss.device,
                                              dtype=torch.float64)
        else:
            self._step_on_device += 1
        fresh = ~torch.isfinite(loss) & (self._first_bad[0] < 0)
        stamp = torch.stack([self._step_on_device, loss.double()])
        self._first_bad = torch.where(fresh, stamp, self._first_bad)
        if (self.global_step + 1) % max(1, self.trainer.log_every_n_steps) == 0:
            self.check_divergence()

    def check_divergence(self) -> None:
        if self._first_bad is None:
            return
        step, value = self._first_bad.tolist()
        if step >= 0:
            lrs = [g["lr"] for g in self.optimizers(use_pl_optimizer=False).param_groups]
            raise DivergenceError(
                f"training diverged: loss is {value} at step {int(step)} (epoch "
                f"{self.current_epoch}); learning rate now {lrs[0]:.4g}. Lower optimizer.lr or "
                "rho, enable trainer.gradient_clip_val, or use precision=bf16-mixed instead of 16-mixed")

    def on_train_epoch_end(self) -> None:
        self.check_divergence()
        if self._loss_count:  # one host sync per epoch
            self.train_loss_epoch = float(self._loss_sum) / self._loss_count
            self.log("train/loss_epoch", self.train_loss_epoch, on_step=False, on_epoch=True)
        if self._ploss_count:
            self.train_loss_perturbed_epoch = float(self._ploss_sum) / self._ploss_count
            self.log("train/loss_perturbed_epoch", self.train_loss_perturbed_epoch, on_step=False,
                     on_epoch=True)
        hits, seen = self._hits, self._seen
        if self.trainer.world_size > 1:
            pair = torch.stack([torch.as_tensor(hits, device=self.device).double(),
                                torch.tensor(float(seen), device=self.device, dtype=torch.float64)])
            hits, seen = self.trainer.strategy.reduce(pair, reduce_op="sum").tolist()
        if seen:
            self.train_acc_epoch = 100.0 * float(hits) / float(seen)
            self.log("train/acc", self.train_acc_epoch, on_step=False, on_epoch=True)

    # --------------------------------------------------------------------------- evaluation
    def _eval_start(self, names: list[str]) -> None:
        self._eval = {n: {"loss": torch.zeros((), device=self.device, dtype=torch.float64),
                          "correct": torch.zeros(self.num_classes, device=self.device, dtype=torch.long),
                          "count": torch.zeros(self.num_classes, device=self.device, dtype=torch.long)}
                      for n in names}

    def _eval_update(self, name: str, batch) -> None:
        x, y = batch
        with self.autocast():
            logits = self(x)
        acc = self._eval[name]
        acc["loss"] += F.cross_entropy(logits.float(), y, reduction="sum").double()
        hit = (logits.argmax(1) == y).long()
        acc["correct"] += torch.bincount(y, weights=hit, minlength=self.num_classes).long()
        acc["count"] += torch.bincount(y, minlength=self.num_classes)

    def _eval_end(self) -> None:
        for name, acc in self._eval.items():
            if self.trainer.world_size > 1:  # evaluation loaders are sharded across ranks
                for key in acc:
                    acc[key] = self.trainer.strategy.reduce(acc[key], reduce_op="sum")
            total = int(acc["count"].sum())
            if total == 0:
                continue
            loss = float(acc["loss"]) / total
            accuracy = 100.0 * float(acc["correct"].sum()) / total
            self.log(f"{name}/loss", loss, sync_dist=False)
            self.log(f"{name}/acc", accuracy, prog_bar=name != "train", sync_dist=False)
            per_class = (100.0 * acc["correct"].double() / acc["count"].clamp(min=1).double())
            self.eval_results[name] = {"loss": loss, "acc": accuracy,
                                       "per_class_acc": per_class.tolist(),
                                       "count": acc["count"].tolist(), "epoch": self.current_epoch}

    def eval_names(self) -> list[str]:
        return list(getattr(self.trainer.datamodule, "eval_names", ["val"]))

    def on_validation_epoch_start(self) -> None:
        self._eval_start(self.eval_names())

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_update(self.eval_names()[dataloader_idx], batch)

    def on_validation_epoch_end(self) -> None:
        self._eval_end()

    def on_test_epoch_start(self) -> None:
        self._eval_start(["test"])

    def test_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_update("test", batch)

    def on_test_epoch_end(self) -> None:
        self._eval_end()

    # ------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["sharpbench"] = {
            "passes": self.passes, "steps_done": self.steps_done,
            "skipped_steps": self.skipped_steps, "train_loss_epoch": self.train_loss_epoch,
            "epoch_loss": (float(self._loss_sum), self._loss_count),  # a mid-epoch save
            "epoch_loss_perturbed": (float(self._ploss_sum), self._ploss_count),
            "train_loss_perturbed_epoch": self.train_loss_perturbed_epoch,
            "epoch_hits": (int(self._hits), self._seen), "train_acc_epoch": self.train_acc_epoch,
            "eval_results": self.eval_results,  # the last evaluation (val/test) before this step
            "scaler": self.scaler.state_dict() if self.scaler else None,
            # RNG streams (dropout, anything drawing from the global generators)
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("sharpbench", {})
        self.passes = state.get("passes", 0)
        self.steps_done = state.get("steps_done", 0)
        self.skipped_steps = state.get("skipped_steps", 0)
        self.train_loss_epoch = state.get("train_loss_epoch")
        self._loss_sum, self._loss_count = state.get("epoch_loss", (0.0, 0))
        self._ploss_sum, self._ploss_count = state.get("epoch_loss_perturbed", (0.0, 0))
        self.train_loss_perturbed_epoch = state.get("train_loss_perturbed_epoch")
        self._hits, self._seen = state.get("epoch_hits", (0, 0))
        self._bar_mark = (float(self._loss_sum), self._loss_count)
        self.train_acc_epoch = state.get("train_acc_epoch")
        self.eval_results = dict(state.get("eval_results") or {})
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if state.get("rng_cpu") is not None:
            torch.set_rng_state(state["rng_cpu"])
        if state.get("rng_cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])


def all_reduce_mean(grads: list[Tensor]) -> None:
    """Average gradients across processes in place (one flat all-reduce)."""
    import torch.distributed as dist
    if not grads or not (dist.is_available() and dist.is_initialized()):
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n

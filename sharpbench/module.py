"""The Lightning module: a thin driver of any optimizer in ``sharpbench.optim``.

One ``training_step`` serves one-pass optimizers (SGD, Adam, HATAM …) and multi-pass ones (SAM and
its family) alike. It builds the closure the optimizer calls as often as it needs; the closure

- counts forward/backward passes (``passes_per_step`` in metrics.json is measured, not assumed),
- runs under autocast (bf16 or fp16) and, for fp16, scales the loss and unscales the gradients
  after *every* pass (``sharpbench.amp``), so the optimizer only ever sees true gradients,
- lets only the first pass of a step update BatchNorm running statistics (``optimizer.bn_policy``
  selects the conventions of public implementations instead: ``sharpbench.optim.bn``).

Extra inputs a method declares in ``extra_inputs`` (SSAM-F's ``fisher_closure``, A²SAM's and
X-SAM's ``loss_closure``) and ImbSAM's head/tail ``closure(part)`` are supplied here; the module
knows nothing else about any particular method.

DDP: gradients are averaged by ``grad_reducer`` (an all-reduce) right before the base step, and
the perturbation uses each device's own gradient unless ``sync_perturbation`` is set.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any, Mapping

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .amp import DynamicLossScaler
from .optim.base import SharpnessAwareOptimizer
from .optim.bn import bn_policy_closure, check_bn_policy, frozen_bn_stats
from .optim.fisher import check_fisher_options, fisher_terms
from .optim.factory import build_optimizer
from .schedule import build_scheduler

PRECISIONS = {"32": None, "32-true": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


class DivergenceError(RuntimeError):
    """The training loss became inf/NaN."""


class SharpnessModule(L.LightningModule):
    """``model`` is a built network, or ``None`` with ``model_cfg`` (``{"name", "num_classes",
    **constructor kwargs}`` for :func:`sharpbench.models.build_model`) to build it here. Every
    argument but ``model`` and ``class_counts`` is saved in the checkpoint's hyperparameters, so
    with ``model_cfg`` given ``SharpnessModule.load_from_checkpoint(path)`` rebuilds the module;
    ``run_config`` (the run's resolved config) travels with it for ``sharpbench eval``."""

    def __init__(self, model: nn.Module | None = None, optimizer_cfg: Mapping[str, Any] | None = None,
                 schedule_cfg: Mapping[str, Any] | None = None, *, num_classes: int, epochs: int,
                 precision: str = "32", label_smoothing: float = 0.0, grad_clip: float = 0.0,
                 class_counts: Tensor | None = None, fisher_batch_size: int = 64,
                 sync_perturbation: bool = False, compile: bool = False,
                 model_cfg: Mapping[str, Any] | None = None,
                 run_config: Mapping[str, Any] | None = None):
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
        self.fisher_batch_size = fisher_batch_size
        self.bn_policy = check_bn_policy(self.optimizer_cfg.get("bn_policy") or "first_pass")
        self.fisher_estimator = self.optimizer_cfg.get("fisher_estimator") or "per_sample"
        self.fisher_bn = self.optimizer_cfg.get("fisher_bn") or "eval"
        self.fisher_method = self.optimizer_cfg.get("fisher_method") or "vmap"
        check_fisher_options(self.fisher_estimator, self.fisher_bn, fisher_batch_size,
                             self.fisher_method)
        self.sync_perturbation = sync_perturbation
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
        self.train_acc_epoch: float | None = None   # training accuracy (%) of the last epoch
        self._first_bad: Tensor | None = None
        self._tail_mask: Tensor | None = None
        self._loss_sum: Tensor | float = 0.0
        self._loss_count = 0
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
        from .run_logging import dense_log_interval
        # Short epochs are logged at (nearly) every step, so every run has a loss curve.
        self.trainer.log_every_n_steps = dense_log_interval(self.trainer.log_every_n_steps,
                                                            self.steps_per_epoch())
        opt = self.optimizers(use_pl_optimizer=False)
        if isinstance(opt, SharpnessAwareOptimizer):
            opt.before_base_step = self._before_base_step
        ddp = self.trainer.model
        if isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
            # We average gradients ourselves, once, right before the base step: DDP's own
            # bucketed all-reduce would fire on every pass, perturbation included.
            ddp.require_backward_grad_sync = False
            if isinstance(opt, SharpnessAwareOptimizer):
                opt.grad_reducer = all_reduce_mean
                opt.reduce_perturbation_grads = self.sync_perturbation

    # ---------------------------------------------------------------------------- training
    def forward(self, x: Tensor) -> Tensor:
        return self._forward(x)

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def training_loss(self, logits: Tensor, y: Tensor, part: str | None = None) -> Tensor:
        if part is None:
            return F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)
        from .optim.imbalanced import split_loss
        per_sample = F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing,
                                     reduction="none")
        return split_loss(per_sample, y, self.tail_mask, part)

    def backward_pass(self, loss: Tensor) -> None:
        if self.scaler is None:
            loss.backward()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(list(self.model.parameters()))

    def make_closure(self, opt: torch.optim.Optimizer, x: Tensor, y: Tensor):
        first = [True]

        def closure(part: str | None = None) -> Tensor:
            self.passes += 1
            opt.zero_grad(set_to_none=True)
            with self.autocast():
                logits = self(x)
            if first[0]:  # training accuracy: the first pass of a step, at the weights it starts from
                first[0] = False
                self._hits = self._hits + (logits.detach().argmax(1) == y).sum()
                self._seen += int(y.shape[0])
            loss = self.training_loss(logits, y, part)
            self.backward_pass(loss)
            return loss.detach()
        return bn_policy_closure(self.model, closure, self.bn_policy)

    def make_extra_inputs(self, opt: torch.optim.Optimizer, x: Tensor, y: Tensor,
                          batch_idx: int | None = None) -> dict:
        extras = {}
        for name in getattr(opt, "extra_inputs", ()):
            if name == "loss_closure":
                extras[name] = self._loss_closure(x, y, getattr(opt, "hessian_loss", "train"))
            elif name == "batch_idx":  # X-SAM's per-epoch refresh schedule
                extras[name] = batch_idx
            elif name == "fisher_closure":
                extras[name] = self._fisher_closure(opt)
            else:
                raise TypeError(f"{type(opt).__name__} asks for an input the module does not "
                                f"know how to supply: {name!r}")
        return extras

    def _loss_closure(self, x: Tensor, y: Tensor, kind: str = "train"):
        """Loss with graph at the current weights, for Hessian-vector products. Always fp32 (outside
        autocast): fp16 double backward through BatchNorm overflows to NaN. ``kind="train"``: the
        objective being trained (train-mode BN with running statistics frozen, label smoothing);
        ``"eval_ce"``: plain cross-entropy with the model in eval mode (X-SAM's authors)."""
        def loss_closure() -> Tensor:
            self.passes += 1
            with torch.autocast(self.device.type, enabled=False):
                if kind == "eval_ce":
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

    def _fisher_closure(self, opt: torch.optim.Optimizer):
        """Each call: SSAM-F's Fisher terms (``sharpbench.optim.fisher.fisher_terms``: squared
        per-sample NLL gradients by default) over the next ``fisher_batch_size`` training samples,
        un-augmented, BatchNorm per ``fisher_bn``. Draws from a dedicated, seeded stream."""
        data = self.trainer.datamodule
        gen = torch.Generator().manual_seed(10_007 * (self.global_step + 1) + 17)
        params = opt.all_params()

        def fisher_closure():
            self.passes += 1
            idx = torch.randint(len(data.train_y), (self.fisher_batch_size,), generator=gen)
            x, y = data.fisher_batch(idx, self.device)
            return fisher_terms(self.model, params, x, y, estimator=self.fisher_estimator,
                                batch_size=self.fisher_batch_size, bn=self.fisher_bn,
                                method=self.fisher_method)
        return fisher_closure

    def _before_base_step(self) -> bool:
        if self.grad_clip and self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip, foreach=True)
        if self.scaler is not None:
            return self.scaler.step_is_finite()
        return True

    def training_step(self, batch, batch_idx: int) -> Tensor:
        x, y = batch
        loader = self.trainer.train_dataloader
        if hasattr(loader, "mark_consumed"):  # checkpoints record the batches used, not prefetched
            loader.mark_consumed(self.current_epoch, batch_idx + 1)
        opt = self.optimizers(use_pl_optimizer=False)
        lr = opt.param_groups[0]["lr"]  # the learning rate this step uses
        closure = self.make_closure(opt, x, y)
        self.input_shape = tuple(x.shape)  # for the FLOP count of a pass (record.py)
        if isinstance(opt, SharpnessAwareOptimizer):
            loss = opt.step(closure, **self.make_extra_inputs(opt, x, y, batch_idx))
        else:  # one-pass optimizers: SGD, Adam, HATAM …
            loss = closure()
            if self.trainer.world_size > 1:
                all_reduce_mean([p.grad for p in self.model.parameters() if p.grad is not None])
            if self._before_base_step():
                opt.step()
        if self.scaler is not None and not self.scaler.update():
            self.skipped_steps += 1
        self.lr_schedulers().step()
        self.steps_done += 1
        self.count_optimizer_step()
        self.watch_divergence(loss)
        perturbed = getattr(opt, "last_loss_is_perturbed", None)
        if not perturbed:  # the epoch's train loss: at the unperturbed weights only
            self._loss_sum = self._loss_sum + loss.double()
            self._loss_count += 1
        if self.trainer._logger_connector.should_update_logs:
            self.log_step_values(opt, lr, loss, perturbed)
        return loss

    def log_step_values(self, opt: torch.optim.Optimizer, lr: float, loss: Tensor,
                        perturbed: bool | None) -> None:
        """At logging steps only: Lightning's ``self.log`` costs about a millisecond of Python per
        call, a visible share of a small model's step, and the logger writes step values only
        at these steps anyway (the epoch mean is logged from our own sum at epoch end). Logged:
        the step's loss (``train/loss_step``, at the unperturbed weights), the learning rate, rho
        where a schedule moves it (GSAM's ``rho_t``), the passes counted so far, and the progress
        bar's ``loss`` = mean training loss since its last update (the logger reads values back
        here anyway, so this adds no host sync)."""
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
        group = opt.param_groups[0]
        self.log("train/lr", float(lr), on_step=True, on_epoch=False)
        if "rho_t" in group:
            self.log("train/rho", float(group["rho_t"]), on_step=True, on_epoch=False)
        self.log("train/passes", float(self.passes), on_step=True, on_epoch=False)
        total, count = float(self._loss_sum), self._loss_count
        last_total, last_count = self._bar_mark
        if count > last_count:
            self.log("loss", (total - last_total) / (count - last_count), prog_bar=True,
                     logger=False, on_step=True, on_epoch=False)
        self._bar_mark = (total, count)

    def count_optimizer_step(self) -> None:
        """We step the raw optimizer (Lightning's wrapper would call the closure its own way), so
        tell Lightning a step was taken: ``global_step`` counts one per batch, and step-based
        logging and checkpointing follow it."""
        progress = self.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
        progress.increment_ready()
        progress.increment_completed()

    # ------------------------------------------------------------------ divergence watch
    def on_train_epoch_start(self) -> None:
        # (Lightning does not call this hook when it resumes mid-epoch: the sums are restored.)
        self._first_bad = None
        self._loss_sum, self._loss_count, self._hits, self._seen = 0.0, 0, 0, 0
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

    @property
    def tail_mask(self) -> Tensor:
        """Per-class tail flags for ImbSAM's head/tail closure (built once, then reused)."""
        if self._tail_mask is None:
            from .optim.imbalanced import tail_class_mask
            if self.class_counts.numel() == 0:
                raise ValueError("ImbSAM needs the training class counts; the data module "
                                 "provides them as train_class_counts")
            opt = self.optimizers(use_pl_optimizer=False)
            self._tail_mask = tail_class_mask(self.class_counts, opt.class_threshold).to(self.device)
        return self._tail_mask


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

"""X-SAM: SAM with the gradient corrected along the top Hessian eigenvector."""
from __future__ import annotations

from dataclasses import dataclass

import functools

from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ..curvature import HessianOperator, block_lanczos, params_to_vector, power_iteration
from .base import (FlatBuffer, HessianCounters, flat_buffer, flat_state, global_grad_norm,
                   new_flat_state, require_closure)
from .eigen_record import EigenSolveRecord
from .sam import SAM
from .context import StepContext
from .registry import register_method
from ..typed_config import key
from .step_config import ScheduleKeys, SGDStep, rho_key

LossClosure = Callable[[], Tensor]


@dataclass
class XSAMConfig(SGDStep, ScheduleKeys):
    """Duan et al. 2026: alpha 0.2 (ours too); their freq 3-5 with 5 power iterations costs 4.1 SGD
    steps per step, so ours refresh every 60 steps by Lanczos from the previous eigenvector to a
    residual of 0.05 (about 2.2; docs/methods.md). The paper's setting: freq=5 power_iters=5
    solver=power tol=null. The authors' code (github.com/huang5467/X-SAM) differs in four more
    places; each is a switch."""
    rho: float = rho_key(0.05)
    alpha: float = key(0.2, "X-SAM: fraction of the perturbed gradient's component along the top "
                            "eigenvector removed", spec="float >= 0")
    freq: int = key(60, "X-SAM: steps between refreshes of the top Hessian eigenvector",
                    spec="int >= 1")
    power_iters: int = key(20, "X-SAM: Hessian-vector products per refresh (with tol: the cap)",
                           spec="int >= 1")
    solver: str = key("lanczos", "X-SAM: power iteration (the paper's) or Lanczos from the previous "
                               "eigenvector (lanczos)", spec="power | lanczos")
    tol: Optional[float] = key(0.05, "X-SAM: stop the solve once ||Hv - lambda v|| <= tol |lambda| "
                                     "(null: always power_iters products)",
                               spec="null | float > 0")
    correction: str = key("projection", "X-SAM: remove alpha (g.v) v (projection, sign-invariant) "
                                        "or alpha |g.v| v (sign: the authors' code)",
                          spec="projection | sign")
    normalize_gradient: bool = key(False, "X-SAM: normalise the SAM gradient before the eigenvector "
                                          "correction and base step (the authors' code)",
                                   spec="bool")
    hessian_loss: str = key("train", "X-SAM: Hessian of the training loss (train-mode BN, label "
                                     "smoothing) or of plain cross-entropy in eval mode (eval_ce: "
                                     "the authors' code)", spec="train | eval_ce")
    refresh_schedule: str = key("global", "X-SAM: refresh at steps 0, freq, 2 freq, ... or every "
                                          "freq batches within each epoch (per_epoch: the authors' "
                                          "code)", spec="global | per_epoch")


@register_method("xsam", label="X-SAM", passes=2, order=90, config=XSAMConfig,
                 needs=("loss_closure", "batch_idx"),
                 claimed_cost="2 plus the amortised power iterations (no figure given)",
                 paper='Duan et al., "Boosting Sharpness-Aware Minimization with '
                       'Dominant-Eigenvector Gradient Correction", 2026')
class XSAM(EigenSolveRecord, HessianCounters, SAM):
    """X-SAM, explicit eigenvector-aligned SAM (Duan et al. 2026, "Boosting Sharpness-Aware
    Minimization with Dominant-Eigenvector Gradient Correction"; authors' code:
    github.com/huang5467/X-SAM). The paper measures sharpness by the angle between the gradient
    and the top Hessian eigenvector and corrects the SAM gradient by an orthogonal decomposition
    along that eigenvector. Not to be confused with another 2026 paper that also calls its method
    "XSAM": this class is the eigenvector-aligned method only.

    Per step ``t``, with ``v`` the top Hessian eigenvector (unit norm), at the defaults::

        if t % freq == 0:  v <- top eigenvector of the Hessian of loss_closure() at w_t, from
                                the previous v (Lanczos to ||Hv − λv|| <= tol·|λ|, at most
                                power_iters HVPs)
        g   = ∇L_B(w)                       closure() at w            (pass 1)
        e   = rho · g / ||g||₂              SAM's perturbation (p = 2)
        g_p = ∇L_B(w + e)                   closure() at w + e        (pass 2)
        w  <- base_step(w, g_p − α·(g_p·v)·v)

    The correction removes the fraction ``α`` of ``g_p``'s component along ``v``. It is
    *sign-invariant*: ``v`` and ``−v`` are the same eigenvector and give the same update.

    The solver (``solver``): ``"lanczos"`` (default) finds the algebraically largest eigenpair by
    Lanczos from the previous ``v`` (``sharpbench.curvature.block_lanczos`` with ``k = 1``), one
    residual check per product, stopped at ``tol``; ``"power"`` (the paper's) runs
    ``power_iters`` power iterations, which find the eigenvalue of largest *magnitude*: at
    initialisation on CIFAR-10 that was a negative one (docs/methods.md), later in training the
    top positive one. ``power_iters`` HVPs apply H ``power_iters`` times (the last product
    advances ``v``; its Rayleigh quotient, ``eigenvalue``, is one step behind); with ``tol`` the
    residual of the result is recorded and judged, but the iteration count is fixed. The first
    solve starts from the gradient at ``w`` (which ``loss_closure`` yields for free; gradients lie
    mostly in the top eigenspace), later ones from the previous ``v``. A solve with a non-finite
    result is discarded (the previous ``v`` stays; none before the first good solve, i.e. plain
    SAM), counted (``num_nonfinite_solves``) and logged: under fp16 a NaN eigenvector would
    otherwise reach the weights, since the correction comes after the loss scaler's overflow
    check. HVPs run outside autocast (fp32). Defaults: ``alpha=0.2`` (the paper's), ``freq=60``,
    ``solver="lanczos"``, ``tol=0.05``, ``power_iters=20`` (the cap), chosen by measurement to
    cost about SAM + 0.2 (docs/methods.md, "What A²SAM and X-SAM cost"); the paper's ``freq``
    3–5 with 5 power iterations is ``freq=5 power_iters=5 solver=power tol=None`` (4.2 SGD steps
    per step).

    Where the authors' code differs, each difference is a switch (defaults: ours):

    - ``correction="sign"``: their correction ``g − α·sign(g·v)·(g·v)·v = g − α·|g·v|·v``. It
      depends on the arbitrary sign of ``v`` that power iteration returns (``−v`` *adds* the
      component), so the update depends on the random start rather than on the landscape; ours
      (``"projection"``) is ``g − α·(g·v)·v``.
    - ``normalize_gradient=True``: their base step takes the normalised gradient: the correction is
      applied to ``ĝ = g_p/||g_p||`` (so the base optimizer sees a vector of norm about 1 and the
      learning rate sets the step length). Ours passes ``g_p`` at its own scale, as SAM does.
    - ``hessian_loss="eval_ce"``: their Hessian is that of the plain cross-entropy with the model
      in eval mode (BatchNorm normalising with its running statistics). Ours (``"train"``) is the
      Hessian of the objective being trained: train-mode BatchNorm (batch statistics, running
      statistics frozen) and the run's label smoothing. At initialisation the two differ a lot
      (running statistics are still their initial values). With a step context the method asks
      for ``context.loss_closure("eval")``; a ``loss_closure`` given by hand is used as it is.
    - ``refresh_schedule="per_epoch"``: their refresh runs at batch ``i`` of every epoch with
      ``i % freq == 0 and i > 0``: the first refresh is at step ``freq`` (the first ``freq`` steps
      are plain SAM), and the count restarts every epoch. This needs the batch index within the
      epoch: ``step(closure, loss_closure, batch_idx=i)`` (or ``context.batch_idx``). Ours (``"global"``) refreshes at global steps ``0, freq, 2·freq, …``.

    Not switchable: their first power iteration starts from a random vector (ours from the
    gradient), and their code does not run as published (the X-SAM branch reads a variable set
    only under another name).

    Extra input: ``step(closure, loss_closure)`` (or ``context.loss_closure``) where
    ``loss_closure()`` returns the scalar loss on the current batch at the current (unperturbed)
    weights with its graph and without calling ``backward``; it is called only on refresh steps,
    before ``closure``, and must not update BatchNorm running statistics (wrap it in
    ``frozen_bn_stats``); it should not run under fp16 autocast and must return the unscaled loss.

    Cost: 2 closure calls per step, plus per refresh one ``loss_closure`` call (forward and a
    backward with ``create_graph``: 1.0 training pass in FLOPs on ResNet-18) and ``power_iters``
    ``n`` HVPs (2.04 passes each): ``2 + (1 + 2.04·n)/freq``, about 2.25 at the defaults
    (``n`` ≈ 3–7 on ResNet-18 / CIFAR-10), 4.2 at the paper's setting. metrics.json reports the
    measured ``cost_per_step`` and every solve (``eigen_refreshes``). Host synchronisation on
    refresh steps: one device→host read per product (Lanczos: its residual check) or one per
    solve (power iteration: the finiteness flag and the residual, together); none on other
    steps. ``step`` returns the loss of the first closure call (at ``w``), as SAM.

    Counters (python ints, saved in ``state_dict``): ``num_closure_calls``, ``num_hvps``,
    ``num_loss_closure_calls``, ``num_eigen_solves`` and ``passes``, their sum (an HVP counted as
    one pass), and the eigen-solve record (``EigenSolveRecord``). State: ``v`` (per parameter,
    ``state[p]["eigvec"]``), its Rayleigh quotient ``eigenvalue`` and the step counter; a resumed
    optimizer takes the identical next step. ``alpha``, ``freq``, ``power_iters`` and the switches
    are global attributes; ``rho`` is per group.
    """

    passes_per_step: float = 2.0
    # its eigenvector comes from the whole batch; per-chunk perturbations would not equal DDP's
    takes_m = False
    CORRECTIONS = ("projection", "sign")
    HESSIAN_LOSSES = ("train", "eval_ce")
    REFRESH_SCHEDULES = ("global", "per_epoch")
    SOLVERS = ("power", "lanczos")

    def __init__(self, params, base_optimizer=torch.optim.SGD, rho: float = 0.05,
                 alpha: float = 0.2, freq: int = 60, power_iters: int = 20,
                 correction: str = "projection", normalize_gradient: bool = False,
                 hessian_loss: str = "train", refresh_schedule: str = "global",
                 solver: str = "lanczos", tol: float | None = 0.05, **base_kwargs):
        if int(freq) < 1 or int(power_iters) < 1:
            raise ValueError(f"XSAM needs freq >= 1 and power_iters >= 1, got {freq}, {power_iters}")
        for name, value, allowed in (("correction", correction, self.CORRECTIONS),
                                     ("hessian_loss", hessian_loss, self.HESSIAN_LOSSES),
                                     ("refresh_schedule", refresh_schedule, self.REFRESH_SCHEDULES),
                                     ("solver", solver, self.SOLVERS)):
            if value not in allowed:
                raise ValueError(f"XSAM's {name} must be one of {allowed}, got {value!r}")
        self.alpha, self.freq, self.power_iters = float(alpha), int(freq), int(power_iters)
        self.correction, self.normalize_gradient = correction, bool(normalize_gradient)
        if tol is not None and not tol > 0:
            raise ValueError(f"XSAM's tol must be > 0 (a relative residual) or None, got {tol}")
        self.hessian_loss, self.refresh_schedule = hessian_loss, refresh_schedule
        self.solver, self.tol = solver, (None if tol is None else float(tol))
        super().__init__(params, base_optimizer, rho=rho, p=2.0, **base_kwargs)
        self.method_state.update(step=0, eigval=None)
        self.init_counters()
        self.init_solve_record()

    @property
    def eigen_tol(self) -> float | None:
        return self.tol

    @property
    def eigenvalue(self) -> Tensor | None:
        """Rayleigh quotient of the current ``v`` (its top-eigenvalue estimate)."""
        return self.method_state["eigval"]

    def is_refresh_step(self, batch_idx: int | None = None) -> bool:
        if self.refresh_schedule == "global":
            return self.method_state["step"] % self.freq == 0
        if batch_idx is None:
            raise ValueError("XSAM with refresh_schedule='per_epoch' needs the batch index within "
                             "the epoch: opt.step(closure, loss_closure=..., batch_idx=i)")
        return batch_idx % self.freq == 0 and batch_idx > 0

    @torch.no_grad()
    def _refresh_eigenvector(self, loss_closure: LossClosure | None) -> None:
        if loss_closure is None:
            raise ValueError(
                "XSAM.step() needs loss_closure on refresh steps: a function returning the loss on "
                "the current batch at the current weights, with its graph and without backward — "
                "opt.step(closure, loss_closure=lambda: loss_fn(model(x), y))")
        params = self._params()
        device = params[0].device
        with torch.enable_grad(), torch.autocast(device.type, enabled=False):
            loss = loss_closure()
            self.method_state["num_loss_closure_calls"] += 1
            op = HessianOperator(loss, params)
            previous = flat_state(self.state, self._buffers, "eigvec", params)
            if previous is not None:
                init = previous.flat.clone()
            elif "eigvec" in self.state[params[0]]:
                init = params_to_vector([self.state[p].get("eigvec") for p in params], like=params)
            else:
                init = op.gradient  # zero or non-finite: power_iteration starts at random
            generator = torch.Generator(device=device).manual_seed(int(self.method_state["step"]))
            if self.solver == "lanczos":
                lam, V, info = block_lanczos(op.matvec, op.dim, 1, max_matvecs=self.power_iters,
                                             init=init, generator=generator, tol=self.tol,
                                             return_info=True)
                lam, v = lam[0], V[:, 0]
            else:
                lam, v, info = power_iteration(op.matvec, op.dim, iters=self.power_iters, init=init,
                                               generator=generator, tol=None, return_info=True)
                if self.tol is not None:
                    info.converged = info.residuals[0] <= self.tol
        self.method_state["num_hvps"] += op.num_hvps
        self.method_state["num_eigen_solves"] += 1
        if not self.record_solve(info, "power iteration" if self.solver == "power" else "Lanczos solve"):
            return
        self.method_state["eigval"] = lam.detach()
        buf = flat_state(self.state, self._buffers, "eigvec", params)
        if buf is None or buf.flat.shape != v.shape or buf.flat.dtype != v.dtype:
            buf = new_flat_state(self.state, self._buffers, "eigvec", params)
        buf.flat.copy_(v.detach())

    @torch.no_grad()
    def correct_gradient(self) -> None:
        """On the current ``.grad`` in place (global dots, no host sync): optionally normalise
        (``g <- g/||g||``), then ``g <- g − α·c·v`` with ``c = g·v`` (``"projection"``) or
        ``c = |g·v|`` (``"sign"``). ``v`` is kept flat and ``g`` is copied into a flat buffer, so
        ``g·v`` is one dot product and the update one foreach op, whatever the number of tensors."""
        params = [p for p in self._params() if p.grad is not None]
        if not params:
            return
        grads = [p.grad for p in params]
        if self.normalize_gradient:
            torch._foreach_mul_(grads, 1.0 / (global_grad_norm(grads, 2.0) + 1e-12))
        if self.alpha == 0:
            return
        v = flat_state(self.state, self._buffers, "eigvec", params)
        if v is not None and FlatBuffer.fits(grads) and grads[0].dtype == v.flat.dtype:
            dot = torch.dot(flat_buffer(self._buffers, "grad", grads).load(grads).flat, v.flat)
            vs = v.views
        else:  # no eigenvector yet for some tensor (plain SAM there), or mixed dtypes
            keep = [i for i, p in enumerate(params) if "eigvec" in self.state[p]]
            if not keep:
                return
            grads = [grads[i] for i in keep]
            vs = [self.state[params[i]]["eigvec"] for i in keep]
            dot = torch.stack([torch.dot(g.reshape(-1), e.reshape(-1)) for g, e in zip(grads, vs)]).sum()
        if self.correction == "sign":
            dot = dot.abs()
        torch._foreach_add_(grads, torch._foreach_mul(vs, -self.alpha * dot))

    def gradient_correction(self) -> None:
        self.correct_gradient()

    @torch.no_grad()
    def sharpness_step(self, closure=None, loss_closure: LossClosure | None = None,
             batch_idx: int | None = None, context: StepContext | None = None) -> Tensor:
        closure = require_closure(closure, type(self).__name__)
        if context is not None:
            if batch_idx is None:
                batch_idx = context.batch_idx
            if loss_closure is None and context.loss_closure is not None:
                mode = "eval" if self.hessian_loss == "eval_ce" else "train"
                loss_closure = functools.partial(context.loss_closure, mode)
        if self.is_refresh_step(batch_idx):
            self._refresh_eigenvector(loss_closure)

        def counted() -> Tensor:
            self.method_state["num_closure_calls"] += 1
            return closure()

        loss = super().sharpness_step(counted, context)  # SAM's two passes, then correct_gradient(), then the base step
        self.method_state["step"] += 1
        return loss

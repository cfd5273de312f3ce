"""A²SAM: amortised anisotropic SAM with a low-rank-Hessian ellipsoid and a stale gradient."""
from __future__ import annotations

from dataclasses import dataclass

from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from ..curvature import HessianOperator, block_lanczos, lanczos
from .base import (FlatBuffer, HessianCounters, SharpnessAwareOptimizer, bind_views,
                   check_positive, flat_buffer, flat_state, new_flat_state, require_closure,
                   scaled)
from .context import StepContext
from .eigen_record import EigenSolveRecord
from .sam import lp_ball_argmax
from .registry import register_method
from ..typed_config import key
from .step_config import ScheduleKeys, SGDStep, rho_key

LossClosure = Callable[[], Tensor]


def ellipsoid_inverse_apply(g: Tensor | Sequence[Tensor], V: Tensor | Sequence[Tensor],
                            lam: Tensor, alpha: float) -> Tensor | list[Tensor]:
    """``(I + α·V diag(λ) Vᵀ)⁻¹ g`` by the Woodbury identity, for orthonormal columns of ``V``::

        (I + α V Λ Vᵀ)⁻¹ = I − V · diag(αλ / (1 + αλ)) · Vᵀ

    Costs two thin products (``Vᵀg`` and ``V·s``); no d×d matrix is ever formed. ``λ`` is clamped
    at 0 first (so ``1 + αλ >= 1`` and the matrix is positive definite).

    Either flat: ``g`` [d], ``V`` [d, k] → [d]; or per parameter tensor: ``g`` a list of tensors,
    ``V`` a list of [numel_i, k] row blocks of the same V (the product over all blocks together).
    """
    single = isinstance(g, Tensor)
    gs = [g] if single else list(g)
    Vs = [V] if single else list(V)
    if len(gs) != len(Vs):
        raise ValueError(f"got {len(gs)} gradient tensors but {len(Vs)} eigenvector blocks")
    lam = lam.detach().clamp(min=0)
    shrink = alpha * lam / (1 + alpha * lam)                              # [k]
    k = lam.numel()
    coeff = sum(Vb.reshape(-1, k).T @ gb.reshape(-1) for gb, Vb in zip(gs, Vs))  # Vᵀg, [k]
    s = (shrink * coeff).to(gs[0].dtype)
    out = [gb - (Vb.reshape(-1, k) @ s).view_as(gb) for gb, Vb in zip(gs, Vs)]
    return out[0] if single else out


@dataclass
class A2SAMConfig(SGDStep, ScheduleKeys):
    """The source gives no values: these are ours, chosen by measurement on ResNet-18 / CIFAR-10
    (docs/methods.md, "What A²SAM and X-SAM cost"). Cost in FLOPs (an HVP is 2.04 passes on
    ResNet-18, the Hessian's graph 1.0): 1 + (1 + 2.04 n)/interval SGD steps per step, n the HVPs
    a warm solve needs (about 8 for k = 2 at tol 0.05, 1.2 in all)."""
    rho: float = rho_key(0.05)
    alpha: float = key(0.1, "A2SAM: anisotropy, A = I + alpha * V Lambda V^T (0: the sphere, no "
                            "eigen-solve at all)", spec="float >= 0")
    alpha_mode: str = key("absolute", "A2SAM: alpha as given, or relative to the top eigenvalue "
                                      "(alpha / lambda_max: scale-free)", spec="absolute | relative")
    k: int = key(2, "A2SAM: top Hessian eigenpairs shaping the ellipsoid", spec="int >= 1")
    interval: int = key(100, "A2SAM: steps between eigen-solves", spec="int >= 1")
    lanczos_tol: Optional[float] = key(0.05, "A2SAM: stop Lanczos when every Ritz residual is at "
                                             "most tol * |lambda| (0/null: always lanczos_iters)",
                                       spec="null | float >= 0")
    lanczos_iters: int = key(40, "A2SAM: cap on Lanczos iterations (Hessian-vector products) per "
                                 "eigen-solve; lanczos_tol may stop it earlier", spec="int >= 1")
    lanczos_check_every: int = key(1, "A2SAM: iterations between residual checks of the "
                                      "single-vector solver (one host read each; the block solver "
                                      "checks after every block)", spec="int >= 1")
    solver: str = key("lanczos", "A2SAM: block Lanczos warm-started from the previous eigenvectors "
                               "(block), or single-vector Lanczos from the gradient plus their sum "
                               "(lanczos)", spec="block | lanczos")
    stale_gradient: bool = key(True, "A2SAM: perturb with the previous step's gradient (1 pass per "
                                     "step) or a fresh one (false: 2 passes, like SAM)", spec="bool")


@register_method("a2sam", label="A²SAM", passes=1, order=70, needs=("loss_closure",), config=A2SAMConfig,
                 claimed_cost="(interval + k)/interval ≈ 1.1–1.25",
                 paper='"A²SAM: Accelerated Anisotropic Sharpness-Aware Minimization", an '
                       'unpublished method description (specified in docs/methods.md)')
class A2SAM(EigenSolveRecord, HessianCounters, SharpnessAwareOptimizer):
    """A²SAM, "Accelerated Anisotropic Sharpness-Aware Minimization" (DeepThinker-X Research
    Unit; a method proposal with no published code or experiments, described in Russian). What
    it specifies is restated here; the choices it leaves open are marked as ours.

    The neighbourhood is the ellipsoid ``eᵀ(I + α·V Λ Vᵀ)e <= rho²`` with ``(Λ, V)`` the top-``k``
    Hessian eigenpairs (negative eigenvalues clamped to 0): the ellipsoid is compressed along the
    sharpest directions. With ``A = I + α·V Λ Vᵀ`` the maximiser of ``eᵀg`` over it is::

        e = rho · A⁻¹g / sqrt(gᵀA⁻¹g),     A⁻¹ = I − V·diag(αλ/(1+αλ))·Vᵀ   (Woodbury)

    so ``eᵀAe = rho²`` and ``||e|| <= rho``. Per step ``t`` (defaults: ``stale_gradient=True``)::

        if t % interval == 0:  (Λ, V) <- Lanczos on HVPs of loss_closure() at w_t   (amortised)
        g   = g_stale                          the gradient of step t-1, at its perturbed point
        e   = rho · A⁻¹g / sqrt(gᵀA⁻¹g)
        g_p = ∇L_B(w_t + e)                    closure() at w_t + e        (the only pass)
        w  <- base_step(w_t, g_p);   g_stale <- g_p

    Step 0 has no stale gradient: it is a plain SAM step (``e = rho·g/||g||``, two closure calls).
    The stale gradient is the perturbed-point gradient as the closure left it, before the base
    step reduces it across devices (each device perturbs with its own gradient); a skipped base
    step (fp16 overflow) keeps the previous stale gradient. ``rho`` is per parameter group (the
    norms are global); the other hyperparameters are global attributes (the parameter groups are
    shared with the base optimizer, whose RMSprop groups already have an ``alpha``).

    Switches (ablations; each separates one ingredient of the method):

    - ``stale_gradient=False``: the fresh-gradient variant. Every step computes ``g = ∇L_B(w_t)``
      first (closure at ``w_t``) and perturbs with it: 2 closure calls per step, like SAM, so only
      the ellipsoid differs from SAM.
    - ``alpha=0``: the sphere (``A = I``). No eigen-solve is ever run and ``loss_closure`` is not
      needed; with the stale gradient this is "SAM with last step's gradient", so that the
      ellipsoid's effect and the stale gradient's can be measured apart.
    - ``alpha_mode="relative"``: α is scale-free, relative to the top eigenvalue of the current
      solve: ``A = I + α·V (Λ/λ_max) Vᵀ``, so the ellipsoid's semi-axis along the sharpest
      direction is ``rho/sqrt(1 + α)`` whatever the scale of the loss (``α = 3`` halves it).
      With the default ``"absolute"``, ``A = I + α·V Λ Vᵀ`` as the method states it: the
      compression depends on the Hessian's scale (with λ_max ≈ 40, α = 0.1 shrinks the top axis
      by 1/sqrt(5)).

    Eigen-solve (``solver``), stopped once every one of the top ``k`` Ritz pairs has
    ``‖Hv − λv‖ <= lanczos_tol·|λ|`` and after ``lanczos_iters`` HVPs at the latest
    (``lanczos_tol=0`` or ``None``: always ``lanczos_iters``), both warm-started from the previous
    solve's eigenvectors (the first solve is cold):

    - ``"lanczos"`` (default): single-vector Lanczos with full reorthogonalisation from
      ``ĝ_w + Σ_i v_i`` (the normalised gradient at ``w``, which ``loss_closure`` yields for free,
      plus the previous eigenvectors), residuals checked every ``lanczos_check_every`` iterations
      from the tridiagonal matrix (no extra HVP);
    - ``"block"``: block Lanczos from the previous ``V`` (``sharpbench.curvature.block_lanczos``),
      a check after every block of ``k`` HVPs. A warm start that is already accurate converges in
      one block; on ResNet-18 / CIFAR-10 it needed more HVPs than the single-vector solver at every
      refresh measured (docs/methods.md, "What A²SAM and X-SAM cost"), so it is the alternative.

    A solve that returns a non-finite value is discarded: the previous ``(Λ, V)`` stay (the sphere
    before the first good solve), and the event is counted (``num_nonfinite_solves``) and logged.
    HVPs run outside autocast (fp32): fp16 double backward through BatchNorm overflows. Every
    solve's HVPs, largest residual and whether it met the tolerance go to metrics.json
    (``eigen_refreshes``, ``eigen_residual_max``; ``EigenSolveRecord``).

    Host synchronisation: none on ordinary steps; on a refresh step one device→host read per
    residual check (the α/β coefficients, or the block's column of ``T``: one transfer; the small
    projected problem is solved on the host), so ``ceil(iterations / lanczos_check_every)`` reads
    per refresh, or one per block (``refresh_host_syncs_last``, ``num_host_syncs``). A read costs
    little beside the HVP before it.

    Cost. Counted in FLOPs (``torch.utils.flop_counter``) on ResNet-18 / CIFAR, a
    Hessian-vector product costs 2.04 training passes (forward + backward) and the Hessian's
    graph (``loss_closure`` + the gradient with ``create_graph``) 1.0, so a run averages
    ``1 + (1 + 2.04·n)/interval`` SGD steps per step (plus 1 on step 0), ``n`` the HVPs a solve
    needs. Warm solves on ResNet-18 / CIFAR-10 needed ``n`` = 8–13 for the defaults (``k = 2``,
    tol 0.05): about 1.2. The source's claim, ``(interval + k)/interval`` (≈ 1.1 at
    ``interval=50, k=5``), counts one pass per eigenpair; an eigenpair costs at least one HVP plus
    its share of the graph, so even ``n = k`` gives 1.22 there, and the measured ``n`` for five
    pairs (12–28) gives 1.5–1.8 (docs/methods.md, "What A²SAM and X-SAM cost"). metrics.json
    reports the measured ``cost_per_step`` with every HVP at its FLOP price.

    BatchNorm: after step 0 (stale variant) the only closure call is at ``w + e``, so that pass
    (the first, which ``first_pass_updates_bn`` lets update the running statistics) updates them
    from the batch statistics at the perturbed weights (``||e|| <= rho``); there is no pass at
    ``w`` to take them from without paying for one. Drive this optimizer through ``step``:
    ``first_step`` / ``second_step`` exist (``perturbation()`` uses the stale gradient) but a
    driver that computes the gradient at ``w`` first wastes that pass.

    Extra input: ``step(closure, loss_closure)`` (or ``context.loss_closure``, see
    ``sharpbench.optim.context``) where ``loss_closure()`` returns the scalar loss on the current batch at the current (unperturbed)
    weights *with its graph* and does not call ``backward``. It is called only on refresh steps,
    before ``closure``; it must not update BatchNorm running statistics (wrap it in
    ``frozen_bn_stats``), should not run under fp16 autocast, and must return the unscaled loss.

    The loss ``step`` returns: the loss at the unperturbed ``w`` when the step has one (step 0,
    every step of the fresh-gradient variant, and refresh steps, from ``loss_closure``); on the
    other, one-pass steps only ``L_B(w + e)`` exists and is returned, with
    ``last_loss_is_perturbed = True`` (and ``context.loss_is_perturbed``). The Lightning module logs the two under different names
    (``train/loss`` and ``train/loss_perturbed``), so curves compare like with like.

    Counters (python ints, saved in ``state_dict``): ``num_closure_calls``,
    ``num_loss_closure_calls``, ``num_hvps``, ``num_eigen_solves``; ``passes`` is their sum
    (an HVP counted as one; for the true cost see ``cost_per_step`` in metrics.json). Optimizer
    state (restored by ``load_state_dict``, so a resumed optimizer takes the identical next
    step): per parameter the stale gradient and its rows of ``V``; globally ``Λ``, the step
    counter and the eigen-solve record (see ``EigenSolveRecord``).

    Defaults (the source gives no values): ``rho=0.05`` (SAM's), ``alpha=0.1`` (untuned),
    ``k=2``, ``interval=100``, ``solver="lanczos"``, ``lanczos_tol=0.05``, ``lanczos_iters=40``
    (the cap), ``lanczos_check_every=1``: the cheapest measured setting whose every solve met its
    tolerance at about 1.2 SGD steps per step.
    """

    passes_per_step: float = 1.0  # closure calls per step after step 0 (see ``passes``)
    ALPHA_MODES = ("absolute", "relative")
    SOLVERS = ("block", "lanczos")

    def __init__(self, params, base_optimizer=torch.optim.SGD, rho: float = 0.05,
                 alpha: float = 0.1, k: int = 2, interval: int = 100, lanczos_iters: int = 40,
                 lanczos_tol: float | None = 0.05, lanczos_check_every: int = 1,
                 stale_gradient: bool = True, alpha_mode: str = "absolute", solver: str = "lanczos",
                 **base_kwargs):
        check_positive("rho", rho)
        if alpha < 0:
            raise ValueError(f"A2SAM's alpha must be >= 0 (0: the sphere, no eigen-solve), got {alpha}")
        if int(k) < 1 or int(interval) < 1:
            raise ValueError(f"A2SAM needs k >= 1 and interval >= 1, got k={k}, interval={interval}")
        if int(lanczos_iters) < int(k):
            raise ValueError(f"lanczos_iters ({lanczos_iters}, the iteration cap) must be >= k ({k})")
        if lanczos_tol is not None and not lanczos_tol >= 0:
            raise ValueError(f"lanczos_tol must be >= 0 (a relative Ritz residual; 0 or None: no "
                             f"tolerance, always run lanczos_iters), got {lanczos_tol}")
        if int(lanczos_check_every) < 1:
            raise ValueError(f"lanczos_check_every must be >= 1, got {lanczos_check_every}")
        if solver not in self.SOLVERS:
            raise ValueError(f"A2SAM's solver must be one of {self.SOLVERS}, got {solver!r}")
        if alpha_mode not in self.ALPHA_MODES:
            raise ValueError(f"alpha_mode must be one of {self.ALPHA_MODES}, got {alpha_mode!r}")
        self.alpha, self.k, self.interval = float(alpha), int(k), int(interval)
        self.lanczos_iters, self.lanczos_check_every = int(lanczos_iters), int(lanczos_check_every)
        self.lanczos_tol = float(lanczos_tol) if lanczos_tol else None
        self.stale_gradient, self.alpha_mode, self.solver = bool(stale_gradient), alpha_mode, solver
        if not self.stale_gradient:
            self.passes_per_step = 2.0
        super().__init__(params, base_optimizer, dict(rho=rho), **base_kwargs)
        self.method_state.update(step=0, eigvals=None)
        self.init_counters()
        self.init_solve_record()
        self.last_loss_is_perturbed = False

    @property
    def eigen_tol(self) -> float | None:
        return self.lanczos_tol

    @property
    def eigenvalues(self) -> Tensor | None:
        """The current top-k eigenvalues (clamped at 0), descending; ``None`` before the first solve."""
        return self.method_state["eigvals"]

    # ------------------------------------------------------------------------------ helpers
    def _has_stale(self) -> bool:
        return any("stale_grad" in self.state[p] for p in self._params())

    @torch.no_grad()
    def _refresh_eigenpairs(self, loss_closure: LossClosure | None) -> Tensor:
        if loss_closure is None:
            raise ValueError(
                "A2SAM.step() needs loss_closure on eigen-solve steps: a function returning the "
                "loss on the current batch at the current weights, with its graph and without "
                "backward — opt.step(closure, loss_closure=lambda: loss_fn(model(x), y)) "
                "(or alpha=0, which runs no eigen-solve)")
        params = self._params()
        device = params[0].device
        with torch.enable_grad(), torch.autocast(device.type, enabled=False):
            loss = loss_closure()
            self.method_state["num_loss_closure_calls"] += 1
            op = HessianOperator(loss, params)
            g = op.gradient / op.gradient.norm().clamp_min(1e-30)
            previous = self._eigvec_matrix(params)
            # a zero or non-finite start is replaced by a random one inside the solver (no sync)
            generator = torch.Generator(device=device).manual_seed(int(self.method_state["step"]))
            if self.solver == "block":
                # warm: the previous eigenvectors; cold (first solve): the gradient, then random
                init = previous if previous is not None else g[:, None]
                lam, V, info = block_lanczos(op.matvec, op.dim, self.k,
                                             max_matvecs=self.lanczos_iters, init=init,
                                             generator=generator, tol=self.lanczos_tol,
                                             return_info=True)
            else:
                init = g + previous.sum(dim=1) if previous is not None else g
                lam, V, info = lanczos(op.matvec, op.dim, self.k, num_iters=self.lanczos_iters,
                                       init=init, generator=generator, tol=self.lanczos_tol,
                                       check_every=self.lanczos_check_every, return_info=True)
        self.method_state["num_hvps"] += op.num_hvps
        self.method_state["num_eigen_solves"] += 1
        if self.record_solve(info, "Lanczos solve"):
            self.method_state["eigvals"] = lam.detach().clamp(min=0)
            matrix = self._eigvec_matrix(params)
            if matrix is None or matrix.shape != V.shape or matrix.dtype != V.dtype:
                blocks = list(V.detach().split([p.numel() for p in params]))
                buf = new_flat_state(self.state, self._buffers, "eigvecs", params, like=blocks)
                matrix = buf.flat.view(V.shape)
            matrix.copy_(V.detach())
        return loss.detach()

    def _eigvec_matrix(self, params: list[Tensor]) -> Tensor | None:
        """``V`` as one [d, k] matrix whose row blocks are ``state[p]["eigvecs"]``; ``None``
        before the first solve."""
        buf = flat_state(self.state, self._buffers, "eigvecs", params)
        return None if buf is None else buf.flat.view(-1, self.k)

    def _ellipsoid_lambdas(self) -> Tensor | None:
        """The eigenvalues that enter ``A``: ``Λ`` (absolute α) or ``Λ/λ_max`` (relative α)."""
        lam = self.method_state["eigvals"]
        if lam is None or self.alpha == 0:
            return None
        if self.alpha_mode == "relative":
            return lam / lam[0].clamp_min(torch.finfo(lam.dtype).tiny)
        return lam

    # ----------------------------------------------------------------------- the perturbation
    @torch.no_grad()
    def perturbation(self) -> dict[Tensor, Tensor]:
        """The ellipsoid's ``e`` from the stale gradient (stale variant) or the current ``.grad``
        (fresh variant); before there is a stale gradient (step 0), SAM's ``e``.

        All parameters' gradients are one flat vector ``g`` (the stale gradient is kept flat;
        the fresh one is copied into a flat buffer), so ``u = A⁻¹g = g − V·(s ⊙ Vᵀg)`` is one
        matrix-vector product each way and ``gᵀu`` one dot product, whatever the number of
        parameter tensors."""
        if self.stale_gradient and not self._has_stale():
            params, rhos = self.params_and_rhos()
            return dict(zip(params, lp_ball_argmax([p.grad for p in params], rhos, 2.0)))
        params, rhos = [], []
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    params.append(p)
                    rhos.append(group["rho"])
        g = self._flat_gradient(params)
        if g is None:
            return self._perturbation_per_tensor(params, rhos)
        lam = self._ellipsoid_lambdas()
        u = g
        if lam is not None:
            V = self._eigvec_matrix(params)
            if V is None or V.shape[0] != g.flat.numel():
                return self._perturbation_per_tensor(params, rhos)
            lam = lam.detach().clamp(min=0)
            shrink = (self.alpha * lam / (1 + self.alpha * lam)).to(g.flat.dtype)      # [k]
            s = shrink * torch.mv(V.t(), g.flat)                                        # s ⊙ Vᵀg
            u = flat_buffer(self._buffers, "u", g.views)
            torch.addmv(g.flat, V, s, alpha=-1, out=u.flat)                            # g − V s
        inv = 1.0 / (torch.dot(g.flat, u.flat).clamp(min=0).sqrt() + 1e-12)
        return dict(zip(params, scaled(u.views, inv, rhos)))

    def _flat_gradient(self, params: list[Tensor]) -> FlatBuffer | None:
        """The gradient the ellipsoid acts on, as one flat buffer (``None``: not every parameter
        has one in a single dtype/device; the per-tensor path handles those cases)."""
        if self.stale_gradient:
            return flat_state(self.state, self._buffers, "stale_grad", params)
        grads = [p.grad for p in params]
        if any(g is None for g in grads) or not FlatBuffer.fits(grads):
            return None
        return flat_buffer(self._buffers, "grad", grads).load(grads)

    def _perturbation_per_tensor(self, params: list[Tensor], rhos: list[float]) -> dict[Tensor, Tensor]:
        """The same ``e`` one tensor at a time (missing gradients count as zero)."""
        grads = []
        for p in params:
            g = self.state[p].get("stale_grad") if self.stale_gradient else p.grad
            grads.append(torch.zeros_like(p) if g is None else g)
        lam = self._ellipsoid_lambdas()
        if lam is None or any("eigvecs" not in self.state[p] for p in params):
            u = grads
        else:
            u = ellipsoid_inverse_apply(grads, [self.state[p]["eigvecs"] for p in params],
                                        lam, self.alpha)
        g_u = torch.stack([torch.dot(g.reshape(-1), v.reshape(-1)) for g, v in zip(grads, u)]).sum()
        inv = 1.0 / (g_u.clamp(min=0).sqrt() + 1e-12)
        return {p: v * (inv * r) for p, v, r in zip(params, u, rhos)}

    def _keep_stale_gradient(self) -> tuple[list[Tensor], FlatBuffer | dict]:
        """Copy the gradients at ``w + e`` aside (before the base step reduces or clips them):
        into a spare flat buffer (one ``_foreach_copy_``) when every parameter has one."""
        params = self._params()
        grads = [p.grad for p in params]
        if grads and all(g is not None for g in grads) and FlatBuffer.fits(grads):
            return params, flat_buffer(self._buffers, "stale_spare", grads).load(grads)
        return params, {p: p.grad.detach().clone() for p in params if p.grad is not None}

    def _adopt_stale_gradient(self, params: list[Tensor], kept: FlatBuffer | dict) -> None:
        """Make the kept copy the stale gradient; the buffer it replaces becomes the spare."""
        if isinstance(kept, FlatBuffer):
            previous = self._buffers.get("stale_grad")
            self._buffers["stale_grad"], self._buffers["stale_spare"] = kept, previous
            bind_views(self.state, "stale_grad", params, kept)
            if previous is None:
                self._buffers.pop("stale_spare")
            return
        self._buffers.pop("stale_grad", None)
        for p in params:
            if p in kept:
                self.state[p]["stale_grad"] = kept[p]
            else:
                self.state[p].pop("stale_grad", None)

    # ------------------------------------------------------------------------------ the step
    @torch.no_grad()
    def sharpness_step(self, closure=None, loss_closure: LossClosure | None = None,
             context: StepContext | None = None) -> Tensor:
        closure = require_closure(closure, type(self).__name__)
        context = context if context is not None else StepContext()
        if loss_closure is None:
            loss_closure = context.loss_closure
        refresh_loss = None
        if self.alpha > 0 and self.method_state["step"] % self.interval == 0:
            refresh_loss = self._refresh_eigenpairs(loss_closure)
        two_pass = not self.stale_gradient or not self._has_stale()
        try:
            if two_pass:  # fresh variant, or step 0 of the stale one (plain SAM)
                loss = self.call_closure(closure)
                self.method_state["num_closure_calls"] += 1
                self.first_step(context=context)
            else:
                self.perturb(self.perturbation())
            perturbed_loss = self.call_closure(closure)
            self.method_state["num_closure_calls"] += 1
        finally:
            self.restore()
        kept = self._keep_stale_gradient() if self.stale_gradient else None
        if self.base_step(context) and kept is not None:
            self._adopt_stale_gradient(*kept)
        self.method_state["step"] += 1
        if two_pass:
            loss_out, perturbed = loss, False
        elif refresh_loss is not None:
            loss_out, perturbed = refresh_loss, False
        else:
            loss_out, perturbed = perturbed_loss, True
        self.last_loss_is_perturbed = context.loss_is_perturbed = perturbed
        return loss_out

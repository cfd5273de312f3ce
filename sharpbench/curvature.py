"""Hessian-vector products and eigen-solvers on flat parameter vectors.

This is the one place in sharpbench that touches second-order information. Everything works
on flat vectors v in R^d (the given tensors concatenated in order), and every solver takes a
`matvec` callable v -> A v, so it runs equally on a network Hessian (HessianOperator) and on
an explicit symmetric matrix (`lambda v: A @ v`).

    HVP (Pearlmutter trick):  H v = d/dθ <∇L(θ), v>   -- one extra backward pass, no H formed.
    power iteration:          v <- A v / ||A v||,  λ = vᵀ A v  (dominant |λ|)
    Lanczos:                  A Q_m ≈ Q_m T_m, T_m tridiagonal; Ritz pairs of T_m -> top-k
    Hutchinson:               tr(A) = E[zᵀ A z], z Rademacher
"""

from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch

Matvec = Callable[[torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------- flat vectors

def params_to_vector(tensors: Iterable[Optional[torch.Tensor]],
                     like: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
    """Concatenate tensors (params or grads) into one flat vector, in logical element order.

    None entries (e.g. unused grads) become zeros shaped like the matching entry of `like`.
    Works for non-contiguous tensors (channels_last weights) since reshape copies if needed.
    """
    tensors = list(tensors)
    if like is not None:
        like = list(like)
        if len(like) != len(tensors):
            raise ValueError(f"got {len(tensors)} tensors but {len(like)} in `like`")
        tensors = [torch.zeros_like(l) if t is None else t for t, l in zip(tensors, like)]
    elif any(t is None for t in tensors):
        raise ValueError("None entries need `like` to know their shapes")
    return torch.cat([t.reshape(-1) for t in tensors])


def vector_to_tensors(vec: torch.Tensor, like: Sequence[torch.Tensor]) -> list:
    """Split a flat vector into tensors shaped like `like` (views into `vec`, no copy)."""
    total = sum(t.numel() for t in like)
    if vec.dim() != 1 or vec.numel() != total:
        raise ValueError(f"expected a flat vector of size {total}, got shape {tuple(vec.shape)}")
    out, offset = [], 0
    for t in like:
        out.append(vec[offset:offset + t.numel()].view(t.shape))
        offset += t.numel()
    return out


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.dot(a.reshape(-1), b.reshape(-1))


def _random(shape, kind: str, device, dtype, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Gaussian or Rademacher samples; drawn on the generator's device, then moved."""
    gen_device = generator.device if generator is not None else device
    if kind == "rademacher":
        z = torch.randint(0, 2, shape, generator=generator, device=gen_device).to(dtype) * 2 - 1
    else:
        z = torch.randn(shape, generator=generator, device=gen_device, dtype=dtype)
    return z.to(device)


def _resolve(matvec, dim, init, device, dtype):
    """Fill in dim/device/dtype from init, then from the operator (HessianOperator has them)."""
    if init is not None:
        dim = init.shape[0] if dim is None else dim
        device = init.device if device is None else device
        dtype = init.dtype if dtype is None else dtype
    dim = getattr(matvec, "dim", None) if dim is None else dim
    device = getattr(matvec, "device", None) if device is None else device
    dtype = getattr(matvec, "dtype", None) if dtype is None else dtype
    if dim is None:
        raise ValueError("pass `dim` (or an `init` vector, or a matvec with a .dim attribute)")
    return int(dim), device or torch.device("cpu"), dtype or torch.get_default_dtype()


# ----------------------------------------------------------------------------- HVPs

class HessianOperator:
    """H v for H = ∇²_θ L at the current params, via double backward.

    The first-order grads g = ∇L are built once with create_graph=True; each matvec is then
    H v = ∇_θ <g, v>, one backward through the retained graph. The graph (activations of the
    forward pass and of the first backward) stays alive as long as this object does.

    Attributes: dim (number of scalars), device, dtype, gradient (flat detached ∇L),
    num_hvps (python int, matvecs done so far).
    """

    def __init__(self, loss: torch.Tensor, params: Iterable[torch.Tensor]):
        self.params = list(params)
        if not self.params:
            raise ValueError("HessianOperator needs at least one parameter")
        if any(not p.requires_grad for p in self.params):
            raise ValueError("all params must have requires_grad=True")
        grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
        self.gradient = params_to_vector(
            [None if g is None else g.detach() for g in grads], like=self.params)
        # only grads that still depend on θ contribute to H v; the rest have zero rows
        self._idx = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        self._grads = [grads[i] for i in self._idx]
        self.dim = sum(p.numel() for p in self.params)
        self.device = self.params[0].device
        self.dtype = self.params[0].dtype
        self.num_hvps = 0

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """Return H v as a flat detached vector (same order as params)."""
        if v.shape != (self.dim,):
            raise ValueError(f"expected a flat vector of size {self.dim}, got {tuple(v.shape)}")
        self.num_hvps += 1
        if not self._grads:
            return torch.zeros(self.dim, device=self.device, dtype=self.dtype)
        vs = vector_to_tensors(v.to(device=self.device, dtype=self.dtype), self.params)
        hv = torch.autograd.grad(self._grads, self.params,
                                 grad_outputs=[vs[i] for i in self._idx],
                                 retain_graph=True, allow_unused=True)
        return params_to_vector(hv, like=self.params)

    __call__ = matvec


def hvp(loss: torch.Tensor, params: Iterable[torch.Tensor], v: torch.Tensor) -> torch.Tensor:
    """One-off Hessian-vector product H v (flat) of `loss` w.r.t. `params`."""
    return HessianOperator(loss, params).matvec(v)


# ----------------------------------------------------------------------------- eigen-solvers

@dataclass
class EigenInfo:
    """What an eigen-solve achieved (returned with ``return_info=True``).

    - ``iterations``: matrix-vector products spent;
    - ``residuals``: ``‖A v_i − λ_i v_i‖ / |λ_i|`` per returned pair (python floats, read with
      the solve's last host transfer; for power iteration the pair is (the last input vector,
      its Rayleigh quotient));
    - ``converged``: every residual ≤ ``tol`` (always ``False`` when no ``tol`` was given, unless
      the Krylov space became invariant, where the pairs are exact);
    - ``finite``: every α/β/λ of the solve was finite (``False``: the output is not usable);
    - ``host_syncs``: device→host reads the solver made (each one a synchronisation on a GPU);
    - ``restarts``: Lanczos breakdowns continued from a fresh vector.
    """

    iterations: int
    residuals: tuple
    converged: bool
    finite: bool
    host_syncs: int
    restarts: int = 0


def _unit_or_random(v: Optional[torch.Tensor], dim: int, device, dtype,
                    generator: Optional[torch.Generator]) -> torch.Tensor:
    """``v / ‖v‖``, or a unit Gaussian vector where ``v`` is missing, zero or non-finite.

    Decided on the device (``torch.where``), so a warm start costs no host synchronisation."""
    r = _random((dim,), "gauss", device, dtype, generator)
    r = r / r.norm()
    if v is None:
        return r
    v = v.detach().to(device, dtype)
    norm = v.norm()
    usable = torch.isfinite(norm) & (norm > 0)
    return torch.where(usable, v / torch.where(usable, norm, torch.ones_like(norm)), r)


def power_iteration(matvec: Matvec, dim=None, iters: int = 20,
                    tol: Optional[float] = None, init: Optional[torch.Tensor] = None,
                    generator: Optional[torch.Generator] = None,
                    device=None, dtype=None, *, return_info: bool = False):
    """Dominant eigenpair of a symmetric operator by power iteration.

    Converges to the eigenvalue of largest *magnitude* (for a Hessian with a large negative
    eigenvalue that may be the negative one). Each matvec is one full step::

        w = A v,   λ = vᵀ w  (Rayleigh quotient of v),   v <- w / ‖w‖

    so ``iters`` matvecs apply A ``iters`` times: the last product is reused to advance ``v``
    (no matvec is spent on a final Rayleigh quotient). The returned ``λ`` is the Rayleigh
    quotient of the last *input* vector, one step behind the returned ``v`` (both converge to
    the same pair; ``λ`` is a lower bound on ``|λ_max|`` for a PSD operator).
    Stops after ``iters`` matvecs, or earlier once ``|λ_t − λ_{t−1}| <= tol·|λ_t|`` (one host
    read per matvec; ``tol=None`` never stops early and never reads a device value).
    ``init`` warm-starts (e.g. last step's eigenvector); otherwise (or if ``init`` is zero or
    non-finite) v0 ~ N(0, I) from ``generator``. ``dim`` may also be the init vector itself:
    ``power_iteration(op, v_prev, iters=5)``.

    Returns ``(eigenvalue: 0-dim tensor, eigenvector: unit-norm [dim] tensor)``, plus an
    :class:`EigenInfo` with ``return_info=True`` (residual ``‖A v − λ v‖ / |λ|`` of the last input
    vector, from the product already computed).
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    if isinstance(dim, torch.Tensor):
        dim, init = None, dim
    dim, device, dtype = _resolve(matvec, dim, init, device, dtype)
    v = _unit_or_random(init, dim, device, dtype, generator)
    lam_prev, syncs, done = None, 0, 0
    for t in range(iters):
        w = matvec(v)
        done += 1
        lam = _dot(v, w)
        residual = (w - lam * v).norm() / lam.abs()
        w_norm = w.norm()
        # A v = 0 (v an eigenvector with eigenvalue 0) keeps v
        v = torch.where(w_norm > 0, w / torch.where(w_norm > 0, w_norm, torch.ones_like(w_norm)), v)
        if tol is not None:
            lam_f = lam.item()
            syncs += 1
            if lam_prev is not None and abs(lam_f - lam_prev) <= tol * abs(lam_f):
                break
            lam_prev = lam_f
    if not return_info:
        return lam.detach(), v.detach()
    flag = (torch.isfinite(lam) & torch.isfinite(v).all()).to(residual.dtype)
    finite, res = torch.stack([flag, residual.detach()]).tolist()   # the one host read
    info = EigenInfo(iterations=done, residuals=(res,),
                     converged=tol is not None and res <= tol, finite=bool(finite),
                     host_syncs=syncs + 1)
    return lam.detach(), v.detach(), info


def lanczos(matvec: Matvec, dim: Optional[int] = None, k: int = 1,
            num_iters: Optional[int] = None, init: Optional[torch.Tensor] = None,
            generator: Optional[torch.Generator] = None, reorthogonalize: bool = True,
            device=None, dtype=None, *, tol: Optional[float] = None,
            check_every: int = 5, return_info: bool = False, history: Optional[list] = None):
    """Top-k (algebraically largest) eigenpairs of a symmetric operator by Lanczos.

    Builds an orthonormal Krylov basis Q = [q_1..q_m] with
        β_j q_{j+1} = A q_j - α_j q_j - β_{j-1} q_{j-1},   α_j = q_jᵀ A q_j,
    so that Qᵀ A Q = T = tridiag(β, α, β). With reorthogonalize=True every new vector is
    Gram-Schmidt'ed against all previous ones (twice), which keeps Q orthonormal in finite
    precision (no ghost eigenvalues). T = S diag(θ) Sᵀ is eigen-decomposed in float64 and the
    Ritz vectors y_i = Q s_i are returned.

    Stopping. The Ritz residual costs no matvec: ``‖A y_i − θ_i y_i‖ = β_n·|s_{n,i}|`` (β_n the
    norm of the next, unnormalised Krylov vector). With ``tol`` the solve stops at the first
    check where every one of the top k pairs has ``‖A y_i − θ_i y_i‖ <= tol·|θ_i|``, and at
    ``num_iters`` matvecs at the latest (the cap). Without ``tol`` it runs ``num_iters``.

    Host synchronisation. The iterations run on the device without reading any value back:
    α_j, β_j stay device tensors. Every ``check_every`` iterations (and at the cap) they are
    copied to the host in one transfer and T is solved there with numpy (it is at most m×m): a
    solve with ``tol=None`` reads the device once; with ``tol``, once per check.

    m = num_iters defaults to min(dim, max(2k + 10, 20)); each iteration costs one matvec.
    Memory: the basis is an [m, dim] tensor in `dtype` on `device`, e.g. 30 x 11.2M floats
    ≈ 1.3 GB for ResNet-18, ≈ 4.4 GB for WRN-28-10.

    Breakdown (β_j ≈ 0, i.e. span(Q) is an invariant subspace): found at the next check. If at
    least k vectors had been built we stop there (the Ritz pairs are then exact; matvecs made
    after the breakdown are counted but discarded); otherwise we continue from a fresh random
    vector orthogonal to Q (T gets a zero off-diagonal there), so k pairs are always returned.
    Eigenvalue multiplicities are only seen through such restarts.

    Non-finite values (a NaN Hessian-vector product): the solve stops at the check that sees
    them and returns NaN pairs with ``info.finite = False``; it never raises.

    ``history``: a list that receives ``(matvecs so far, residuals of the top-k pairs)`` at
    every check (no extra host read).

    Returns (eigenvalues [k] descending, eigenvectors [dim, k] with unit-norm columns), plus an
    :class:`EigenInfo` with ``return_info=True``.
    """
    dim, device, dtype = _resolve(matvec, dim, init, device, dtype)
    if not 1 <= k <= dim:
        raise ValueError(f"need 1 <= k <= dim, got k={k}, dim={dim}")
    m = min(dim, max(2 * k + 10, 20)) if num_iters is None else min(dim, num_iters)
    if m < k:
        raise ValueError(f"num_iters={m} must be >= k={k}")
    if tol is not None and not tol > 0:
        raise ValueError(f"Lanczos tol must be > 0 (a relative Ritz residual), got {tol}")
    if check_every < 1:
        raise ValueError(f"check_every must be >= 1, got {check_every}")
    breakdown_tol = torch.finfo(dtype).eps ** 0.5  # relative to the largest |T| entry so far

    Q = torch.zeros(m, dim, device=device, dtype=dtype)
    alphas = torch.zeros(m, device=device, dtype=dtype)
    betas = torch.zeros(m, device=device, dtype=dtype)   # betas[j]: norm of the vector after q_j
    restart_at: set = set()                              # j with a zero coupling to q_{j+1}
    q = _unit_or_random(init, dim, device, dtype, generator)
    q_prev = torch.zeros_like(q)
    beta_prev = torch.zeros((), device=device, dtype=dtype)
    j, syncs, matvecs, n = 0, 0, 0, 0
    finite, converged = True, False
    evals = evecs = resid = None
    while True:
        stop = min(m, (j // check_every + 1) * check_every) if tol is not None else m
        for i in range(j, stop):
            Q[i] = q
            w = matvec(q)
            matvecs += 1
            alpha = _dot(q, w)
            w = w - alpha * q - beta_prev * q_prev
            if reorthogonalize:
                for _ in range(2):
                    w = w - Q[:i + 1].T @ (Q[:i + 1] @ w)
            beta = w.norm()
            alphas[i], betas[i] = alpha, beta
            # never divide by zero; a (near-)breakdown found at the check discards what follows
            q_prev, q = q, w / torch.clamp(beta, min=torch.finfo(dtype).tiny)
            beta_prev = beta
        # one transfer per check; from here on numpy on the host (no further device reads)
        a_host, b_host = np.array(torch.stack([alphas[:stop], betas[:stop]]).tolist(), dtype=np.float64)
        syncs += 1
        if not (np.isfinite(a_host).all() and np.isfinite(b_host).all()):
            finite, n = False, stop
            break
        n = stop
        broke = None
        for i in range(j, stop):  # first breakdown in this window
            scale = max(np.abs(a_host[:i + 1]).max(), np.abs(b_host[:i + 1]).max())
            if i < dim - 1 and b_host[i] <= breakdown_tol * scale and i + 1 < m:
                broke = i
                break
        if broke is not None:
            n = broke + 1
            if n < k:  # invariant subspace with fewer than k vectors: restart orthogonally to Q
                w = _random((dim,), "gauss", device, dtype, generator)
                for _ in range(2):
                    w = w - Q[:n].T @ (Q[:n] @ w)
                restart_at.add(broke)
                q_prev, q = Q[broke], w / w.norm()
                beta_prev = torch.zeros((), device=device, dtype=dtype)
                j = n
                continue
        off = b_host[:n - 1].copy()
        for r in restart_at:
            if r < n - 1:
                off[r] = 0.0
        T = np.diag(a_host[:n]) + np.diag(off, 1) + np.diag(off, -1)
        theta, S = np.linalg.eigh(T)                             # ascending
        theta, S = theta[::-1][:k].copy(), S[:, ::-1][:, :k].copy()
        beta_n = 0.0 if broke is not None else float(b_host[n - 1])
        resid = beta_n * np.abs(S[-1]) / np.maximum(np.abs(theta), 1e-300)
        evals, evecs = theta, S
        if history is not None:
            history.append((matvecs, tuple(float(r) for r in resid)))
        if broke is not None:
            converged = True
            break
        if tol is not None and bool((resid <= tol).all()):
            converged = True
            break
        if n >= m:
            break
        j = n
    if not finite:
        nan = torch.full((k,), float("nan"), device=device, dtype=dtype)
        vecs = torch.full((dim, k), float("nan"), device=device, dtype=dtype)
        out = (nan, vecs)
        info = EigenInfo(iterations=matvecs, residuals=(float("nan"),) * k,
                         converged=False, finite=False,
                         host_syncs=syncs, restarts=len(restart_at))
    else:
        vecs = Q[:n].T @ torch.from_numpy(evecs).to(device=device, dtype=dtype)
        vecs = vecs / vecs.norm(dim=0, keepdim=True)
        out = (torch.from_numpy(evals).to(device=device, dtype=dtype), vecs)
        info = EigenInfo(iterations=matvecs, residuals=tuple(float(r) for r in resid),
                         converged=converged, finite=True, host_syncs=syncs,
                         restarts=len(restart_at))
    return (*out, info) if return_info else out


def block_power_iteration(matvec: Matvec, dim: Optional[int] = None, k: int = 1,
                          iters: int = 20, init: Optional[torch.Tensor] = None,
                          generator: Optional[torch.Generator] = None,
                          device=None, dtype=None):
    """Top-k eigenpairs by subspace (block power) iteration with QR and a final Rayleigh-Ritz.

        V <- qr(A V),   then   T = Vᵀ A V = S diag(λ) Sᵀ,  eigenvectors V S.

    Converges to the k eigenvalues of largest *magnitude*, at rate |λ_{k+1} / λ_k| per step.
    `init` [dim, k] warm-starts (e.g. last step's eigenvectors). Costs k * iters matvecs.

    Returns (eigenvalues [k] descending, eigenvectors [dim, k] with orthonormal columns).
    """
    dim, device, dtype = _resolve(matvec, dim, None if init is None else init[:, 0], device, dtype)
    if not 1 <= k <= dim:
        raise ValueError(f"need 1 <= k <= dim, got k={k}, dim={dim}")
    V = init.detach().to(device, dtype) if init is not None else _random((dim, k), "gauss", device, dtype, generator)
    V = torch.linalg.qr(V).Q
    iters = max(iters, 1)
    for t in range(iters):
        W = torch.stack([matvec(V[:, i]) for i in range(k)], dim=1)
        if t == iters - 1:
            break
        V = torch.linalg.qr(W).Q
    T = (V.T @ W).double()
    evals, S = torch.linalg.eigh((T + T.T) / 2)
    evals, S = evals.flip(0), S.flip(1)
    return evals.to(dtype), V @ S.to(dtype)


def hutchinson_trace(matvec: Matvec, dim: Optional[int] = None, num_samples: int = 100,
                     generator: Optional[torch.Generator] = None, device=None, dtype=None) -> torch.Tensor:
    """Hutchinson estimate tr(A) ≈ (1/N) Σ_i z_iᵀ A z_i with Rademacher z_i (N = num_samples).

    Unbiased; variance per sample is 2 Σ_{i≠j} A_ij² (exact for diagonal A).
    Returns a 0-dim tensor.
    """
    dim, device, dtype = _resolve(matvec, dim, None, device, dtype)
    total = torch.zeros((), device=device, dtype=dtype)
    for _ in range(num_samples):
        z = _random((dim,), "rademacher", device, dtype, generator)
        total = total + _dot(z, matvec(z))
    return total / num_samples


__all__ = ["params_to_vector", "vector_to_tensors", "HessianOperator", "hvp", "EigenInfo",
           "power_iteration", "lanczos", "block_power_iteration", "hutchinson_trace"]


# ----------------------------------------------------------------------------- many batches

class MeanLossHessian:
    """H v for the Hessian of a weighted mean of losses, L = Σ_b ω_b L_b, batch by batch.

        H v = Σ_b ω_b ∇²L_b v,     ∇L = Σ_b ω_b ∇L_b,

    each term by :class:`HessianOperator` (the one HVP code path), summed in `accumulate_dtype`
    (float64 by default) and returned in `dtype`. `loss_closures[b]()` must return L_b with its
    graph (a fresh forward pass); it is called once per matvec, so no graph outlives a batch and
    the memory is that of one batch. ω_b defaults to 1/B; pass n_b/N for the mean over samples.

    Attributes: dim, device, dtype (what matvec returns), num_hvps (batch HVPs so far).
    """

    def __init__(self, loss_closures: Sequence[Callable[[], torch.Tensor]],
                 params: Iterable[torch.Tensor], weights: Optional[Sequence[float]] = None,
                 dtype: Optional[torch.dtype] = None, accumulate_dtype: torch.dtype = torch.float64):
        self.closures = list(loss_closures)
        self.params = list(params)
        if not self.closures:
            raise ValueError("MeanLossHessian needs at least one batch (loss closure)")
        if not self.params:
            raise ValueError("MeanLossHessian needs at least one parameter")
        if weights is None:
            weights = [1.0 / len(self.closures)] * len(self.closures)
        if len(weights) != len(self.closures):
            raise ValueError(f"got {len(weights)} weights for {len(self.closures)} batches")
        self.weights = [float(w) for w in weights]
        self.dim = sum(p.numel() for p in self.params)
        self.device = self.params[0].device
        self.accumulate_dtype = accumulate_dtype
        self.dtype = accumulate_dtype if dtype is None else dtype
        self.num_hvps = 0

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """Return H v (flat, detached) of the weighted mean loss."""
        if v.shape != (self.dim,):
            raise ValueError(f"expected a flat vector of size {self.dim}, got {tuple(v.shape)}")
        total = torch.zeros(self.dim, device=self.device, dtype=self.accumulate_dtype)
        for closure, w in zip(self.closures, self.weights):
            op = HessianOperator(closure(), self.params)
            total += w * op.matvec(v).to(self.accumulate_dtype)
            self.num_hvps += 1
            del op
        return total.to(self.dtype)

    __call__ = matvec

    def gradient(self) -> torch.Tensor:
        """∇L = Σ_b ω_b ∇L_b (flat, detached, in `dtype`), one backward per batch."""
        total = torch.zeros(self.dim, device=self.device, dtype=self.accumulate_dtype)
        for closure, w in zip(self.closures, self.weights):
            grads = torch.autograd.grad(closure(), self.params, allow_unused=True)
            total += w * params_to_vector(
                [None if g is None else g.detach() for g in grads], like=self.params).to(self.accumulate_dtype)
        return total.to(self.dtype)


def stochastic_lanczos_quadrature(matvec: Matvec, dim: Optional[int] = None, num_iters: int = 80,
                                  num_runs: int = 1, generator: Optional[torch.Generator] = None,
                                  device=None, dtype=None):
    """Quadrature nodes and weights of the spectral density (Ghorbani, Krishnan & Xiao, ICML 2019).

    For a unit probe v, vᵀ f(A) v ≈ Σ_i τ_i f(θ_i): θ_i are the Ritz values of an m-step Lanczos
    run started at v (m = num_iters) and τ_i = (e_1ᵀ s_i)² = (vᵀ y_i)² the squared first
    components of the Ritz vectors. With a Gaussian probe, E[vᵀ f(A) v] = tr f(A)/d, so each run
    gives an unbiased-in-expectation discrete density Σ_i τ_i δ(t - θ_i) with Σ_i τ_i = 1.
    Uses :func:`lanczos` (full re-orthogonalisation) with k = m.

    Returns (nodes [num_runs, m'], weights [num_runs, m']), float64 on the CPU, m' <= m (a run
    that stopped early on an invariant subspace is padded with zero-weight nodes).
    """
    dim, device, dtype = _resolve(matvec, dim, None, device, dtype)
    m = min(int(num_iters), dim)
    if m < 1 or num_runs < 1:
        raise ValueError(f"need num_iters >= 1 and num_runs >= 1, got {num_iters}, {num_runs}")
    nodes, weights = [], []
    for _ in range(num_runs):
        v = _random((dim,), "gauss", device, dtype, generator)
        v = v / v.norm()
        evals, evecs = lanczos(matvec, dim=dim, k=m, num_iters=m, init=v, device=device, dtype=dtype,
                               generator=generator)
        tau = (v.double() @ evecs.double()) ** 2
        nodes.append(evals.double().cpu())
        weights.append((tau / tau.sum()).cpu())
    width = max(len(n) for n in nodes)  # a run that broke down early is padded with zero weights
    pad = lambda t, fill: torch.cat([t, t.new_full((width - len(t),), fill)])
    return (torch.stack([pad(n, float(n[-1])) for n in nodes]),
            torch.stack([pad(w, 0.0) for w in weights]))


__all__ += ["MeanLossHessian", "stochastic_lanczos_quadrature"]


# ----------------------------------------------------------------------------- warm starts

def block_lanczos(matvec: Matvec, dim: Optional[int] = None, k: int = 1,
                  max_matvecs: Optional[int] = None, init: Optional[torch.Tensor] = None,
                  tol: Optional[float] = None, generator: Optional[torch.Generator] = None,
                  device=None, dtype=None, *, return_info: bool = False,
                  history: Optional[list] = None):
    """Top-k (algebraically largest) eigenpairs by block Lanczos from a warm start, with a
    Ritz-residual stopping rule checked after every block.

    The basis grows by blocks of ``b = k`` orthonormal vectors: ``P_0 = orth(init)`` (the previous
    eigenvectors, so a solve of a slightly changed operator starts where the last one ended; missing
    or dependent columns are filled with random ones), then ``P_{j+1} R_j = (I − QQᵀ) A P_j`` (QR,
    Gram–Schmidt twice against the whole basis ``Q``). After each block the Rayleigh–Ritz pairs of
    ``T = Qᵀ A Q`` (``n × n``, solved on the host in float64) are the estimates, and because
    ``A Q = Q T + P_{j+1} R_j E_jᵀ`` the residual of a Ritz pair ``(θ, y = Q s)`` costs no matvec::

        ‖A y − θ y‖ = ‖R_j s_j‖          (s_j: the rows of s on the last block)

    The solve stops at the first block where all top-k pairs have ``‖A y − θ y‖ <= tol·|θ|``, or
    after ``max_matvecs`` matvecs (rounded up to whole blocks; default ``max(4k, 20)``). A warm
    start from exact eigenvectors converges in one block (``k`` matvecs); from a cold start this is
    Lanczos with ``k`` starting vectors. ``k = 1`` is Lanczos from ``init``.

    Host synchronisation: one device→host read per block (the new column of ``T`` and ``R_j``,
    together). Memory: the basis, ``[max_matvecs + k, dim]``.

    ``init``: ``[dim, c]`` (or ``[dim]``) starting vectors; the first ``min(c, k)`` are used. A
    column that is zero, non-finite or dependent on the others is replaced by a random one.
    Non-finite values from ``matvec`` stop the solve with ``info.finite = False`` (NaN pairs).
    ``history``: a list that receives ``(matvecs so far, residuals of the top-k pairs)`` per block.

    Returns (eigenvalues [k] descending, eigenvectors [dim, k] with orthonormal columns), plus an
    :class:`EigenInfo` with ``return_info=True``.
    """
    if init is not None and init.dim() == 1:
        init = init[:, None]
    dim, device, dtype = _resolve(matvec, dim, None if init is None else init[:, 0], device, dtype)
    if not 1 <= k <= dim:
        raise ValueError(f"need 1 <= k <= dim, got k={k}, dim={dim}")
    if tol is not None and not tol > 0:
        raise ValueError(f"block Lanczos tol must be > 0 (a relative Ritz residual), got {tol}")
    cap = max(4 * k, 20) if max_matvecs is None else int(max_matvecs)
    if cap < k:
        raise ValueError(f"max_matvecs={cap} must be >= k={k} (one block)")
    blocks = -(-min(cap, dim) // k)
    Q = torch.zeros(blocks * k, dim, device=device, dtype=dtype)
    start = _random((dim, k), "gauss", device, dtype, generator)
    if init is not None:
        cols = init[:, :k].detach().to(device, dtype)
        good = torch.isfinite(cols).all(dim=0) & (cols.norm(dim=0) > 0)
        start[:, :cols.shape[1]] = torch.where(good, torch.nan_to_num(cols), start[:, :cols.shape[1]])
    P, fixes = _orthonormal_block(start, Q[:0], generator)
    T = np.zeros((0, 0))
    n, matvecs, syncs, restarts = 0, 0, 0, 0
    finite, converged = True, False
    theta = S = resid = None
    while True:
        Q[n:n + k] = P.T
        W = torch.stack([matvec(P[:, i]) for i in range(k)], dim=1)      # A P, [dim, k]
        matvecs += k
        n += k
        C = Q[:n] @ W                                                    # Qᵀ A P, [n, k]
        Z = W - Q[:n].T @ C
        Z = Z - Q[:n].T @ (Q[:n] @ Z)
        P_next, R = torch.linalg.qr(Z)
        host = np.array(torch.cat([C, R, fixes[None, :]]).double().tolist(), dtype=np.float64)
        syncs += 1
        C_h, R_h, fixed = host[:n], host[n:n + k], host[n + k]
        restarts += int(fixed.sum())
        if not np.isfinite(host).all():
            finite = False
            break
        T_new = np.zeros((n, n))
        T_new[:n - k, :n - k] = T
        T_new[:, n - k:] = C_h
        T_new[n - k:, :] = C_h.T
        T = (T_new + T_new.T) / 2
        evals, evecs = np.linalg.eigh(T)
        theta, S = evals[::-1][:k].copy(), evecs[:, ::-1][:, :k].copy()
        resid = np.linalg.norm(R_h @ S[n - k:], axis=0) / np.maximum(np.abs(theta), 1e-300)
        if history is not None:
            history.append((matvecs, tuple(float(r) for r in resid)))
        scale = max(np.abs(T).max(), 1e-300)
        invariant = np.abs(np.diag(R_h)) <= np.finfo(np.float64).eps ** 0.5 * scale
        if tol is not None and bool((resid <= tol).all()):
            converged = True
            break
        if n + k > Q.shape[0] or n + k > dim:
            break                        # the cap, or no room left for a whole new block
        if invariant.all() and n >= k and np.all(resid <= np.finfo(np.float64).eps ** 0.5):
            converged = True            # span(Q) is invariant: the Ritz pairs are exact
            break
        P, fixes = _orthonormal_block(P_next, Q[:n], generator,
                                      replace=torch.as_tensor(invariant, device=device))
    if not finite:
        out = (torch.full((k,), float("nan"), device=device, dtype=dtype),
               torch.full((dim, k), float("nan"), device=device, dtype=dtype))
        info = EigenInfo(iterations=matvecs, residuals=(float("nan"),) * k, converged=False,
                         finite=False, host_syncs=syncs, restarts=restarts)
    else:
        vecs = Q[:n].T @ torch.from_numpy(S).to(device=device, dtype=dtype)
        out = (torch.from_numpy(theta).to(device=device, dtype=dtype), vecs)
        info = EigenInfo(iterations=matvecs, residuals=tuple(float(r) for r in resid),
                         converged=converged, finite=True, host_syncs=syncs, restarts=restarts)
    return (*out, info) if return_info else out


def _orthonormal_block(X: torch.Tensor, Q: torch.Tensor, generator: Optional[torch.Generator],
                       replace: Optional[torch.Tensor] = None):
    """Orthonormal columns spanning ``X`` projected off the rows of ``Q``; columns flagged in
    ``replace`` (or that come out dependent) become random directions orthogonal to both.

    Decided on the device: returns (the block ``[dim, b]``, a float mask of replaced columns)."""
    dim, b = X.shape
    R = _random((dim, b), "gauss", X.device, X.dtype, generator)
    R = R / R.norm(dim=0, keepdim=True)
    if replace is not None:
        X = torch.where(replace[None, :], R, X)
    for _ in range(2):
        X = X - Q.T @ (Q @ X)
    P, Rx = torch.linalg.qr(X)
    diag = Rx.diagonal().abs()
    weak = diag <= torch.finfo(X.dtype).eps ** 0.5 * diag.max().clamp_min(torch.finfo(X.dtype).tiny)
    fixes = weak.to(X.dtype) + (replace.to(X.dtype) if replace is not None else 0)
    # dependent columns: swap in random ones and orthonormalise again (a no-op when none are weak)
    X = torch.where(weak[None, :], R, P)
    for _ in range(2):
        X = X - Q.T @ (Q @ X)
    return torch.linalg.qr(X).Q, fixes.clamp(max=1)


__all__ += ["block_lanczos"]

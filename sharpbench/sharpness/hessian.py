"""Curvature of the mean training loss: top eigenvalues, trace, spectral density, gradient angle.

All Hessian-vector products go through ``sharpbench.curvature`` (``MeanLossHessian`` sums the
per-batch products of ``HessianOperator`` in float64). Conventions: ``sharpness.conventions``.

    top eigenvalues   Lanczos with full re-orthogonalisation (algebraically largest), or power
                      iteration (largest |λ|), on H v
    trace             Hutchinson: tr H = E[zᵀ H z], z Rademacher; standard error s/√n
    density           stochastic Lanczos quadrature (Ghorbani, Krishnan & Xiao, ICML 2019),
                      Gaussian-broadened: φ(t) = mean_runs Σ_i τ_i N(t; θ_i, σ²)
    gradient angle    angle between ∇L and the top eigenvector v (X-SAM's measure; Duan et al.
                      2026): arccos |ĝ·v| in [0°, 90°] (v's sign is arbitrary)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
from torch import Tensor, nn

from .. import curvature
from .conventions import (Batch, LossFn, as_batches, batch_weights, loss_closures,
                          measuring, model_device, trainable)


def mean_loss_hessian(model: nn.Module, loss_fn: LossFn, batches: list[Batch],
                      dtype: torch.dtype = torch.float64) -> curvature.MeanLossHessian:
    """The Hessian operator of the mean loss over ``batches`` (call inside ``measuring``)."""
    return curvature.MeanLossHessian(loss_closures(model, loss_fn, batches), trainable(model),
                                     weights=batch_weights(batches), dtype=dtype)


def _generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int(seed))
    return g


@dataclass
class EigenResult:
    eigenvalues: list[float]              # descending
    method: str
    num_hvps: int                         # batch HVPs (one per batch per matvec)
    eigenvectors: Optional[Tensor] = field(default=None, repr=False)  # [dim, k], unit columns


def hessian_eigenvalues(model: nn.Module, loss_fn: LossFn, data: Iterable[Batch],
                        k: int = 1, method: str = "lanczos", num_iters: Optional[int] = None,
                        return_vectors: bool = False, seed: int = 0,
                        dtype: torch.dtype = torch.float64) -> EigenResult:
    """Top-k Hessian eigenvalues of the mean loss over ``data``.

    method="lanczos": k algebraically largest, ``num_iters`` Krylov steps (default
    max(2k+10, 20)), full re-orthogonalisation. method="power": k=1 by power iteration
    (``num_iters`` default 50), or block power iteration for k>1; converges to the largest
    *magnitude* eigenvalues. Lanczos vectors live in ``dtype`` (float64 default; float32 halves
    the basis memory, num_iters × d values, for large models).
    """
    if method not in ("lanczos", "power"):
        raise ValueError(f"method must be 'lanczos' or 'power', got {method!r}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    with measuring(model):
        batches = as_batches(data, model_device(model))
        op = mean_loss_hessian(model, loss_fn, batches, dtype)
        gen = _generator(seed)
        if method == "lanczos":
            vals, vecs = curvature.lanczos(op, k=k, num_iters=num_iters, generator=gen)
        elif k == 1:
            val, vec = curvature.power_iteration(op, iters=num_iters or 50, generator=gen)
            vals, vecs = val.reshape(1), vec.reshape(-1, 1)
        else:
            vals, vecs = curvature.block_power_iteration(op, k=k, iters=num_iters or 50, generator=gen)
    return EigenResult([float(v) for v in vals], method, op.num_hvps,
                       vecs.detach() if return_vectors else None)


@dataclass
class TraceResult:
    trace: float
    stderr: float       # sample std of zᵀHz over probes / √n
    n_samples: int
    num_hvps: int


def hessian_trace(model: nn.Module, loss_fn: LossFn, data: Iterable[Batch],
                  n_samples: int = 100, seed: int = 0) -> TraceResult:
    """Hutchinson's estimate of tr H with Rademacher probes z: mean of zᵀHz, with its standard error.

    Var(zᵀHz) = 2 Σ_{i≠j} H_ij² per probe, so the estimate is exact for a diagonal Hessian.
    """
    if n_samples < 2:
        raise ValueError(f"n_samples must be >= 2 (the standard error needs two probes), got {n_samples}")
    with measuring(model):
        batches = as_batches(data, model_device(model))
        op = mean_loss_hessian(model, loss_fn, batches)
        gen = _generator(seed)
        values = []
        for _ in range(n_samples):
            z = (torch.randint(0, 2, (op.dim,), generator=gen, dtype=torch.float64) * 2 - 1).to(op.device)
            values.append(float(torch.dot(z, op(z))))
    v = torch.tensor(values, dtype=torch.float64)
    return TraceResult(float(v.mean()), float(v.std(unbiased=True) / math.sqrt(n_samples)),
                       n_samples, op.num_hvps)


@dataclass
class DensityResult:
    grid: Tensor        # [G] eigenvalue axis
    density: Tensor     # [G] φ(t), integrates to 1 over the grid
    nodes: Tensor       # [runs, m] Ritz values
    weights: Tensor     # [runs, m] quadrature weights, each row sums to 1
    sigma: float

    def as_dict(self) -> dict:
        return {"grid": self.grid.tolist(), "density": self.density.tolist(),
                "nodes": self.nodes.tolist(), "weights": self.weights.tolist(), "sigma": self.sigma}


def broadened_density(nodes: Tensor, weights: Tensor, sigma: Optional[float] = None,
                      sigma_rel: float = 0.01, grid_points: int = 1000) -> DensityResult:
    """φ(t) = (1/R) Σ_r Σ_i τ_ri N(t; θ_ri, σ²) on a grid covering every node ± 5σ.

    σ defaults to sigma_rel × (θ_max − θ_min) (PyHessian's convention of a width relative to the
    spectrum's extent). The grid density is renormalised by its trapezoid integral.
    """
    nodes, weights = nodes.double(), weights.double()
    lo, hi = float(nodes.min()), float(nodes.max())
    if sigma is None:
        sigma = sigma_rel * max(hi - lo, 1e-12 + 1e-6 * max(abs(lo), abs(hi)))
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    grid = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, grid_points, dtype=torch.float64)
    diff = grid[:, None, None] - nodes[None]                          # [G, R, m]
    gauss = torch.exp(-0.5 * (diff / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    density = (gauss * weights[None]).sum(-1).mean(-1)
    density = density / torch.trapezoid(density, grid)
    return DensityResult(grid, density, nodes, weights, float(sigma))


def hessian_density(model: nn.Module, loss_fn: LossFn, data: Iterable[Batch],
                    num_iters: int = 80, num_runs: int = 1, sigma: Optional[float] = None,
                    sigma_rel: float = 0.01, grid_points: int = 1000, seed: int = 0) -> DensityResult:
    """Eigenvalue density of H by stochastic Lanczos quadrature (PyHessian's "ESD"): ``num_runs``
    Gaussian probes, ``num_iters`` Lanczos steps each, Gaussian broadening σ (see broadened_density)."""
    with measuring(model):
        batches = as_batches(data, model_device(model))
        op = mean_loss_hessian(model, loss_fn, batches)
        nodes, weights = curvature.stochastic_lanczos_quadrature(
            op, num_iters=num_iters, num_runs=num_runs, generator=_generator(seed))
    return broadened_density(nodes, weights, sigma, sigma_rel, grid_points)


@dataclass
class AngleResult:
    angle_deg: float     # arccos |cos| in [0, 90]
    cos: float           # ĝ·v for the returned sign of v
    grad_norm: float
    lambda_max: float


def gradient_eigenvector_angle(model: nn.Module, loss_fn: LossFn, data: Iterable[Batch],
                               num_iters: Optional[int] = None, seed: int = 0,
                               eigenvector: Optional[Tensor] = None,
                               lambda_max: Optional[float] = None) -> AngleResult:
    """Angle between the full-data gradient ∇L and the top Hessian eigenvector v (X-SAM, Duan et
    al. 2026). v comes from Lanczos unless given; the angle uses |cos| since v's sign is arbitrary."""
    data = list(data)  # read twice: eigenvector, then gradient
    if eigenvector is None:
        eig = hessian_eigenvalues(model, loss_fn, data, k=1, num_iters=num_iters, return_vectors=True, seed=seed)
        eigenvector, lambda_max = eig.eigenvectors[:, 0], eig.eigenvalues[0]
    with measuring(model):
        batches = as_batches(data, model_device(model))
        g = mean_loss_hessian(model, loss_fn, batches).gradient()
    v = eigenvector.to(g)
    gn = float(g.norm())
    cos = float(torch.dot(g, v) / (gn * v.norm())) if gn > 0 else 0.0
    angle = math.degrees(math.acos(min(1.0, abs(cos))))
    return AngleResult(angle, cos, gn, float("nan") if lambda_max is None else float(lambda_max))

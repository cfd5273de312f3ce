"""m-sharpness: how much the loss can rise inside a small neighbourhood of the weights.

Following Andriushchenko, Croce, Müller, Hein & Flammarion, "A modern look at the relationship
between sharpness and generalization", ICML 2023 (their definitions, our solver):

    worst-case   S_max(w) = E_{chunks C of m samples} [ max_{‖T⁻¹δ‖_p ≤ ρ} L_C(w + δ) − L_C(w) ]
    average-case S_avg(w) = E_{z ~ N(0, I)} [ L(w + ρ·T z) − L(w) ]

with T = I (standard) or T = diag(|w|) (adaptive; Kwon et al., ICML 2021), p ∈ {2, ∞}. The inner
maximum is found by projected gradient ascent on u = T⁻¹δ from u = 0:

    p = 2:  u ← Π_{‖u‖₂≤ρ}(u + α·T∇L / ‖T∇L‖₂)      p = ∞:  u ← clip(u + α·sign(T∇L), −ρ, ρ)

α = 2.5ρ/steps (the usual PGD step of Madry et al., ICLR 2018); the largest loss seen along the
path is kept, so the estimate is a lower bound of the true maximum and is ≥ 0 by construction
(u = 0 is on the path). ‖·‖ is taken over all trainable parameters at once. Adaptive sharpness
is invariant to rescalings of a ReLU network that leave its function unchanged (each output
filter of a layer ×α, the matching inputs of the next layer ×1/α), since δ = T u scales with w.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
from torch import Tensor, nn

from .conventions import Batch, LossFn, as_batches, measuring, model_device, trainable

KINDS = ("worst", "average")
NORMS = ("l2", "linf")


@dataclass
class SharpnessResult:
    value: float            # mean over chunks (worst) or over noise samples (average)
    stderr: float           # standard error over chunks / samples (nan with one)
    kind: str
    norm: str
    adaptive: bool
    rho: float
    m: int                  # samples per perturbation
    loss: float             # L(w) over all the data
    per_chunk: list[float] = field(default_factory=list, repr=False)


def split_chunks(batches: list[Batch], m: Optional[int], batch_size: int) -> list[list[Batch]]:
    """Regroup samples into chunks of exactly m (the tail that does not fill a chunk is dropped),
    each chunk a list of sub-batches of at most ``batch_size`` samples. m=None: one chunk of all."""
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    n = len(y)
    m = n if m is None else int(m)
    if not 1 <= m <= n:
        raise ValueError(f"m (samples per perturbation) must be in [1, {n}] for {n} samples, got {m}")
    chunks = []
    for start in range(0, n - m + 1, m):
        xs, ys = x[start:start + m], y[start:start + m]
        chunks.append([(xs[i:i + batch_size], ys[i:i + batch_size]) for i in range(0, m, batch_size)])
    return chunks


def _loss_and_grad(model, loss_fn, chunk: list[Batch], params, need_grad: bool):
    """Mean loss of a chunk (float64) and, if asked, its gradient (list of tensors)."""
    n = sum(len(y) for _, y in chunk)
    loss = 0.0
    grads = [torch.zeros_like(p) for p in params] if need_grad else None
    for x, y in chunk:
        w = len(y) / n
        if need_grad:
            value = loss_fn(model(x), y)
            for acc, g in zip(grads, torch.autograd.grad(value, params, allow_unused=True)):
                if g is not None:
                    acc.add_(g, alpha=w)
        else:
            with torch.no_grad():
                value = loss_fn(model(x), y)
        loss += w * float(value.detach().double())
    return loss, grads


def _set(params, w0, scale, u) -> None:
    with torch.no_grad():
        for p, w, t, ui in zip(params, w0, scale, u):
            p.copy_(w + t * ui)


def _worst_case(model, loss_fn, chunk, params, w0, scale, rho, norm, steps, step_size) -> float:
    base, _ = _loss_and_grad(model, loss_fn, chunk, params, need_grad=False)
    u = [torch.zeros_like(p) for p in params]
    best = base
    for _ in range(steps):
        _set(params, w0, scale, u)
        loss, grads = _loss_and_grad(model, loss_fn, chunk, params, need_grad=True)
        best = max(best, loss)
        gu = [t * g for t, g in zip(scale, grads)]  # ∂L/∂u = T ∂L/∂w
        if norm == "l2":
            gnorm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in gu))
            if gnorm == 0:
                break
            u = [ui + (step_size / gnorm) * g for ui, g in zip(u, gu)]
            unorm = math.sqrt(sum(float(ui.double().pow(2).sum()) for ui in u))
            if unorm > rho:
                u = [ui * (rho / unorm) for ui in u]
        else:
            u = [(ui + step_size * g.sign()).clamp(-rho, rho) for ui, g in zip(u, gu)]
    _set(params, w0, scale, u)
    last, _ = _loss_and_grad(model, loss_fn, chunk, params, need_grad=False)
    return max(best, last) - base


def sharpness(model: nn.Module, loss_fn: LossFn, data: Iterable[Batch], rho: float,
              kind: str = "worst", norm: str = "l2", adaptive: bool = False,
              m: Optional[int] = 128, steps: int = 20, step_size: Optional[float] = None,
              n_samples: int = 20, batch_size: int = 256, seed: int = 0) -> SharpnessResult:
    """Worst-case m-sharpness (kind="worst") or average-case sharpness (kind="average"); see the
    module docstring. m: samples per perturbation (None: all samples in one chunk); steps and
    step_size: the projected ascent; n_samples: Gaussian draws (average-case); batch_size: forward
    passes are split into sub-batches of at most this many samples (same result, less memory).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if not rho > 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    if steps < 1 or n_samples < 1 or batch_size < 1:
        raise ValueError("steps, n_samples and batch_size must be >= 1")
    step_size = 2.5 * rho / steps if step_size is None else float(step_size)
    with measuring(model):
        batches = as_batches(data, model_device(model))
        params = trainable(model)
        w0 = [p.detach().clone() for p in params]
        scale = [w.abs() if adaptive else torch.ones_like(w) for w in w0]
        everything = split_chunks(batches, None, batch_size)[0]
        loss, _ = _loss_and_grad(model, loss_fn, everything, params, need_grad=False)
        if kind == "worst":
            chunks = split_chunks(batches, m, batch_size)
            values = [_worst_case(model, loss_fn, c, params, w0, scale, rho, norm, steps, step_size)
                      for c in chunks]
            m_used = sum(len(y) for _, y in chunks[0])
        else:
            gen = torch.Generator()
            gen.manual_seed(int(seed))
            values = []
            for _ in range(n_samples):
                z = [torch.randn(w.shape, generator=gen, dtype=w.dtype).to(w.device) for w in w0]
                _set(params, w0, scale, [rho * zi for zi in z])
                perturbed, _ = _loss_and_grad(model, loss_fn, everything, params, need_grad=False)
                values.append(perturbed - loss)
            m_used = sum(len(y) for _, y in everything)
    v = torch.tensor(values, dtype=torch.float64)
    stderr = float(v.std(unbiased=True) / math.sqrt(len(v))) if len(v) > 1 else float("nan")
    return SharpnessResult(float(v.mean()), stderr, kind, norm, adaptive, float(rho), m_used, loss,
                           [float(x) for x in values])

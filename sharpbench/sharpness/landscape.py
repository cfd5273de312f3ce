"""Loss landscapes: the loss along a line between two weight vectors, and on a 2-D plane.

    1-D   θ(t) = (1 − t)·θ_a + t·θ_b          (e.g. initialisation → final, run A → run B);
          θ holds the parameters and the floating-point buffers (BatchNorm running statistics),
          so each point is a complete eval-mode network; beyond [0, 1] the buffers are held at
          the nearer end (an extrapolated running variance can become negative).
    2-D   θ(α, β) = θ* + α·d₁ + β·d₂          d₁, d₂ filter-normalised (``directions``),
          a 21×21 grid over [−1, 1]² by default (the setting of Feldman 2025, Fig. 9).

Each grid point is one evaluation of the mean loss and accuracy over ``data`` (use a fixed,
un-augmented training subset: 441 points × 1,024 images for the default surface), in eval
mode, with the weights restored bit-identically afterwards. Results save to ``.npz``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..fileio import atomic_file
from .conventions import Batch, LossFn, as_batches, evaluate, measuring, model_device, trainable
from .directions import filter_normalized_directions


@dataclass
class Surface:
    alphas: np.ndarray          # [A]
    betas: np.ndarray           # [B]
    loss: np.ndarray            # [B, A] (row = β, column = α)
    acc: np.ndarray             # [B, A]
    meta: dict = field(default_factory=dict)


@dataclass
class Line:
    t: np.ndarray
    loss: np.ndarray
    acc: np.ndarray
    meta: dict = field(default_factory=dict)


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, leave=False)


def loss_surface(model: nn.Module, loss_fn: LossFn, data: Iterable[Batch],
                 directions: Optional[Sequence[Sequence[Tensor]]] = None, grid: int = 21,
                 span: float = 1.0, seed: int = 0, progress: bool = True) -> Surface:
    """Loss and accuracy on the (grid × grid) plane θ* + α d₁ + β d₂, α, β ∈ [−span, span]."""
    if grid < 2:
        raise ValueError(f"grid must be >= 2 points per axis, got {grid}")
    if not span > 0:
        raise ValueError(f"span must be > 0, got {span}")
    coords = np.linspace(-span, span, grid)
    loss = np.zeros((grid, grid))
    acc = np.zeros((grid, grid))
    with measuring(model):
        batches = as_batches(data, model_device(model))
        params = trainable(model)
        if directions is None:
            directions = filter_normalized_directions(model, seed=seed, count=2)
        d1, d2 = directions
        center = [p.detach().clone() for p in params]
        bar = _progress(grid * grid, "loss surface", progress)
        with torch.no_grad():
            for i, b in enumerate(coords):
                for j, a in enumerate(coords):
                    for p, c, u, v in zip(params, center, d1, d2):
                        p.copy_(c + float(a) * u + float(b) * v)
                    loss[i, j], acc[i, j] = evaluate(model, loss_fn, batches)
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
    return Surface(coords, coords.copy(), loss, acc,
                   {"grid": grid, "span": float(span), "directions_seed": int(seed),
                    "samples": int(sum(len(y) for _, y in batches))})


def _float_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v for k, v in model.state_dict(keep_vars=True).items() if torch.is_floating_point(v)}


def loss_line(model: nn.Module, loss_fn: LossFn, data: Iterable[Batch],
              start: Mapping[str, Tensor], end: Mapping[str, Tensor], points: int = 25,
              t_range: tuple[float, float] = (-0.25, 1.25), progress: bool = True) -> Line:
    """Loss and accuracy along θ(t) = (1−t)θ_a + tθ_b, θ = every floating-point entry of the
    state dict (``start``/``end`` are state dicts of the same architecture). Outside [0, 1] only
    the parameters are extrapolated; buffers (BatchNorm statistics) stay at the nearer end."""
    if points < 2:
        raise ValueError(f"points must be >= 2, got {points}")
    ts = np.linspace(t_range[0], t_range[1], points)
    loss, acc = np.zeros(points), np.zeros(points)
    with measuring(model):
        batches = as_batches(data, model_device(model))
        state = _float_state(model)
        param_names = {k for k, _ in model.named_parameters()}
        missing = [k for k in state if k not in start or k not in end]
        if missing:
            raise ValueError(f"start/end state dicts lack {missing[:5]} (different architectures?)")
        # copies: ``end`` is often model.state_dict(), whose tensors share the live weights' storage
        a = {k: start[k].detach().to(v, copy=True) for k, v in state.items()}
        b = {k: end[k].detach().to(v, copy=True) for k, v in state.items()}
        bar = _progress(points, "loss line", progress)
        with torch.no_grad():
            for i, t in enumerate(ts):
                for k, v in state.items():
                    # BatchNorm statistics are not extrapolated (a variance could turn negative)
                    s = float(t) if k in param_names else min(max(float(t), 0.0), 1.0)
                    v.copy_((1 - s) * a[k] + s * b[k])
                loss[i], acc[i] = evaluate(model, loss_fn, batches)
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
    return Line(ts, loss, acc, {"points": points, "t_range": list(t_range)})


def _atomic_npz(path: Path, **arrays) -> Path:
    path = Path(path)
    with atomic_file(path) as f:
        np.savez(f, **arrays)
    return path


def save_surface(path, surface: Surface) -> Path:
    return _atomic_npz(path, alphas=surface.alphas, betas=surface.betas, loss=surface.loss,
                       acc=surface.acc, meta=np.array(json.dumps(surface.meta)))


def load_surface(path) -> Surface:
    with np.load(path) as f:
        return Surface(f["alphas"], f["betas"], f["loss"], f["acc"], json.loads(str(f["meta"])))


def save_line(path, line: Line) -> Path:
    return _atomic_npz(path, t=line.t, loss=line.loss, acc=line.acc, meta=np.array(json.dumps(line.meta)))


def load_line(path) -> Line:
    with np.load(path) as f:
        return Line(f["t"], f["loss"], f["acc"], json.loads(str(f["meta"])))

"""Filter-normalised random directions (Li, Xu, Taylor, Studer & Goldstein, "Visualizing the loss
landscape of neural nets", NeurIPS 2018).

For every parameter tensor W with an output-filter axis (dim ≥ 2: conv kernels, linear weights)
a Gaussian direction D is drawn and each output filter is rescaled to the norm of the matching
weight filter:  D_i ← D_i · ‖W_i‖ / ‖D_i‖  (i indexes dim 0). One-dimensional parameters
(biases, BatchNorm scales and shifts) get a zero direction, as in the paper's default, and
buffers (BatchNorm running statistics) are never moved. This makes surfaces of networks with
different weight scales comparable.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .conventions import trainable


def filter_normalized_direction(model: nn.Module, generator: Optional[torch.Generator] = None) -> list[Tensor]:
    """One direction per trainable parameter (same shapes and order as ``trainable(model)``)."""
    out = []
    for w in trainable(model):
        w = w.detach()
        if w.dim() <= 1:
            out.append(torch.zeros_like(w))
            continue
        d = torch.randn(w.shape, generator=generator, dtype=torch.float32).to(device=w.device, dtype=w.dtype)
        w_norm = w.reshape(len(w), -1).norm(dim=1)
        d_norm = d.reshape(len(d), -1).norm(dim=1)
        factor = w_norm / d_norm.clamp_min(1e-10)
        out.append(d * factor.reshape(-1, *([1] * (w.dim() - 1))))
    return out


def filter_normalized_directions(model: nn.Module, seed: int = 0, count: int = 2) -> list[list[Tensor]]:
    """``count`` independent directions from one seed (the same seed gives the same Gaussian draws
    for every run of an architecture, so surfaces of several runs are drawn on comparable axes)."""
    gen = torch.Generator()
    gen.manual_seed(int(seed))
    return [filter_normalized_direction(model, gen) for _ in range(count)]

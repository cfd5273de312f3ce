"""Terms of SSAM-F's empirical Fisher diagonal, computed in batched passes.

For samples ``(x_i, y_i)``, ``i = 1..n``, and ``ℓ_i(w) = -log p(y_i | x_i; w)``:

- ``per_sample`` (the estimator of Mi et al., NeurIPS 2022, and of their released code, whose
  ``update_mask`` loops a ``batch_size=1`` loader)::

      S = Σ_i (∇ℓ_i(w))²                  (one squared gradient per sample)

  computed by one of three exact methods (the same result to rounding):
  ``method="loop"``, ``n`` single-sample backward passes (the authors' way);
  ``method="vmap"``, ``torch.func``: ``vmap`` over ``grad`` of a ``functional_call`` of the model
  on one sample, ``batch_size`` samples per vectorised pass; ``method="batched"``, one forward
  pass per chunk of ``batch_size`` samples and a batched backward (``is_grads_batched``, eval-mode
  BatchNorm only). ``method="auto"`` (default) picks the one measured fastest on the device
  type: the loop on CPU, ``vmap`` on a GPU (expected; see :func:`resolve_method`).
- ``chunked`` (cheaper; neither the SSAM paper nor its authors' code uses it; an explicit option)::

      S = Σ_chunks n_c · (∇ (1/n_c) Σ_{i∈c} ℓ_i(w))²      (squared chunk-mean gradients)

  which also contains the cross terms ``∇ℓ_i ⊙ ∇ℓ_j`` of each chunk.

``S / n`` is the Fisher diagonal estimate, computed in the parameters' precision (autocast
off). BatchNorm during the estimate (``bn``):

- ``eval`` (default): running statistics normalise each sample, so ``ℓ_i`` depends on sample
  ``i`` alone and the per-sample gradient is well defined; nothing is updated.
- ``train``: each sample is normalised by its *own* statistics (a batch of one, over its spatial
  positions), as the authors' ``batch_size=1`` loop in train mode does; running statistics are
  not updated here (their loop also overwrites them with these single-sample statistics, which
  we do not reproduce).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

ESTIMATORS = ("per_sample", "chunked")
BN_MODES = ("eval", "train")
METHODS = ("auto", "loop", "vmap", "batched")


def check_fisher_options(estimator: str, bn: str, batch_size: int, method: str = "auto") -> None:
    if method not in METHODS:
        raise ValueError(f"fisher_method must be one of {METHODS} (how per-sample gradients are "
                         f"computed; the result is the same), got {method!r}")
    if method == "batched" and bn != "eval":
        raise ValueError("fisher_method=batched backpropagates a whole chunk in one pass, so its "
                         "samples must not interact: it needs fisher_bn=eval (with fisher_bn=train "
                         "use fisher_method=loop or vmap)")
    if estimator not in ESTIMATORS:
        raise ValueError(f"fisher estimator must be one of {ESTIMATORS} (per_sample is the "
                         f"paper's and the authors'), got {estimator!r}")
    if bn not in BN_MODES:
        raise ValueError(f"fisher_bn must be one of {BN_MODES}, got {bn!r}")
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"fisher_batch_size must be a positive integer, got {batch_size}")


@contextmanager
def batch_statistics_only(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers normalise with the batch statistics and receive no running statistics at
    all (``track_running_stats = False``): inside ``vmap`` a running-statistics update could not be
    applied to the shared buffers."""
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    for m in layers:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in layers:
            m.track_running_stats = True


@contextmanager
def bn_mode(model: nn.Module, mode: str) -> Iterator[None]:
    """``eval``: the whole model in eval mode; ``train``: train mode with BatchNorm running
    statistics left alone. Each module's own mode is restored afterwards."""
    saved = [(m, m.training) for m in model.modules()]
    try:
        if mode == "eval":
            model.eval()
            yield
        else:
            model.train()
            with batch_statistics_only(model):
                yield
    finally:
        for m, training in saved:
            m.training = training


def _at_least_fp32(logits: Tensor) -> Tensor:
    """Logits in float32 (from bf16/fp16 autocast) or float64, for the loss."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _names_of(model: nn.Module, params: list[Tensor]) -> list[str]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    missing = [i for i, p in enumerate(params) if id(p) not in by_id]
    if missing:
        raise ValueError(f"{len(missing)} optimizer parameter(s) are not parameters of the model "
                         "given to the Fisher estimate; pass the model the optimizer trains")
    return [by_id[id(p)] for p in params]


def per_sample_squared_grads(model: nn.Module, params: list[Tensor], x: Tensor, y: Tensor,
                             batch_size: int = 32) -> list[Tensor]:
    """``Σ_i (∇_w ℓ_i)²`` for each tensor in ``params``, ``batch_size`` samples per vmap pass.

    The model's current train/eval mode is used as is (see :func:`bn_mode`)."""
    from torch.func import functional_call, grad, vmap

    names = _names_of(model, params)
    own = {n: p.detach() for n, p in zip(names, params)}
    rest = {n: p.detach() for n, p in model.named_parameters() if n not in own}
    rest.update(dict(model.named_buffers()))

    def sample_loss(weights: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        logits = functional_call(model, (weights, rest), (xi.unsqueeze(0),))
        return F.cross_entropy(_at_least_fp32(logits), yi.unsqueeze(0))

    per_sample_grad = vmap(grad(sample_loss), in_dims=(None, 0, 0), randomness="different")
    sums = [torch.zeros_like(p) for p in params]
    with torch.enable_grad():
        for xc, yc in zip(x.split(batch_size), y.split(batch_size)):
            grads = per_sample_grad(own, xc, yc)
            for s, n in zip(sums, names):
                g = grads[n]
                s.add_(torch.einsum("b...,b...->...", g, g).to(s.dtype))
    return sums


def looped_squared_grads(model: nn.Module, params: list[Tensor], x: Tensor,
                         y: Tensor) -> list[Tensor]:
    """``Σ_i (∇_w ℓ_i)²`` by one backward pass per sample (the authors' loop; ``.grad`` is not
    touched). On CPU this was faster than ``vmap`` (README, Fidelity)."""
    sums = [torch.zeros_like(p) for p in params]
    with torch.enable_grad():
        for i in range(len(y)):
            loss = F.cross_entropy(_at_least_fp32(model(x[i:i + 1])), y[i:i + 1])
            for s, g in zip(sums, torch.autograd.grad(loss, params, allow_unused=True)):
                if g is not None:
                    s.addcmul_(g, g)
    return sums


def batched_squared_grads(model: nn.Module, params: list[Tensor], x: Tensor, y: Tensor,
                          batch_size: int = 32) -> list[Tensor]:
    """``Σ_i (∇_w ℓ_i)²`` from one forward pass per chunk of ``batch_size`` samples and a batched
    backward: ``autograd.grad(ℓ, w, grad_outputs=I, is_grads_batched=True)`` gives row ``i`` of the
    per-sample Jacobian, ``∇ℓ_i``. Exact only when the samples do not interact in the forward pass
    (BatchNorm in eval mode), which :func:`check_fisher_options` enforces."""
    sums = [torch.zeros_like(p) for p in params]
    with torch.enable_grad():
        for xc, yc in zip(x.split(batch_size), y.split(batch_size)):
            losses = F.cross_entropy(_at_least_fp32(model(xc)), yc, reduction="none")
            eye = torch.eye(len(yc), device=losses.device, dtype=losses.dtype)
            grads = torch.autograd.grad(losses, params, grad_outputs=eye, is_grads_batched=True,
                                        allow_unused=True)
            for s, g in zip(sums, grads):
                if g is not None:
                    s.add_(torch.einsum("b...,b...->...", g, g).to(s.dtype))
    return sums


def resolve_method(method: str, device: torch.device) -> str:
    """``auto``: the exact per-sample method measured fastest on the device type
    (``scripts/measure_fisher_cost.py``, docs/fidelity.md): the loop on CPU; on a GPU, where
    small passes leave the device idle, ``vmap`` is expected to be faster (not measured here)."""
    if method != "auto":
        return method
    return "loop" if device.type == "cpu" else "vmap"


def chunked_squared_grads(model: nn.Module, params: list[Tensor], x: Tensor, y: Tensor,
                          batch_size: int = 64) -> list[Tensor]:
    """``Σ_chunks n_c · (∇ mean_{i∈c} ℓ_i)²`` (``.grad`` is not touched)."""
    sums = [torch.zeros_like(p) for p in params]
    with torch.enable_grad():
        for xc, yc in zip(x.split(batch_size), y.split(batch_size)):
            loss = F.cross_entropy(_at_least_fp32(model(xc)), yc)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for s, g in zip(sums, grads):
                if g is not None:
                    s.addcmul_(g, g, value=float(len(yc)))
    return sums


def fisher_terms(model: nn.Module, params: list[Tensor], x: Tensor, y: Tensor, *,
                 estimator: str = "per_sample", batch_size: int = 32, bn: str = "eval",
                 method: str = "auto") -> tuple[list[Tensor], int]:
    """``(S, n)`` for the samples ``x, y``: what an SSAM-F ``fisher_closure`` returns.

    Example (plain PyTorch)::

        opt.step(closure, fisher_closure=lambda: fisher_terms(model, opt.all_params(), xf, yf))
    """
    check_fisher_options(estimator, bn, batch_size, method)
    if len(x) != len(y):
        raise ValueError(f"Fisher samples and labels differ in number: {len(x)} vs {len(y)}")
    _names_of(model, params)       # every parameter must be the model's, whichever method runs
    # In the parameters' precision: autocast is switched off (it does not compose with vmap's
    # batch-norm rule on every device, and squared gradients are better kept in fp32).
    with bn_mode(model, bn), torch.autocast(device_type=x.device.type, enabled=False):
        method = resolve_method(method, x.device)
        if estimator == "per_sample" and method == "loop":
            sums = looped_squared_grads(model, params, x, y)
        elif estimator == "per_sample" and method == "batched":
            sums = batched_squared_grads(model, params, x, y, batch_size)
        elif estimator == "per_sample":
            sums = per_sample_squared_grads(model, params, x, y, batch_size)
        else:
            sums = chunked_squared_grads(model, params, x, y, batch_size)
    return sums, int(len(y))

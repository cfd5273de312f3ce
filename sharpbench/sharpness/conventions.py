"""What every sharpness measure shares: the model state it must not change, the data, the loss.

Conventions (every measure in this package follows them):

- the model is put in eval mode (BatchNorm uses its running statistics, dropout is off), so the
  quantity is a deterministic function of the weights;
- ``data`` is an iterable of ``(x, y)`` batches, read once into a list: the measured quantity is
  that of the mean loss over all samples, ``L(w) = Σ_b (n_b/N) L_b(w)``; pass a fixed,
  un-augmented subset of the training set (``sharpbench.analyze`` takes 1,024 images by default);
- sums over batches and probes are accumulated in float64;
- on exit the weights, BatchNorm buffers and train/eval flags are restored bit for bit
  (``measuring``), so a measure can run in the middle of training.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LossFn = Callable[[Tensor, Tensor], Tensor]
Batch = tuple[Tensor, Tensor]


@contextmanager
def measuring(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode inside; weights, buffers and every module's train flag restored bit-identically after."""
    saved = {name: t.detach().clone() for name, t in model.state_dict(keep_vars=True).items()}
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        with torch.no_grad():
            for name, t in model.state_dict(keep_vars=True).items():
                t.copy_(saved[name])
        for m, flag in flags.items():
            m.training = flag


def default_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy of a batch (no label smoothing)."""
    return F.cross_entropy(logits, y)


def model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    return torch.device("cpu")


def as_batches(data: Iterable[Batch], device: torch.device) -> list[Batch]:
    """Materialise ``data`` as a list of ``(x, y)`` on ``device``; refuses an empty iterable."""
    batches = [(x.to(device), y.to(device)) for x, y in data]
    if not batches or sum(len(y) for _, y in batches) == 0:
        raise ValueError("data is empty: pass an iterable of (x, y) batches with at least one sample")
    return batches


def batch_weights(batches: list[Batch]) -> list[float]:
    """ω_b = n_b / N, so Σ_b ω_b L_b is the mean loss over all samples."""
    total = sum(len(y) for _, y in batches)
    return [len(y) / total for _, y in batches]


def trainable(model: nn.Module) -> list[nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no parameter with requires_grad=True")
    return params


def loss_closures(model: nn.Module, loss_fn: LossFn, batches: list[Batch]) -> list[Callable[[], Tensor]]:
    """One closure per batch returning that batch's mean loss, with its graph."""
    return [(lambda x=x, y=y: loss_fn(model(x), y)) for x, y in batches]


@torch.no_grad()
def evaluate(model: nn.Module, loss_fn: LossFn, batches: list[Batch]) -> tuple[float, float]:
    """(mean loss, accuracy in %) over all samples, summed in float64; model as it is."""
    loss = torch.zeros((), dtype=torch.float64, device=batches[0][0].device)
    correct = torch.zeros((), dtype=torch.float64, device=loss.device)
    n = 0
    for x, y in batches:
        logits = model(x)
        loss += loss_fn(logits, y).double() * len(y)
        if logits.dim() == 2 and not torch.is_floating_point(y):
            correct += (logits.argmax(1) == y).double().sum()
        n += len(y)
    return float(loss) / n, 100.0 * float(correct) / n

"""Periodic and stochastic sharpness-aware steps (``sam_every``, ``sam_prob``): a switch of every
two-pass method, checked against a hand-written SAM/SGD loop in float64, across a resume, and on
every registered method that takes it."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sharpbench.bench import StepHarness
from sharpbench.optim import SAM, registry
from sharpbench.optim.base import SharpnessAwareOptimizer
from sharpbench.optim.factory import OptimizerConfigError, build_optimizer
from sharpbench.profiling import count_dispatch

DT = torch.float64
LR, MOMENTUM, WD, RHO = 0.1, 0.9, 5e-4, 0.2
SCHEDULED = [name for name, info in registry.methods().items()
             if info.cls is not None and issubclass(info.cls, SharpnessAwareOptimizer)
             and info.cls.takes_schedule]


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(DT)


def batches(n: int = 10):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 5, generator=g, dtype=DT), torch.randint(0, 3, (16,), generator=g))
            for _ in range(n)]


def reference(model: nn.Module, data, due) -> None:
    """SAM on the steps ``due(t)`` says, plain SGD (heavy ball, L2 weight decay at ``w``) on the
    others, written out by hand."""
    params = list(model.parameters())
    bufs = [None] * len(params)

    def grad():
        return torch.autograd.grad(F.cross_entropy(model(x), y), params)

    for t, (x, y) in enumerate(data):
        g = grad()
        if due(t):
            norm = torch.sqrt(sum((gi * gi).sum() for gi in g))
            saved = [p.detach().clone() for p in params]
            with torch.no_grad():
                for p, gi in zip(params, g):
                    p.add_(gi * (RHO / (norm + 1e-12)))
            g = grad()
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)
        with torch.no_grad():
            for i, (p, gi) in enumerate(zip(params, g)):
                d = gi + WD * p
                bufs[i] = d.clone() if bufs[i] is None else bufs[i].mul(MOMENTUM).add(d)
                p.sub_(LR * bufs[i])


def run_sam(model: nn.Module, data, opt=None, **schedule) -> tuple[SAM, int]:
    opt = opt or SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM,
                     weight_decay=WD, **schedule)
    calls = [0]
    for x, y in data:
        def closure():
            calls[0] += 1
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss
        opt.step(closure)
    return opt, calls[0]


def assert_same(a: nn.Module, b: nn.Module, tol: float = 1e-14) -> None:
    for p, q in zip(a.parameters(), b.parameters()):
        assert (p - q).abs().max().item() <= tol


def test_every_kth_step_is_sam_and_the_others_plain_sgd():
    data = batches(10)
    ours, ref = make_model(), make_model()
    opt, calls = run_sam(ours, data, sam_every=3)
    reference(ref, data, lambda t: t % 3 == 0)
    assert_same(ours, ref)
    assert calls == 10 + 4                                   # SAM at steps 0, 3, 6, 9
    assert opt.method_state["plain_steps"] == 6


def test_stochastic_steps_are_bernoulli_draws_of_the_seed_and_step():
    data = batches(12)
    ours, ref = make_model(), make_model()
    _, calls = run_sam(ours, data, sam_prob=0.4, sam_seed=7)

    def due(t):   # the rule of sharpbench.optim.sharpness_schedule, written out
        return random.Random(7 * 1_000_003 + t).random() < 0.4

    reference(ref, data, due)
    assert_same(ours, ref)
    n_sam = sum(due(t) for t in range(12))
    assert 0 < n_sam < 12 and calls == 12 + n_sam


def test_both_switches_together_and_the_default_is_every_step():
    data = batches(8)
    ours, ref = make_model(), make_model()
    run_sam(ours, data, sam_every=2, sam_prob=0.5, sam_seed=1)
    reference(ref, data, lambda t: t % 2 == 0 and random.Random(1_000_003 + t).random() < 0.5)
    assert_same(ours, ref)
    plain, ref2 = make_model(), make_model()
    _, calls = run_sam(plain, data)
    reference(ref2, data, lambda t: True)
    assert_same(plain, ref2) and calls == 16


def test_a_resumed_run_draws_the_same_steps():
    data = batches(10)
    whole = make_model()
    run_sam(whole, data, sam_every=2, sam_prob=0.7, sam_seed=3)
    first = make_model()
    opt, _ = run_sam(first, data[:4], sam_every=2, sam_prob=0.7, sam_seed=3)
    state = opt.state_dict()
    second = make_model()
    second.load_state_dict(first.state_dict())
    opt2 = SAM(second.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM,
               weight_decay=WD, sam_every=2, sam_prob=0.7, sam_seed=3)
    opt2.load_state_dict(state)
    run_sam(second, data[4:], opt=opt2)
    assert_same(second, whole, tol=0.0)


@pytest.mark.parametrize("bad, says", [({"sam_every": 0}, "sam_every"),
                                       ({"sam_every": 1.5}, "sam_every"),
                                       ({"sam_prob": 0.0}, "sam_prob"),
                                       ({"sam_prob": 1.2}, "sam_prob")])
def test_bad_values_are_refused_with_the_range(bad, says):
    with pytest.raises(OptimizerConfigError, match=says):
        build_optimizer(make_model(), {"name": "sam", "lr": 0.1, "rho": 0.05, **bad})


@pytest.mark.parametrize("method", SCHEDULED)
def test_every_two_pass_method_takes_plain_one_pass_steps_between(method):
    """With ``sam_every=2`` the odd steps are one pass at ``w`` and the base step, no extra
    closure (eigen-solve, Fisher pass) and no host sync, for every method that takes the switch."""
    h = StepHarness(method, "mlp1", 8, torch.device("cpu"))
    h.opt = build_optimizer(h.model, dict(h.cfg, sam_every=2))
    if hasattr(h.opt, "num_samples"):
        h.opt.num_samples = 8                # SSAM-F: a small Fisher estimate
    for t in range(6):
        passes, extra = h.passes, h.extra_calls
        with count_dispatch() as counts:
            h.counts = counts
            h.step()
            h.counts = None
        if t % 2:
            assert (h.passes - passes, h.extra_calls - extra, counts.syncs) == (1, 0, 0), t
    assert h.opt.method_state["plain_steps"] == 3
    assert all(torch.isfinite(p).all() for p in h.model.parameters())


def test_the_switch_is_a_key_of_every_two_pass_methods_config():
    from sharpbench.schema import yaml_defaults
    for method in SCHEDULED:
        cfg = yaml_defaults("optimizer", method)
        assert (cfg["sam_every"], cfg["sam_prob"]) == (1, 1.0), method

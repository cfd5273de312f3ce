"""Code written for davda54/sam runs with only its import changed, and gives their weights."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sharpbench.optim import SAM

DT = torch.float64
KW = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
STEPS = 8


def model_and_batches(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Flatten(), nn.Linear(64, 5)).to(DT)
    g = torch.Generator().manual_seed(seed + 1)
    batches = [(torch.randn(12, 3, 4, 4, generator=g, dtype=DT),
                torch.randint(0, 5, (12,), generator=g)) for _ in range(STEPS)]
    return model, batches


def davda54_reference(model, batches, rho, adaptive=False):
    """davda54/sam's SAM update (sam.py: first_step, second_step) written out by hand:
    e = rho·T²g/||T g|| with T = |w| (adaptive) or 1, then the base step at w with g(w + e)."""
    params = list(model.parameters())
    base = torch.optim.SGD(params, **KW)
    for x, y in batches:
        base.zero_grad()
        F.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            tg = [(p.abs() if adaptive else 1.0) * p.grad for p in params]
            scale = rho / (torch.stack([t.norm(2) for t in tg]).norm(2) + 1e-12)
            old = [p.detach().clone() for p in params]
            for p in params:
                p.add_((torch.pow(p, 2) if adaptive else 1.0) * p.grad * scale)
        base.zero_grad()
        F.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            for p, o in zip(params, old):
                p.copy_(o)
        base.step()


def max_diff(a, b):
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def test_their_readme_closure_usage_gives_their_weights():
    """Their README: ``loss.backward(); optimizer.step(closure); optimizer.zero_grad()`` with a
    closure that does not zero the gradients. The gradient held on entry must not be added to."""
    ours, batches = model_and_batches()
    theirs = copy.deepcopy(ours)
    optimizer = SAM(ours.parameters(), torch.optim.SGD, rho=0.05, **KW)
    for x, y in batches:
        def closure():
            loss = F.cross_entropy(ours(x), y)
            loss.backward()
            return loss
        loss = F.cross_entropy(ours(x), y)
        loss.backward()
        optimizer.step(closure)
        optimizer.zero_grad()
    davda54_reference(theirs, batches, rho=0.05)
    assert max_diff(ours, theirs) <= 1e-13


@pytest.mark.parametrize("adaptive, rho", [(False, 0.05), (True, 2.0)])
def test_their_first_step_second_step_example_with_only_the_import_changed(adaptive, rho):
    """Their example/train.py loop, adaptive=True included (their CIFAR rho for it is 2.0)."""
    ours, batches = model_and_batches(seed=3)
    theirs = copy.deepcopy(ours)
    base_optimizer = torch.optim.SGD
    optimizer = SAM(ours.parameters(), base_optimizer, rho=rho, adaptive=adaptive, **KW)
    for x, y in batches:
        F.cross_entropy(ours(x), y).backward()
        optimizer.first_step(zero_grad=True)
        F.cross_entropy(ours(x), y).backward()
        optimizer.second_step(zero_grad=True)
    davda54_reference(theirs, batches, rho=rho, adaptive=adaptive)
    assert max_diff(ours, theirs) <= 1e-13


def test_adaptive_is_asam_with_eta_zero_and_refuses_other_norms():
    from sharpbench.optim import ASAM
    a, batches = model_and_batches(seed=5)
    b = copy.deepcopy(a)
    sam = SAM(a.parameters(), torch.optim.SGD, rho=2.0, adaptive=True, **KW)
    asam = ASAM(b.parameters(), torch.optim.SGD, rho=2.0, eta=0.0, **KW)
    for x, y in batches[:3]:
        for model, opt in ((a, sam), (b, asam)):
            opt.step(lambda: F.cross_entropy(model(x), y).backward())
    assert max_diff(a, b) == 0
    with pytest.raises(ValueError, match="p=2"):
        SAM(a.parameters(), torch.optim.SGD, adaptive=True, p=1, **KW)

"""Parity with the authors' released code, and the per-sample Fisher of SSAM-F.

For each method, a reference written by hand from reading the authors' repository reproduces
*their* training step (their perturbation, their order of operations, their BatchNorm handling),
and sharpbench's optimizer, with the switches set to the authors' values, must agree with it to
float64 rounding over six steps of a small CNN with BatchNorm (train mode). The references share
only torch.optim.SGD (the base optimizer every one of these repositories wraps) and the model.

Aligned on purpose, and said where it happens: the constant added to a norm before dividing
(1e-12 here; the authors use 1e-12, 1e-16 or 1e-7), random draws (SSAM-D's masks), and two
side effects of the authors' SSAM-F mask refresh that sharpbench does not reproduce (see
``SSAMF``'s docstring). MSAM's authors hold the weights at the perturbed point between steps;
their reference moves them back at the end, as their ``main.py`` does before evaluating.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sharpbench.optim import GSAM, MSAM, SSAMD, SSAMF, FriendlySAM, ImbSAM, SAM, split_loss
from sharpbench.optim.bn import bn_policy_closure
from sharpbench.optim.factory import build_optimizer
from sharpbench.optim.fisher import fisher_terms

DT = torch.float64
EPS = 1e-12                      # the norm guard, aligned with sharpbench's
SGD_KW = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
STEPS = 6
TOL = 1e-13                      # max |difference| allowed after STEPS steps (weights ~0.1–1)
N_CLASSES = 5


def make_model(seed: int = 0, bn_momentum: float | None = 0.1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, momentum=bn_momentum),
                         nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, N_CLASSES)).to(DT)


def make_batches(n: int = STEPS, size: int = 12, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(size, 3, 4, 4, generator=g, dtype=DT)
        y = torch.randint(0, N_CLASSES, (size,), generator=g)
        y[:N_CLASSES] = torch.arange(N_CLASSES)
        out.append((x, y))
    return out


def assert_same_model(ours: nn.Module, theirs: nn.Module, buffers: bool = True) -> None:
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        diff = (a - b).abs().max().item()
        assert diff <= TOL, f"{name}: max |ours - theirs| = {diff:.3g}"
    if buffers:
        for (name, a), b in zip(ours.named_buffers(), theirs.buffers()):
            if a.is_floating_point():
                assert (a - b).abs().max().item() <= TOL, name
            else:
                assert torch.equal(a, b), f"{name}: {a} vs {b}"


def run_ours(opt, model, batches, bn_policy, extras=None, part_closure=False, tail=None):
    model.train()
    for t, (x, y) in enumerate(batches):
        if part_closure:
            def closure(part):
                opt.zero_grad()
                per = F.cross_entropy(model(x), y, reduction="none")
                loss = split_loss(per, y, tail, part)
                loss.backward()
                return loss
        else:
            def closure():
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss
        opt.step(bn_policy_closure(model, closure, bn_policy), **(extras(t) if extras else {}))


# -------------------------------------------------- the authors' BatchNorm switches (by hand)
def bn_layers(model):
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def set_bn_momentum_zero(model):       # davda54/sam example/utility/bypass_bn.py, nblt/F-SAM train.py
    for m in bn_layers(model):
        m.backup_momentum = m.momentum
        m.momentum = 0


def restore_bn_momentum(model):
    for m in bn_layers(model):
        if hasattr(m, "backup_momentum"):
            m.momentum = m.backup_momentum


def sq_norm(tensors):
    return sum((t * t).sum() for t in tensors)


# ------------------------------------------------------------------------- davda54/sam
def davda54_sam(model, batches, rho, adaptive=False):
    """davda54/sam ``sam.py`` (first_step / second_step) driven as its ``example/train.py``."""
    params = list(model.parameters())
    base = torch.optim.SGD(params, **SGD_KW)
    model.train()
    for x, y in batches:
        restore_bn_momentum(model)
        F.cross_entropy(model(x), y).backward()
        with torch.no_grad():                                   # first_step
            scaled = [(p.abs() if adaptive else 1.0) * p.grad for p in params]
            scale = rho / (sq_norm(scaled).sqrt() + EPS)
            old = [p.detach().clone() for p in params]
            for p in params:
                p.add_((p * p if adaptive else 1.0) * p.grad * scale)
        base.zero_grad()
        set_bn_momentum_zero(model)
        F.cross_entropy(model(x), y).backward()
        with torch.no_grad():                                   # second_step
            for p, o in zip(params, old):
                p.copy_(o)
        base.step()
        base.zero_grad()
    restore_bn_momentum(model)


def test_sam_matches_davda54_with_momentum_zero_bn():
    # momentum=None (cumulative averages): the BN counter the authors bump in the second pass
    # changes the running statistics, so first_pass would fail the buffer check.
    ours_m, batches = make_model(bn_momentum=None), make_batches()
    theirs = copy.deepcopy(ours_m)
    opt = SAM(ours_m.parameters(), torch.optim.SGD, rho=0.05, **SGD_KW)
    run_ours(opt, ours_m, batches, "momentum_zero")
    davda54_sam(theirs, batches, rho=0.05)
    assert_same_model(ours_m, theirs)
    assert int(ours_m[1].num_batches_tracked) == 2 * STEPS


def test_first_pass_policy_differs_from_davda54_only_in_bn_buffers():
    ours_m, batches = make_model(bn_momentum=None), make_batches()
    theirs = copy.deepcopy(ours_m)
    run_ours(SAM(ours_m.parameters(), torch.optim.SGD, rho=0.05, **SGD_KW), ours_m, batches,
             "first_pass")
    davda54_sam(theirs, batches, rho=0.05)
    assert_same_model(ours_m, theirs, buffers=False)        # BN mode never changes the gradients
    assert int(ours_m[1].num_batches_tracked) == STEPS
    assert not torch.allclose(ours_m[1].running_mean, theirs[1].running_mean)


def test_asam_eta_zero_is_davda54_adaptive_sam():
    ours_m, batches = make_model(), make_batches()
    theirs = copy.deepcopy(ours_m)
    opt = build_optimizer(ours_m, dict(name="asam", rho=0.5, eta=0.0, adaptive_params="all",
                                       **SGD_KW))
    run_ours(opt, ours_m, batches, "momentum_zero")
    davda54_sam(theirs, batches, rho=0.5, adaptive=True)
    assert_same_model(ours_m, theirs)


# ---------------------------------------------------------------------- SamsungLabs/ASAM
def samsung_asam(model, batches, rho, eta):
    """SamsungLabs/ASAM ``asam.py`` (ascent_step / descent_step) driven as ``example_cifar.py``
    (no BatchNorm handling: both passes update the running statistics)."""
    base = torch.optim.SGD(model.parameters(), **SGD_KW)
    named = list(model.named_parameters())
    model.train()
    for x, y in batches:
        F.cross_entropy(model(x), y).backward()
        with torch.no_grad():                                   # ascent_step
            t = {n: (p.abs() + eta if "weight" in n else None) for n, p in named}
            tg = {n: p.grad * t[n] if t[n] is not None else p.grad for n, p in named}
            norm = sq_norm(tg.values()).sqrt() + EPS
            eps = {n: (tg[n] * t[n] if t[n] is not None else tg[n]) * (rho / norm)
                   for n, _ in named}
            for n, p in named:
                p.add_(eps[n])
        base.zero_grad()
        F.cross_entropy(model(x), y).backward()
        with torch.no_grad():                                   # descent_step
            for n, p in named:
                p.sub_(eps[n])
        base.step()
        base.zero_grad()


def test_asam_matches_samsunglabs():
    ours_m, batches = make_model(), make_batches()
    theirs = copy.deepcopy(ours_m)
    opt = build_optimizer(ours_m, dict(name="asam", rho=0.5, eta=0.01, adaptive_params="weights",
                                       **SGD_KW))
    run_ours(opt, ours_m, batches, "both_passes")
    samsung_asam(theirs, batches, rho=0.5, eta=0.01)
    assert_same_model(ours_m, theirs)


# --------------------------------------------------------------------------- nblt/F-SAM
def fsam(model, batches, rho, sigma, lmbda):
    """nblt/F-SAM ``utils.py`` FriendlySAM.first_step / second_step, driven as its ``train.py``
    (momentum-0 BatchNorm in the second pass)."""
    params = list(model.parameters())
    base = torch.optim.SGD(params, **SGD_KW)
    ema = {}
    model.train()
    for x, y in batches:
        restore_bn_momentum(model)
        F.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            d = []
            for i, p in enumerate(params):
                g = p.grad.clone()
                if i not in ema:
                    ema[i] = g
                    d.append(g)
                else:
                    d.append(g - ema[i] * sigma)
                    ema[i] = ema[i] * lmbda + g * (1 - lmbda)
            scale = rho / (sq_norm(d).sqrt() + EPS)
            old = [p.detach().clone() for p in params]
            for p, di in zip(params, d):
                p.add_(di * scale)
        base.zero_grad()
        set_bn_momentum_zero(model)
        F.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            for p, o in zip(params, old):
                p.copy_(o)
        base.step()
        base.zero_grad()
    restore_bn_momentum(model)


def test_friendly_sam_matches_nblt():
    ours_m, batches = make_model(), make_batches()
    theirs = copy.deepcopy(ours_m)
    opt = FriendlySAM(ours_m.parameters(), torch.optim.SGD, rho=0.05, sigma=1.0, lmbda=0.95,
                      ema_order="subtract_previous", **SGD_KW)
    run_ours(opt, ours_m, batches, "momentum_zero")
    fsam(theirs, batches, rho=0.05, sigma=1.0, lmbda=0.95)
    assert_same_model(ours_m, theirs)


# ------------------------------------------------------------------- juntang-zhuang/GSAM
def gsam(model, batches, rho, alpha, adaptive):
    """juntang-zhuang/GSAM ``gsam/gsam.py`` (perturb_weights, gradient_decompose, unperturb;
    constant rho: rho_max = rho_min as in ``example/train.py``), second pass with BatchNorm
    momentum 0."""
    params = list(model.parameters())
    base = torch.optim.SGD(params, **SGD_KW)
    model.train()
    for x, y in batches:
        base.zero_grad()
        F.cross_entropy(model(x), y).backward()
        with torch.no_grad():                                   # perturb_weights
            norm = sq_norm([(p.abs() if adaptive else 1.0) * p.grad for p in params]).sqrt()
            scale = rho / (norm + EPS)
            old_g = [p.grad.clone() for p in params]
            e_w = [p.grad * scale * (p * p if adaptive else 1.0) for p in params]
            for p, e in zip(params, e_w):
                p.add_(e)
        set_bn_momentum_zero(model)
        base.zero_grad()
        F.cross_entropy(model(x), y).backward()
        with torch.no_grad():                                   # gradient_decompose
            inner = sum((a * p.grad).sum() for a, p in zip(old_g, params))
            new_norm = sq_norm([p.grad for p in params]).sqrt()
            old_norm = sq_norm(old_g).sqrt()
            cosine = inner / (new_norm * old_norm + EPS)
            for p, a, e in zip(params, old_g, e_w):
                vertical = a - cosine * old_norm * p.grad / (new_norm + EPS)
                p.grad.add_(vertical, alpha=-alpha)
                p.sub_(e)
        base.step()
        restore_bn_momentum(model)


@pytest.mark.parametrize("adaptive, rho, alpha", [(True, 2.0, 0.4), (False, 0.05, 0.1)],
                         ids=["example-at-HEAD", "plain"])
def test_gsam_matches_juntang_zhuang(adaptive, rho, alpha):
    ours_m, batches = make_model(), make_batches()
    theirs = copy.deepcopy(ours_m)
    opt = GSAM(ours_m.parameters(), torch.optim.SGD, rho=rho, gsam_alpha=alpha, adaptive=adaptive,
               **SGD_KW)
    run_ours(opt, ours_m, batches, "momentum_zero")
    gsam(theirs, batches, rho=rho, alpha=alpha, adaptive=adaptive)
    assert_same_model(ours_m, theirs)


# ----------------------------------------------------------------- cool-xuan/Imbalanced_SAM
TAIL = torch.tensor([False, False, False, True, True])    # classes 3 and 4 are tail


def imbsam(model, batches, rho, weight):
    """cool-xuan/Imbalanced_SAM ``imbsam.py`` (first/second/third_step) driven by
    ``utils/trainval.py``'s ``forbackward`` (tail loss × ``weight``; 2 at HEAD). Head and tail
    gradients at ``w`` come from one forward (``retain_graph``); no BatchNorm handling."""
    params = list(model.parameters())
    base = torch.optim.SGD(params, **SGD_KW)
    model.train()
    for x, y in batches:
        per = F.cross_entropy(model(x), y, reduction="none")
        tail = TAIL[y]
        (per[~tail].sum() / len(y)).backward(retain_graph=True)
        with torch.no_grad():                                   # first_step
            g_head = [p.grad.clone() for p in params]
        base.zero_grad()
        (per[tail].sum() / len(y) * weight).backward()
        with torch.no_grad():                                   # second_step
            scale = rho / (sq_norm([p.grad for p in params]).sqrt() + EPS)
            eps = [p.grad * scale for p in params]
            for p, e in zip(params, eps):
                p.add_(e)
        base.zero_grad()
        logits = model(x)
        (F.cross_entropy(logits[tail], y[tail], reduction="none").sum() / len(y) * weight).backward()
        with torch.no_grad():                                   # third_step
            for p, e, gh in zip(params, eps, g_head):
                p.sub_(e)
                p.grad.add_(gh)
        base.step()
        base.zero_grad()


def test_imbsam_matches_cool_xuan_with_tail_weight_2():
    ours_m, batches = make_model(), make_batches()
    theirs = copy.deepcopy(ours_m)
    opt = ImbSAM(ours_m.parameters(), torch.optim.SGD, rho=0.05, class_threshold=19,
                 tail_weight=2.0, **SGD_KW)
    run_ours(opt, ours_m, batches, "both_passes", part_closure=True, tail=TAIL)
    imbsam(theirs, batches, rho=0.05, weight=2.0)
    # Parameters only: their one forward at w for head and tail is two forwards here, so with
    # both_passes the running statistics see the batch at w twice (sharpbench/optim/bn.py).
    assert_same_model(ours_m, theirs, buffers=False)


# ------------------------------------------------------- Mi-Peng/Sparse-Sharpness-Aware-Minimization
STEPS_PER_EPOCH = 2


def fisher_samples(n=8, seed=5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, 4, 4, generator=g, dtype=DT),
            torch.randint(0, N_CLASSES, (n,), generator=g))


def mi_peng_fisher_mask(model, xf, yf, sparsity):
    """Their ``SSAMF.update_mask``: a batch_size=1 loop in train mode, sum of squared gradients,
    ``topk(int(d·(1-s)))``. Aligned: gradients zeroed before the first sample, running statistics
    not updated by these forwards (both side effects of theirs, not reproduced)."""
    params = list(model.parameters())
    fisher = [torch.zeros_like(p) for p in params]
    bns = bn_layers(model)
    for m in bns:
        m.track_running_stats = False
    for i in range(len(yf)):
        grads = torch.autograd.grad(F.cross_entropy(model(xf[i:i + 1]), yf[i:i + 1]), params)
        for f, g in zip(fisher, grads):
            f += g * g
    for m in bns:
        m.track_running_stats = True
    flat = torch.cat([f.reshape(-1) for f in fisher])
    keep = int(len(flat) * (1 - sparsity))
    mask = torch.zeros_like(flat)
    mask[torch.topk(flat, keep).indices] = 1.0
    return [m.view_as(p) for m, p in zip(torch.split(mask, [p.numel() for p in params]), params)]


def mi_peng_ssam(model, batches, rho, update_freq, mask, update_mask):
    """Their ``train_one_epoch`` + ``SSAMF/SSAMD.step``: gradient at w before ``step``;
    ``e = rho·g/||g||`` masked; both passes in train mode (BatchNorm updated twice). ``update_mask``
    is called at batch 0 of epochs divisible by ``update_freq``, after the step (SSAM-F) or between
    the perturbation and the second pass (SSAM-D), as their ``step`` methods do."""
    params = list(model.parameters())
    base = torch.optim.SGD(params, **SGD_KW)
    model.train()
    for t, (x, y) in enumerate(batches):
        epoch, batch_idx = divmod(t, STEPS_PER_EPOCH)
        due = epoch % update_freq == 0 and batch_idx == 0
        base.zero_grad()
        F.cross_entropy(model(x), y).backward()
        with torch.no_grad():                                   # first_step
            scale = rho / (sq_norm([p.grad for p in params]).sqrt() + EPS)
            e_w = [p.grad * scale * m for p, m in zip(params, mask)]
            for p, e in zip(params, e_w):
                p.add_(e)
        if due and update_mask.kind == "D":
            mask = update_mask(mask, [p.grad for p in params], epoch)
        base.zero_grad()
        F.cross_entropy(model(x), y).backward()
        with torch.no_grad():                                   # second_step
            for p, e in zip(params, e_w):
                p.sub_(e)
        base.step()
        if due and update_mask.kind == "F":
            mask = update_mask(mask, None, epoch)
    return mask


def test_ssam_f_matches_mi_peng():
    sparsity, update_freq = 0.7, 2
    ours_m, batches = make_model(), make_batches()
    theirs = copy.deepcopy(ours_m)
    xf, yf = fisher_samples()
    opt = SSAMF(ours_m.parameters(), torch.optim.SGD, rho=0.05, sparsity=sparsity,
                update_interval=update_freq, num_samples=len(yf), perturbation_norm="full",
                mask_rounding="floor", update_unit="epoch", steps_per_epoch=STEPS_PER_EPOCH,
                refresh_timing="next_step", **SGD_KW)
    params = list(ours_m.parameters())
    fc = lambda: fisher_terms(ours_m, params, xf, yf, batch_size=3, bn="train")  # noqa: E731
    run_ours(opt, ours_m, batches, "both_passes", extras=lambda t: {"fisher_closure": fc})

    def update_mask(mask, grads, epoch):
        return mi_peng_fisher_mask(theirs, xf, yf, sparsity)
    update_mask.kind = "F"
    zeros = [torch.zeros_like(p) for p in theirs.parameters()]
    final_mask = mi_peng_ssam(theirs, batches, 0.05, update_freq, zeros, update_mask)
    assert_same_model(ours_m, theirs)
    for p, m in zip(params, final_mask):
        assert torch.equal(opt.state[p]["mask"], m)
    assert opt.num_fisher_passes == 1 * 2          # refreshed after steps 0 and 4 (epochs 0, 2)


def test_ssam_d_matches_mi_peng():
    sparsity, drop_rate, update_freq, epochs = 0.6, 0.5, 1, STEPS // STEPS_PER_EPOCH
    ours_m, batches = make_model(), make_batches()
    theirs = copy.deepcopy(ours_m)
    opt = SSAMD(ours_m.parameters(), torch.optim.SGD, rho=0.05, sparsity=sparsity,
                update_interval=update_freq, drop_rate=drop_rate, seed=3, drop_schedule="cosine",
                total_epochs=epochs, perturbation_norm="full", mask_rounding="floor",
                update_unit="epoch", steps_per_epoch=STEPS_PER_EPOCH, refresh_timing="next_step",
                **SGD_KW)
    params = list(ours_m.parameters())
    d = sum(p.numel() for p in params)

    def draws(step):  # the random numbers are aligned: theirs come from the global torch.rand
        return torch.rand(d, generator=opt._generator(step, torch.device("cpu"))).to(DT)

    def split(flat):
        return [m.view_as(p) for m, p in zip(torch.split(flat, [p.numel() for p in params]),
                                             params)]

    live = d - math.ceil(d * sparsity)                     # their init_mask
    init = torch.zeros(d, dtype=DT)
    init[torch.topk(draws(-1), live).indices] = 1.0

    def update_mask(mask, grads, epoch):                   # their update_mask, 'gradient'/'random'
        flat_mask = torch.cat([m.reshape(-1) for m in mask])
        death = (torch.cat([g.abs().reshape(-1) for g in grads]) + 1e-7) * flat_mask
        rate = drop_rate * (1 + math.cos(math.pi * epoch / epochs)) / 2
        dense = d - d * sparsity
        n_death = int(min(dense * rate, d * sparsity))
        keep = torch.zeros(d, dtype=DT)
        keep[torch.topk(death, int(dense * (1 - rate))).indices] = 1.0
        growth = (draws(epoch * STEPS_PER_EPOCH) + 1e-7) * (1 - flat_mask)
        grow = torch.zeros(d, dtype=DT)
        grow[torch.topk(growth, n_death).indices] = 1.0
        return split(keep + grow)
    update_mask.kind = "D"

    run_ours(opt, ours_m, batches, "both_passes")
    final_mask = mi_peng_ssam(theirs, batches, 0.05, update_freq, split(init), update_mask)
    assert_same_model(ours_m, theirs)
    for p, m in zip(params, final_mask):
        assert torch.equal(opt.state[p]["mask"], m)


# ------------------------------------------------------------- the per-sample Fisher (SSAM-F)
def fisher_model() -> nn.Module:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.Conv2d(6, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 4 * 4, 10)).to(DT)
    with torch.no_grad():                                  # non-trivial running statistics
        for _ in range(3):
            model(torch.randn(32, 3, 8, 8, dtype=DT) * 2 + 0.5)
    return model


# ---------------------------------------------------------------------------- MarlonBecker/MSAM
def becker_msam(model, batches, rho):
    """MarlonBecker/MSAM ``optimizer/msam.py`` (``MSAM.step``) driven as its ``main.py``: the weights
    are held at the perturbed point between steps; the gradient there, plus weight decay of those
    perturbed weights, updates the momentum; then ``move_back_from_momentumAscent`` at the end."""
    params = list(model.parameters())
    lr, mu, wd = SGD_KW["lr"], SGD_KW["momentum"], SGD_KW["weight_decay"]
    bufs = [torch.zeros_like(p) for p in params]        # their __init__: zero momentum buffers
    inv_norm = 0.0                                      # group["inverse_norm_buffer"] = 0
    model.train()
    for x, y in batches:
        for p in params:
            p.grad = None
        F.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            for p, buf in zip(params, bufs):
                d_p = p.grad.add(p, alpha=wd)           # decay of the held (perturbed) weights
                p.add_(buf, alpha=rho * inv_norm)       # back to w
                buf.mul_(mu).add_(d_p)
                p.add_(buf, alpha=-lr)
            inv_norm = 1 / (torch.norm(torch.stack([b.norm(p=2) for b in bufs]), p=2) + EPS)
            for p, buf in zip(params, bufs):
                p.sub_(buf, alpha=rho * inv_norm)       # ascend to the next perturbed point
    with torch.no_grad():                               # move_back_from_momentumAscent
        for p, buf in zip(params, bufs):
            p.add_(buf, alpha=rho * inv_norm)


def test_msam_matches_marlonbecker_with_decay_at_the_perturbed_weights():
    ours_m, batches = make_model(), make_batches()
    theirs = copy.deepcopy(ours_m)
    opt = MSAM(ours_m.parameters(), torch.optim.SGD, rho=0.7, weight_decay_at="perturbed", **SGD_KW)
    run_ours(opt, ours_m, batches, "first_pass")        # one pass: it updates BN, as theirs does
    becker_msam(theirs, batches, 0.7)
    assert_same_model(ours_m, theirs)


def test_msam_default_decays_w_and_differs_from_the_authors_only_by_that():
    ours_m, batches = make_model(), make_batches()
    theirs = copy.deepcopy(ours_m)
    opt = MSAM(ours_m.parameters(), torch.optim.SGD, rho=0.7, **SGD_KW)
    run_ours(opt, ours_m, batches, "first_pass")
    becker_msam(theirs, batches, 0.7)
    diff = max((a - b).abs().max().item() for a, b in zip(ours_m.parameters(), theirs.parameters()))
    assert 1e-8 < diff < 1e-3       # wd·rho·lr-sized: the only difference is where decay reads w


def test_per_sample_fisher_equals_256_single_sample_backward_passes():
    model = fisher_model()
    params = list(model.parameters())
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 3, 8, 8, generator=g, dtype=DT), torch.randint(0, 10, (256,), generator=g)
    buffers = [b.clone() for b in model.buffers()]

    model.eval()                                           # the reference: 256 backward passes
    loop = [torch.zeros_like(p) for p in params]
    for i in range(256):
        for acc, gi in zip(loop, torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]),
                                                                     y[i:i + 1]), params)):
            acc += gi * gi
    model.train()

    sums, n = fisher_terms(model, params, x, y, batch_size=64, method="vmap")
    assert n == 256 and model.training
    for a, b in zip(sums, loop):
        assert (a - b).abs().max().item() <= 1e-10 * max(1.0, b.abs().max().item())
    looped, _ = fisher_terms(model, params, x[:16], y[:16], method="loop")
    automatic, _ = fisher_terms(model, params, x[:16], y[:16])          # auto: the loop on CPU
    for method in ("vmap", "batched"):
        other, _ = fisher_terms(model, params, x[:16], y[:16], batch_size=5, method=method)
        for a, b, c in zip(looped, other, automatic):
            assert (a - b).abs().max().item() <= 1e-12 * max(1.0, b.abs().max().item())
            assert torch.equal(a, c)
    for a, b in zip(model.buffers(), buffers):             # BatchNorm left alone
        assert torch.equal(a, b)

    def mask_of(closure_result):
        opt = SSAMF(params, torch.optim.SGD, sparsity=0.5, num_samples=256, lr=0.0)
        opt.refresh_mask(lambda: closure_result)
        return torch.cat([opt.state[p]["mask"].reshape(-1) for p in params])

    exact = mask_of((loop, 256))
    assert torch.equal(mask_of((sums, n)), exact)
    chunked = mask_of(fisher_terms(model, params, x, y, estimator="chunked", batch_size=64))
    assert not torch.equal(chunked, exact)                 # the chunked estimator is another mask


def test_fisher_options_are_checked():
    model = fisher_model()
    x, y = torch.randn(4, 3, 8, 8, dtype=DT), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="per_sample"):
        fisher_terms(model, list(model.parameters()), x, y, estimator="exact")
    with pytest.raises(ValueError, match="fisher_bn"):
        fisher_terms(model, list(model.parameters()), x, y, bn="frozen")
    with pytest.raises(ValueError, match="not parameters of the model"):
        fisher_terms(model, [nn.Parameter(torch.zeros(3, dtype=DT))], x, y)


# --------------------------------------------------------------- the switches reach the driver
@pytest.mark.parametrize("policy, counted", [("first_pass", 1), ("both_passes", 2),
                                             ("momentum_zero", 2)])
def test_module_applies_bn_policy_from_the_optimizer_config(policy, counted):
    from sharpbench.module import SharpnessModule
    model = make_model(bn_momentum=0.5)
    module = SharpnessModule(model, dict(name="sam", rho=0.05, bn_policy=policy, **SGD_KW),
                             dict(name="constant"), num_classes=N_CLASSES, epochs=1)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, **SGD_KW)
    x, y = make_batches(1)[0]
    before = model[1].running_mean.clone()
    opt.step(module.make_closure(opt, x, y))
    assert int(model[1].num_batches_tracked) == counted
    first_only = make_model(bn_momentum=0.5)
    first_only.train()
    first_only(x)                                          # one update from the batch at w
    moved_once = torch.allclose(model[1].running_mean, first_only[1].running_mean)
    assert moved_once == (policy != "both_passes")
    assert not torch.equal(model[1].running_mean, before)


@pytest.mark.parametrize("field, value, choices", [("bn_policy", "second_pass", "first_pass"),
                                                    ("fisher_estimator", "exact", "per_sample"),
                                                    ("fisher_bn", "frozen", "eval"),
                                                    ("fisher_method", "jvp", "vmap"),
                                                    ("fisher_method", "jvp", "batched")])
def test_bad_driver_fields_are_refused_with_the_choices(field, value, choices):
    from sharpbench.module import SharpnessModule
    from sharpbench.optim.factory import OptimizerConfigError
    cfg = dict(name="ssam_f", **{field: value})
    with pytest.raises(OptimizerConfigError, match=choices):
        build_optimizer(make_model(), cfg)
    if field == "bn_policy":  # the driver's field; the Fisher's are SSAM-F's own arguments
        with pytest.raises(ValueError, match=choices):
            SharpnessModule(make_model(), cfg, dict(name="constant"), num_classes=N_CLASSES,
                            epochs=1)


def test_factory_gives_epoch_facts_to_ssam_only_when_asked():
    context = {"steps_per_epoch": 7, "total_epochs": 3}
    opt = build_optimizer(make_model(), dict(name="ssam_d", update_unit="epoch",
                                             drop_schedule="cosine", **SGD_KW), context=context)
    assert (opt.steps_per_epoch, opt.total_epochs, opt.refresh_period) == (7, 3, 5 * 7)
    sam = build_optimizer(make_model(), dict(name="sam", **SGD_KW), context=context)
    assert isinstance(sam, SAM)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        SSAMF(make_model().parameters(), torch.optim.SGD, update_unit="epoch", **SGD_KW)


def test_fisher_terms_run_outside_autocast():
    # The Lightning module may call the Fisher closure inside a bf16 autocast region.
    model = fisher_model().float()
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 10, (6,))
    params = list(model.parameters())
    plain, _ = fisher_terms(model, params, x, y, batch_size=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under, _ = fisher_terms(model, params, x, y, batch_size=4)
    for a, b in zip(under, plain):
        assert a.dtype == torch.float32 and torch.equal(a, b)


# --------------------------------------------------------------------- dydjw9/Efficient_SAM
def dydjw9_esam(model, batches, rho, beta, gamma, seed):
    """dydjw9/Efficient_SAM ``utils/Esam.py`` (``ESAM.step``: first_step, the no-grad forward at
    w + e, the top-gamma selection, second_step) driven as its ``train.py`` with a per-sample
    cross-entropy; its module-level ``random`` is a ``random.Random(seed)`` here. BatchNorm in
    train mode throughout: all three forwards update the running statistics."""
    import random
    rnd = random.Random(seed)
    params = list(model.parameters())
    opt = torch.optim.SGD(params, **SGD_KW)
    state: dict = {}
    model.train()
    for x, y in batches:
        per = F.cross_entropy(model(x), y, reduction="none")
        l_before = per.clone().detach()
        per.mean().backward()
        with torch.no_grad():                                  # first_step
            have = [p for p in params if p.grad is not None]
            grad_norm = torch.norm(torch.stack([p.grad.norm(p=2) for p in have]), p=2)
            scale = rho / (grad_norm + 1e-7) / beta
            for p in params:
                p.requires_grad = True
                if p.grad is None:
                    continue
                e_w = p.grad * scale.to(p)
                p.add_(e_w * 1)
                state[p] = e_w
        opt.zero_grad()
        with torch.no_grad():
            l_after = F.cross_entropy(model(x), y, reduction="none")
            sharpness = l_after - l_before
            position = int(len(y) * gamma)
            cutoff = torch.topk(sharpness, position)[0][-1]
            indices = [sharpness > cutoff]
        F.cross_entropy(model(x[indices]), y[indices], reduction="none").mean().backward()
        with torch.no_grad():                                  # second_step
            for p in params:
                if p.grad is None or p not in state:
                    continue
                p.sub_(state[p])
                state[p] = 0
                if rnd.random() > beta:
                    p.requires_grad = False
        opt.step()
        opt.zero_grad()
    for p in params:
        p.requires_grad = True


# their ``inputs[indices]`` with ``indices = [mask]`` (a list holding a boolean tensor): torch warns
# that this indexing is deprecated; it still selects the masked samples.
@pytest.mark.filterwarnings("ignore:Using a non-tuple sequence")
def test_esam_matches_dydjw9():
    from sharpbench.optim import ESAM
    from sharpbench.optim.context import StepContext
    ours_m, batches = make_model(), make_batches(n=8)
    theirs = copy.deepcopy(ours_m)
    opt = ESAM(ours_m.parameters(), torch.optim.SGD, rho=0.3, beta=0.6, gamma=0.5, swp_seed=4,
               **SGD_KW)

    drops = []

    def context(t):
        x, y = batches[t]
        drops.append(list(opt.method_state["swp_dropped"]))   # drawn out for this step

        def closure_of(reduce):
            def closure():
                opt.zero_grad()
                loss = reduce(F.cross_entropy(ours_m(x), y, reduction="none"), y)
                loss.backward()
                return loss
            return closure

        def per_sample_losses():
            with torch.no_grad():
                return F.cross_entropy(ours_m(x), y, reduction="none")

        def closure_on(index):
            def closure():
                opt.zero_grad()
                loss = F.cross_entropy(ours_m(x[index]), y[index])
                loss.backward()
                return loss
            return closure
        return {"context": StepContext(closure_of=closure_of, per_sample_losses=per_sample_losses,
                                       closure_on=closure_on)}

    run_ours(opt, ours_m, batches, "both_passes", extras=context)
    dydjw9_esam(theirs, batches, 0.3, 0.6, 0.5, seed=4)
    assert any(drops) and not all(drops), drops          # SWP dropped tensors on some steps
    assert_same_model(ours_m, theirs)


# ------------------------------------------------------------------------------ AngusDujw/SAF
def epochs_with_ids(epochs=4, n=24, size=12, seed=6):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 4, 4, generator=g, dtype=DT)
    y = torch.randint(0, N_CLASSES, (n,), generator=g)
    for epoch in range(epochs):
        order = torch.randperm(n, generator=g)
        for b in range(0, n, size):
            ids = order[b:b + size]
            yield epoch, ids, x[ids], y[ids]


def angusdujw_train(model, batches, reinforce, temperature, kl_start_epoch, minus_epoch=None,
                    ema_decay=None, n=24):
    """AngusDujw/SAF ``SAF_train.py`` (``minus_epoch`` given) or ``MESA_train.py`` (``ema_decay``
    given, with timm's ``ModelEmaV2``: a deep copy in eval mode, ``ema·decay + (1 − decay)·w``
    over the whole state_dict after every step) driven one step per batch. Their record of logits
    is a float32 numpy array; its softmax is taken in float64 here, as sharpbench does with float64
    logits (aligned). The model in train mode: its one forward updates BatchNorm."""
    opt = torch.optim.SGD(model.parameters(), **SGD_KW)
    train_logits = torch.zeros(n, (minus_epoch or 0) + 1, N_CLASSES, dtype=torch.float32)
    ema = None
    if ema_decay is not None:
        ema = copy.deepcopy(model)
        ema.eval()
    model.train()
    T = temperature
    for epoch, indices, x, target in batches:
        if ema is not None:
            with torch.no_grad():
                ema_output = ema(x)
        output = model(x)
        if minus_epoch is not None:
            train_logits[indices, epoch % (minus_epoch + 1)] = output.detach().float()
        loss = F.cross_entropy(output, target)
        if epoch > kl_start_epoch:
            if minus_epoch is not None:
                past = train_logits[indices, (epoch - minus_epoch) % (minus_epoch + 1)].to(DT)
            else:
                past = ema_output
            kl = F.kl_div(F.softmax(output / T, dim=1).log(), F.softmax(past / T, dim=1),
                          reduction="none").sum(-1).mean() * (T ** 2)
            loss = loss + kl * reinforce
        opt.zero_grad()
        loss.backward()
        opt.step()
        if ema is not None:
            with torch.no_grad():
                for e, m in zip(ema.state_dict().values(), model.state_dict().values()):
                    e.copy_(ema_decay * e + (1. - ema_decay) * m)


@pytest.mark.parametrize("name", ["saf", "mesa"])
def test_saf_and_mesa_match_angusdujw(name):
    from sharpbench.optim import MESA, SAF
    from sharpbench.optim.context import StepContext
    ours_m = make_model()
    theirs = copy.deepcopy(ours_m)
    batches = list(epochs_with_ids())
    if name == "saf":
        opt = SAF(ours_m.parameters(), torch.optim.SGD, lmbda=0.4, tau=2.0, kl_start_epoch=1,
                  past_epochs=1, **SGD_KW)
        their_kw = dict(minus_epoch=1)
    else:
        opt = MESA(ours_m.parameters(), torch.optim.SGD, lmbda=0.8, tau=3.0, kl_start_epoch=1,
                   ema_decay=0.9, **SGD_KW)
        their_kw = dict(ema_decay=0.9)
    ours_m.train()
    for epoch, ids, x, y in batches:
        def closure_with(term, x=x, y=y, ids=ids):
            def closure():
                opt.zero_grad()
                logits = ours_m(x)
                extra = term(logits, x, ids)
                loss = F.cross_entropy(logits, y)
                (loss if extra is None else loss + extra).backward()
                return loss
            return closure
        opt.step(lambda: None, context=StepContext(closure_with=closure_with, sample_ids=ids,
                                                   dataset_size=24, epoch=epoch, model=ours_m))
    angusdujw_train(theirs, batches, opt.lmbda, opt.tau, 1, **their_kw)
    assert_same_model(ours_m, theirs)

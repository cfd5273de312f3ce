"""FriendlySAM, SSAM-F, SSAM-D, ImbSAM, GSAM, LookSAM and MSAM against hand-written updates.

Each reference below is plain tensor math on a copy of the weights (gradients by autograd on a
hand-written forward), with a hand-written SGD (momentum 0.9, weight decay 5e-4) step; nothing in
it calls sharpbench.
"""
import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sharpbench.bench import optimizer_config
from sharpbench.optim import (GSAM, MSAM, SSAMD, SSAMF, FriendlySAM, ImbSAM, LookSAM, split_loss,
                              tail_class_mask)
from sharpbench.optim.factory import build_optimizer

DT = torch.float64
LR, MOM, WD = 0.1, 0.9, 5e-4
SGD_KW = dict(lr=LR, momentum=MOM, weight_decay=WD)
CONF = Path(__file__).resolve().parents[1] / "sharpbench" / "conf" / "optimizer"
CLASS_COUNTS = torch.tensor([100, 5, 50, 3])      # classes 1 and 3 are tail for threshold 10
THRESHOLD = 10


# ------------------------------------------------------------------------------ the problem
def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4)).to(DT)


def make_batches(n=4, size=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(size, 5, generator=g, dtype=DT)
        y = torch.randint(0, 4, (size,), generator=g)
        y[:4] = torch.arange(4)                       # every class (head and tail) in every batch
        out.append((x, y))
    return out


def fisher_data(n=8, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=DT), torch.randint(0, 4, (n,), generator=g)


def forward(ws, x):
    w1, b1, w2, b2 = ws
    return torch.tanh(x @ w1.T + b1) @ w2.T + b2


def grad_of(ws, x, y, weight=None):
    """∇ of mean CE (or of sum(weight·CE)/N) at ws."""
    ws = [w.detach().clone().requires_grad_(True) for w in ws]
    per = F.cross_entropy(forward(ws, x), y, reduction="none")
    loss = per.mean() if weight is None else (per * weight).sum() / len(y)
    return [g.detach() for g in torch.autograd.grad(loss, ws)], loss.detach()


def norm(gs):
    return torch.sqrt(sum((g * g).sum() for g in gs))


class RefSGD:
    """torch.optim.SGD's rule, written out: d = g + wd·w; buf = d, then mom·buf + d; w -= lr·buf."""

    def __init__(self):
        self.buf = None

    def step(self, ws, gs, lr=LR):
        ds = [g + WD * w for w, g in zip(ws, gs)]
        self.buf = [d.clone() for d in ds] if self.buf is None else \
            [MOM * b + d for b, d in zip(self.buf, ds)]
        return [w - lr * b for w, b in zip(ws, self.buf)]


def start(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_params(model, ws):
    for p, w in zip(model.parameters(), ws):
        torch.testing.assert_close(p.detach(), w, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------ the drivers
def closure_for(opt, model, x, y):
    if isinstance(opt, ImbSAM):
        tail = tail_class_mask(CLASS_COUNTS, opt.class_threshold)

        def closure(part):
            opt.zero_grad()
            per = F.cross_entropy(model(x), y, reduction="none")
            loss = split_loss(per, y, tail, part)
            loss.backward()
            return loss
        return closure

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return closure


def chunk_sizes(chunk):
    """Chunk sizes of successive Fisher calls: an int (constant) or a list (cycled)."""
    sizes = [chunk] if isinstance(chunk, int) else list(chunk)
    i = 0
    while True:
        yield sizes[i % len(sizes)]
        i += 1


def make_fisher_closure(opt, model, chunk, data=None):
    """Each call: zero grads, mean NLL over the next chunk of Fisher samples, return its size."""
    xf, yf = fisher_data() if data is None else data
    pos, sizes = 0, chunk_sizes(chunk)

    def fisher_closure():
        nonlocal pos
        n = next(sizes)
        opt.zero_grad()
        idx = torch.arange(pos, pos + n) % len(yf)
        pos += n
        F.cross_entropy(model(xf[idx]), yf[idx]).backward()
        return n
    return fisher_closure


def take_step(opt, model, batch, chunk=2):
    closure = closure_for(opt, model, *batch)
    if isinstance(opt, SSAMF):
        return opt.step(closure, fisher_closure=make_fisher_closure(opt, model, chunk))
    return opt.step(closure)


def set_mask(opt, model, flat_mask):
    """Put a hand-chosen mask into SSAM's documented state (``state[p]["mask"]``)."""
    offset = 0
    for p in model.parameters():
        n = p.numel()
        opt.state[p]["mask"] = flat_mask[offset:offset + n].view_as(p).to(DT)
        offset += n


# ------------------------------------------------------------------------------ FriendlySAM
def test_friendly_sam_matches_hand_written():
    rho, sigma, lam = 0.07, 0.8, 0.9
    model, batches = make_model(), make_batches()
    opt = FriendlySAM(model.parameters(), torch.optim.SGD, rho=rho, sigma=sigma, lmbda=lam, **SGD_KW)
    ws, sgd = start(model), RefSGD()
    m = [torch.zeros_like(w) for w in ws]
    for x, y in batches:
        g, loss_w = grad_of(ws, x, y)
        m = [lam * mi + (1 - lam) * gi for mi, gi in zip(m, g)]          # EMA first
        d = [gi - sigma * mi for gi, mi in zip(g, m)]
        e = [rho * di / norm(d) for di in d]
        g_p, _ = grad_of([w + ei for w, ei in zip(ws, e)], x, y)
        ws = sgd.step(ws, g_p)
        loss = take_step(opt, model, (x, y))
        torch.testing.assert_close(loss.detach(), loss_w)
        assert_params(model, ws)
    for p, mi in zip(model.parameters(), m):
        torch.testing.assert_close(opt.state[p]["ema"], mi)


# ------------------------------------------------------------------------------ SSAM-F
def ref_fisher_mask(ws, chunk, num_samples, sparsity):
    xf, yf = fisher_data()
    acc, seen, pos, calls, sizes = [torch.zeros_like(w) for w in ws], 0, 0, 0, chunk_sizes(chunk)
    while seen < num_samples:
        n = next(sizes)
        idx = torch.arange(pos, pos + n) % len(yf)
        pos += n
        g, _ = grad_of(ws, xf[idx], yf[idx])
        acc = [a + n * gi ** 2 for a, gi in zip(acc, g)]
        seen += n
        calls += 1
    flat = torch.cat([a.reshape(-1) for a in acc])
    k = math.floor((1 - sparsity) * flat.numel() + 0.5)
    mask = torch.zeros_like(flat)
    mask[flat.argsort(descending=True)[:k]] = 1.0
    out, off = [], 0
    for w in ws:
        out.append(mask[off:off + w.numel()].view_as(w))
        off += w.numel()
    return out, calls


@pytest.mark.parametrize("chunk", [1, 3, [3, 1, 2]], ids=["exact", "chunks3", "mixed"])
def test_ssam_f_matches_hand_written(chunk):
    rho, s, K, ns = 0.05, 0.6, 2, 5
    model, batches = make_model(), make_batches()
    opt = SSAMF(model.parameters(), torch.optim.SGD, rho=rho, sparsity=s, update_interval=K,
                num_samples=ns, **SGD_KW)
    ws, sgd, mask, passes = start(model), RefSGD(), None, 0
    for t, (x, y) in enumerate(batches):
        if t % K == 0:
            mask, calls = ref_fisher_mask(ws, chunk, ns, s)
            passes += calls
        g, _ = grad_of(ws, x, y)
        mg = [mi * gi for mi, gi in zip(mask, g)]
        e = [rho * v / norm(mg) for v in mg]
        g_p, _ = grad_of([w + ei for w, ei in zip(ws, e)], x, y)
        ws = sgd.step(ws, g_p)
        take_step(opt, model, (x, y), chunk=chunk)
        assert_params(model, ws)
        for p, mi in zip(model.parameters(), mask):
            assert torch.equal(opt.state[p]["mask"], mi)
    assert opt.num_fisher_passes == passes
    d = sum(p.numel() for p in model.parameters())
    assert sum(int(m.sum()) for m in opt.masks().values()) == math.floor((1 - s) * d + 0.5)


def test_ssam_f_picks_the_known_top_fisher_coordinates():
    # Logistic model W (2 classes × 6 features), W = 0: every sample's d log p / dW[c, j] is
    # ±0.5·x_j, so F[c, j] = 0.25·scale_j² for features x_j = ±scale_j. The top half (6 of 12)
    # are both rows of the features with scales 10, 5 and 3.
    scales = torch.tensor([10.0, 0.01, 5.0, 0.02, 3.0, 0.03], dtype=DT)
    g = torch.Generator().manual_seed(0)
    xf = torch.where(torch.rand(16, 6, generator=g) < 0.5, -1.0, 1.0).to(DT) * scales
    yf = torch.randint(0, 2, (16,), generator=g)
    model = nn.Linear(6, 2, bias=False).to(DT)
    nn.init.zeros_(model.weight)
    opt = SSAMF(model.parameters(), torch.optim.SGD, sparsity=0.5, num_samples=16, lr=0.0)
    opt.refresh_mask(make_fisher_closure(opt, model, 1, data=(xf, yf)))
    expected = torch.tensor([1, 0, 1, 0, 1, 0], dtype=DT).expand(2, 6)
    assert torch.equal(opt.state[model.weight]["mask"], expected)
    assert opt.num_fisher_passes == 16


def test_ssam_f_needs_fisher_closure_only_when_refreshing():
    model, batches = make_model(), make_batches()
    opt = SSAMF(model.parameters(), torch.optim.SGD, update_interval=2, num_samples=4, **SGD_KW)
    with pytest.raises(ValueError, match="fisher_closure"):
        opt.step(closure_for(opt, model, *batches[0]))
    take_step(opt, model, batches[0])                     # step 0: refresh
    opt.step(closure_for(opt, model, *batches[1]))        # step 1: no refresh, none needed
    with pytest.raises(ValueError, match="fisher_closure"):
        opt.step(closure_for(opt, model, *batches[2]))    # step 2: due again
    with pytest.raises(RuntimeError, match="refresh_mask"):  # hand-driven without a refresh
        closure_for(opt, model, *batches[2])()
        opt.first_step()


# ------------------------------------------------------------------------------ SSAM-D
def test_ssam_d_fixed_mask_matches_hand_written():
    rho = 0.05
    model, batches = make_model(), make_batches()
    d = sum(p.numel() for p in model.parameters())
    flat = (torch.arange(d) % 3 != 0).to(DT)              # a fixed mask; drop_rate 0 keeps it
    opt = SSAMD(model.parameters(), torch.optim.SGD, rho=rho, update_interval=1, drop_rate=0.0,
                **SGD_KW)
    set_mask(opt, model, flat)
    mask = [m.clone() for m in opt.masks().values()]
    ws, sgd = start(model), RefSGD()
    for x, y in batches[:3]:
        g, _ = grad_of(ws, x, y)
        mg = [mi * gi for mi, gi in zip(mask, g)]
        e = [rho * v / norm(mg) for v in mg]
        g_p, _ = grad_of([w + ei for w, ei in zip(ws, e)], x, y)
        ws = sgd.step(ws, g_p)
        take_step(opt, model, (x, y))
        assert_params(model, ws)


def test_ssam_d_drop_grow_keeps_the_count_and_drops_the_smallest_gradients():
    model, batches = make_model(), make_batches()
    d = sum(p.numel() for p in model.parameters())
    s, drop = 0.5, 0.25
    k = math.floor((1 - s) * d + 0.5)
    before = torch.zeros(d, dtype=torch.bool)
    before[torch.randperm(d, generator=torch.Generator().manual_seed(3))[:k]] = True
    opt = SSAMD(model.parameters(), torch.optim.SGD, sparsity=s, update_interval=3, drop_rate=drop,
                seed=7, **SGD_KW)
    set_mask(opt, model, before)
    g, _ = grad_of(start(model), *batches[0])
    take_step(opt, model, batches[0])                     # step 0: drop/grow with g at w
    after = torch.cat([m.reshape(-1) for m in opt.masks().values()]).bool()
    assert int(after.sum()) == k
    n_drop = math.floor(drop * k + 0.5)
    gabs = torch.cat([gi.reshape(-1) for gi in g]).abs()
    active = before.nonzero().squeeze(1)
    expected_drop = set(active[gabs[active].argsort()[:n_drop]].tolist())
    assert set((before & ~after).nonzero().squeeze(1).tolist()) == expected_drop
    grown = after & ~before
    assert int(grown.sum()) == n_drop and not (grown & before).any()
    for t in (1, 2):                                      # not due: the mask stays
        take_step(opt, model, batches[t])
        assert torch.equal(torch.cat([m.reshape(-1) for m in opt.masks().values()]).bool(), after)
    take_step(opt, model, batches[3])                     # step 3: due again, count kept
    assert int(sum(m.sum() for m in opt.masks().values())) == k


def test_ssam_d_growth_draws_depend_on_the_step():
    model, batches = make_model(), make_batches()
    d = sum(p.numel() for p in model.parameters())
    before = torch.arange(d) % 2 == 0
    grown = []
    for step in (0, 3):                                   # both due for K = 3
        m = copy.deepcopy(model)
        opt = SSAMD(m.parameters(), torch.optim.SGD, update_interval=3, seed=7, **SGD_KW)
        set_mask(opt, m, before)
        for p in m.parameters():
            opt.state[p]["step"] = step
        take_step(opt, m, batches[0])
        after = torch.cat([x.reshape(-1) for x in opt.masks().values()]).bool()
        grown.append(after & ~before)
    assert int(grown[0].sum()) == int(grown[1].sum()) > 0
    assert not torch.equal(grown[0], grown[1])


def test_ssam_d_masks_are_seeded():
    def masks_after(seed, steps=3):
        model, batches = make_model(), make_batches()
        opt = SSAMD(model.parameters(), torch.optim.SGD, update_interval=1, seed=seed, **SGD_KW)
        for b in batches[:steps]:
            take_step(opt, model, b)
        return torch.cat([m.reshape(-1) for m in opt.masks().values()]), opt

    a, opt = masks_after(0)
    b, _ = masks_after(0)
    c, _ = masks_after(1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert int(a.sum()) == opt.num_active == math.floor(0.5 * opt.num_params + 0.5)


# ------------------------------------------------------------------------------ ImbSAM
def test_tail_class_mask_and_split_loss():
    assert tail_class_mask(CLASS_COUNTS, 5).tolist() == [False, True, False, True]   # <= inclusive
    assert tail_class_mask(CLASS_COUNTS, 4).tolist() == [False, False, False, True]
    per = torch.tensor([1.0, 2.0, 3.0, 4.0])
    y = torch.tensor([0, 1, 2, 3])
    tail = tail_class_mask(CLASS_COUNTS, THRESHOLD)
    assert split_loss(per, y, tail, "head").item() == pytest.approx((1 + 3) / 4)
    assert split_loss(per, y, tail, "tail").item() == pytest.approx((2 + 4) / 4)


def test_imb_sam_head_and_tail_gradients_add_up_to_the_batch_gradient():
    model, (x, y) = make_model(), make_batches()[0]
    opt = ImbSAM(model.parameters(), torch.optim.SGD, class_threshold=THRESHOLD, **SGD_KW)
    closure = closure_for(opt, model, x, y)
    parts = {}
    for part in ImbSAM.closure_parts:
        loss = closure(part)
        parts[part] = (loss.detach(), [p.grad.clone() for p in model.parameters()])
    g, loss_b = grad_of(start(model), x, y)
    torch.testing.assert_close(parts["head"][0] + parts["tail"][0], loss_b)
    for gh, gt, gi in zip(parts["head"][1], parts["tail"][1], g):
        torch.testing.assert_close(gh + gt, gi)


def test_imb_sam_matches_hand_written():
    rho = 0.08
    model, batches = make_model(), make_batches()
    opt = ImbSAM(model.parameters(), torch.optim.SGD, rho=rho, class_threshold=THRESHOLD, **SGD_KW)
    assert opt.passes_per_step == 3
    ws, sgd = start(model), RefSGD()
    tail_classes = (CLASS_COUNTS <= THRESHOLD)
    for x, y in batches[:3]:
        is_tail = tail_classes[y].to(DT)
        g_head, l_head = grad_of(ws, x, y, weight=1 - is_tail)
        g_tail, l_tail = grad_of(ws, x, y, weight=is_tail)
        e = [rho * gt / norm(g_tail) for gt in g_tail]
        g_tail_p, _ = grad_of([w + ei for w, ei in zip(ws, e)], x, y, weight=is_tail)
        ws = sgd.step(ws, [a + b for a, b in zip(g_tail_p, g_head)])
        loss = take_step(opt, model, (x, y))
        torch.testing.assert_close(loss, l_head + l_tail)
        assert_params(model, ws)


# ------------------------------------------------------------------------------ GSAM
def gsam_reference(batches, rho_of_lr, lrs, alpha):
    ws, sgd = start(make_model()), RefSGD()
    for (x, y), lr in zip(batches, lrs):
        g, _ = grad_of(ws, x, y)
        e = [rho_of_lr(lr) * gi / norm(g) for gi in g]
        g_p, _ = grad_of([w + ei for w, ei in zip(ws, e)], x, y)
        unit_p = [v / norm(g_p) for v in g_p]
        along = sum((gi * u).sum() for gi, u in zip(g, unit_p))
        g_perp = [gi - along * u for gi, u in zip(g, unit_p)]
        ws = sgd.step(ws, [gp - alpha * v for gp, v in zip(g_p, g_perp)], lr=lr)
        yield ws


def test_gsam_matches_hand_written():
    rho, alpha = 0.05, 0.3
    model, batches = make_model(), make_batches()
    opt = GSAM(model.parameters(), torch.optim.SGD, rho=rho, alpha=alpha, **SGD_KW)
    ref = gsam_reference(batches, lambda lr: rho, [LR] * len(batches), alpha)
    for batch, ws in zip(batches, ref):
        take_step(opt, model, batch)
        assert_params(model, ws)


def test_gsam_rho_follows_the_learning_rate():
    rho_max, rho_min, alpha, lr_min = 0.1, 0.02, 0.2, 0.01
    lrs = [LR, 0.06, 0.03, 0.005]                          # the last is below lr_min: clipped
    model, batches = make_model(), make_batches()
    opt = GSAM(model.parameters(), torch.optim.SGD, rho=rho_max, alpha=alpha, rho_min=rho_min,
               lr_min=lr_min, **SGD_KW)

    def rho_of_lr(lr):
        return max(rho_min, rho_min + (rho_max - rho_min) * (lr - lr_min) / (LR - lr_min))

    ref = gsam_reference(batches, rho_of_lr, lrs, alpha)
    for batch, lr, ws in zip(batches, lrs, ref):
        for group in opt.param_groups:
            group["lr"] = lr
        take_step(opt, model, batch)
        assert opt.param_groups[0]["rho_t"] == pytest.approx(rho_of_lr(lr))
        assert_params(model, ws)


def test_gsam_alpha_names():
    model = make_model()
    opt = GSAM(model.parameters(), torch.optim.RMSprop, gsam_alpha=0.25, alpha=0.9, lr=1e-3)
    assert opt.param_groups[0]["gsam_alpha"] == 0.25 and opt.param_groups[0]["alpha"] == 0.9
    opt = GSAM(model.parameters(), torch.optim.SGD, alpha=0.3, lr=0.1)
    assert opt.param_groups[0]["gsam_alpha"] == 0.3
    assert GSAM(model.parameters(), lr=0.1).param_groups[0]["gsam_alpha"] == 0.1


# ------------------------------------------------------------------------------ all five
METHOD_FACTORIES = {
    "friendly_sam": lambda ps, base, kw: FriendlySAM(ps, base, rho=0.05, **kw),
    "ssam_f": lambda ps, base, kw: SSAMF(ps, base, update_interval=2, num_samples=4, **kw),
    "ssam_d": lambda ps, base, kw: SSAMD(ps, base, update_interval=2, seed=3, **kw),
    "imb_sam": lambda ps, base, kw: ImbSAM(ps, base, class_threshold=THRESHOLD, **kw),
    "gsam": lambda ps, base, kw: GSAM(ps, base, alpha=0.2, rho_min=0.01, lr_min=0.0, **kw),
}


@pytest.mark.parametrize("name", sorted(METHOD_FACTORIES))
def test_state_dict_round_trip(name):
    batches = make_batches()
    model = make_model()
    opt = METHOD_FACTORIES[name](model.parameters(), torch.optim.SGD, SGD_KW)
    for b in batches[:2]:
        take_step(opt, model, b)
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())

    fresh = make_model(seed=123)
    fresh_opt = METHOD_FACTORIES[name](fresh.parameters(), torch.optim.SGD, SGD_KW)
    fresh.load_state_dict(saved_model)
    fresh_opt.load_state_dict(saved_opt)
    for o, m in ((opt, model), (fresh_opt, fresh)):       # step 2: SSAM masks are due again
        for group in o.param_groups:
            group["lr"] = 0.05                            # as an LR scheduler would
        take_step(o, m, batches[2])
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(p, q)
    if hasattr(opt, "steps_taken"):
        assert fresh_opt.steps_taken == opt.steps_taken == 3
    a, b = opt.state_dict(), fresh_opt.state_dict()
    for key, st in a["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, b["state"][key][k]), (key, k)
    assert a["base_optimizer"]["state"].keys() == b["base_optimizer"]["state"].keys()


@pytest.mark.parametrize("base,kw", [(torch.optim.Adam, dict(lr=1e-3, weight_decay=5e-4)),
                                     (torch.optim.RMSprop, dict(lr=1e-3, alpha=0.99))],
                         ids=["adam", "rmsprop"])
@pytest.mark.parametrize("name", sorted(METHOD_FACTORIES))
def test_adaptive_base_optimizers(name, base, kw):
    if name == "gsam" and "alpha" in kw:
        make = lambda ps, b, k: GSAM(ps, b, gsam_alpha=0.2, **k)   # noqa: E731
    else:
        make = METHOD_FACTORIES[name]
    model, batches = make_model(), make_batches()
    opt = make(model.parameters(), base, kw)
    assert isinstance(opt.base_optimizer, base)
    before = start(model)
    loss = take_step(opt, model, batches[0])
    assert torch.isfinite(loss)
    assert any(not torch.equal(p, w) for p, w in zip(model.parameters(), before))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if base is torch.optim.RMSprop:
        assert opt.param_groups[0]["alpha"] == 0.99


CONFIG_CLASSES = {"friendly_sam": FriendlySAM, "ssam_f": SSAMF, "ssam_d": SSAMD,
                  "imb_sam": ImbSAM, "gsam": GSAM}


@pytest.mark.parametrize("name", sorted(CONFIG_CLASSES))
def test_config_composes_into_the_class(name):
    cfg = optimizer_config(name)
    assert cfg["name"] == name and cfg["base"] == "sgd" and cfg["lr"] == 0.1
    model = make_model()
    opt = build_optimizer(model, cfg)
    assert type(opt) is CONFIG_CLASSES[name]
    assert isinstance(opt.base_optimizer, torch.optim.SGD)
    group = opt.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"], group["nesterov"]) == \
        (0.1, 0.9, 5e-4, False)
    assert group["rho"] == 0.05
    # Every method hyperparameter in the file reaches the optimizer, also when overridden.
    overrides = {"friendly_sam": dict(sigma=0.5, lmbda=0.6),
                 "ssam_f": dict(sparsity=0.9, update_interval=3, num_samples=64),
                 "ssam_d": dict(sparsity=0.8, update_interval=2, drop_rate=0.1, seed=5),
                 "imb_sam": dict(class_threshold=7),
                 "gsam": dict(gsam_alpha=0.3, rho_min=0.01, lr_max=0.2, lr_min=0.001)}[name]
    opt = build_optimizer(model, {**cfg, **overrides})
    group = opt.param_groups[0]
    for key, value in overrides.items():
        got = group[key] if key in group else getattr(opt, key)
        assert got == value, key
    take_step(opt, model, make_batches()[0])


def test_gsam_config_with_rmsprop_keeps_both_alphas():
    cfg = optimizer_config("gsam")
    cfg = {**cfg, "base": "rmsprop", "lr": 1e-3, "alpha": 0.95, "gsam_alpha": 0.3}
    opt = build_optimizer(make_model(), cfg)
    assert isinstance(opt.base_optimizer, torch.optim.RMSprop)
    assert opt.param_groups[0]["alpha"] == 0.95 and opt.param_groups[0]["gsam_alpha"] == 0.3


# ------------------------------------------------------------------------------ LookSAM
@pytest.mark.parametrize("k, alpha", [(3, 0.7), (1, 0.5), (4, 0.0)])
def test_looksam_matches_hand_written(k, alpha):
    rho = 0.1
    model, batches = make_model(), make_batches(n=8)
    opt = LookSAM(model.parameters(), torch.optim.SGD, rho=rho, k=k, alpha=alpha, **SGD_KW)
    ws, sgd, unit_gv = start(model), RefSGD(), None
    calls = 0
    for t, (x, y) in enumerate(batches):
        g, loss_w = grad_of(ws, x, y)
        if t % k == 0:
            # 1e-12: the guard sharpbench adds to each denominator (aligned here)
            g_s, _ = grad_of([w + rho * gi / (norm(g) + 1e-12) for w, gi in zip(ws, g)], x, y)
            dot = sum((a * b).sum() for a, b in zip(g, g_s))
            g_v = [b - dot / (norm(g) ** 2 + 1e-12) * a for a, b in zip(g, g_s)]
            unit_gv = [v / (norm(g_v) + 1e-12) for v in g_v]
            calls += 2
        else:
            g_s = [gi + alpha * norm(g) * v for gi, v in zip(g, unit_gv)]
            calls += 1
        ws = sgd.step(ws, g_s)
        n = [0]

        def closure():
            n[0] += 1
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss
        loss = opt.step(closure)
        torch.testing.assert_close(loss.detach(), loss_w)
        assert n[0] == (2 if t % k == 0 else 1)
        assert_params(model, ws)


def test_looksam_resumes_with_its_direction():
    model, batches = make_model(), make_batches(n=6)
    whole = copy.deepcopy(model)
    opt_w = LookSAM(whole.parameters(), torch.optim.SGD, rho=0.1, k=3, **SGD_KW)
    for x, y in batches:
        take_step(opt_w, whole, (x, y))
    opt = LookSAM(model.parameters(), torch.optim.SGD, rho=0.1, k=3, **SGD_KW)
    for x, y in batches[:4]:
        take_step(opt, model, (x, y))
    state = copy.deepcopy(opt.state_dict())
    second = copy.deepcopy(model)
    opt2 = LookSAM(second.parameters(), torch.optim.SGD, rho=0.1, k=3, **SGD_KW)
    opt2.load_state_dict(state)
    for x, y in batches[4:]:
        take_step(opt2, second, (x, y))
    for p, q in zip(second.parameters(), whole.parameters()):
        assert torch.equal(p, q)


# ------------------------------------------------------------------------------ MSAM
@pytest.mark.parametrize("decay_at", ["w", "perturbed"])
def test_msam_matches_hand_written(decay_at):
    rho = 0.3
    model, batches = make_model(), make_batches(n=6)
    opt = MSAM(model.parameters(), torch.optim.SGD, rho=rho, weight_decay_at=decay_at, **SGD_KW)
    ws, buf = start(model), None
    for t, (x, y) in enumerate(batches):
        e = ([torch.zeros_like(w) for w in ws] if buf is None
             else [-rho * b / (norm(buf) + 1e-12) for b in buf])     # 1e-12: aligned
        g_p, loss_p = grad_of([w + ei for w, ei in zip(ws, e)], x, y)
        at = ws if decay_at == "w" else [w + ei for w, ei in zip(ws, e)]
        d = [g + WD * a for g, a in zip(g_p, at)]
        buf = [di.clone() for di in d] if buf is None else [MOM * b + di for b, di in zip(buf, d)]
        ws = [w - LR * b for w, b in zip(ws, buf)]
        loss = take_step(opt, model, (x, y))
        torch.testing.assert_close(loss.detach(), loss_p)
        assert_params(model, ws)


def test_msam_needs_momentum_and_runs_on_adamw():
    model = make_model()
    with pytest.raises(ValueError, match="momentum"):
        MSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.0)
    opt = MSAM(model.parameters(), torch.optim.AdamW, rho=0.5, lr=1e-3)
    for x, y in make_batches(n=3):
        take_step(opt, model, (x, y))
    assert all("exp_avg" in opt.base_optimizer.state[p] for p in model.parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ------------------------------------------------------------------------------ ESAM
def esam_context(opt, model, x, y):
    """What a driver offers ESAM: the first pass with its own reduction, each sample's loss
    (forward only) and a closure over chosen samples."""
    from sharpbench.optim.context import StepContext

    def closure_of(reduce):
        def closure():
            opt.zero_grad()
            loss = reduce(F.cross_entropy(model(x), y, reduction="none"), y)
            loss.backward()
            return loss
        return closure

    def per_sample_losses():
        with torch.no_grad():
            return F.cross_entropy(model(x), y, reduction="none")

    def closure_on(index):
        return closure_for(opt, model, x[index], y[index])
    return StepContext(closure_of=closure_of, per_sample_losses=per_sample_losses,
                       closure_on=closure_on)


@pytest.mark.parametrize("beta, gamma, sds_count, adaptive",
                         [(0.6, 0.5, "authors", False), (1.0, 0.5, "paper", False),
                          (0.5, 1.0, "authors", False), (0.7, 0.75, "authors", True)])
def test_esam_matches_hand_written(beta, gamma, sds_count, adaptive):
    """SWP: after each step one draw per tensor, u > beta drops it from the next perturbation
    (random.Random(swp_seed), in parameter order); e = rho/beta·g/(||g|| + 1e-7) over the kept
    tensors. SDS: the k - 1 (authors) or k (paper) samples whose loss rises most at w + e,
    k = floor(gamma·n); the base step with their mean gradient at w + e."""
    import random
    from sharpbench.optim import ESAM
    rho, seed = 0.2, 3
    model, batches = make_model(), make_batches(n=8)
    opt = ESAM(model.parameters(), torch.optim.SGD, rho=rho, beta=beta, gamma=gamma,
               sds_count=sds_count, adaptive=adaptive, swp_seed=seed, **SGD_KW)
    ws, sgd, rng, dropped = start(model), RefSGD(), random.Random(seed), set()
    for x, y in batches:
        g, loss_w = grad_of(ws, x, y)
        kept = [i for i in range(len(ws)) if i not in dropped]
        if kept:
            t = [ws[i].abs() if adaptive else torch.ones_like(ws[i]) for i in range(len(ws))]
            scale = rho / beta / (norm([t[i] * g[i] for i in kept]) + 1e-7)
            e = [t[i] ** 2 * g[i] * scale if i in kept else torch.zeros_like(g[i])
                 for i in range(len(ws))]
        else:
            e = [torch.zeros_like(gi) for gi in g]
        w_e = [w + ei for w, ei in zip(ws, e)]
        if gamma < 0.99:
            rise = F.cross_entropy(forward(w_e, x), y, reduction="none") - \
                F.cross_entropy(forward(ws, x), y, reduction="none")
            k = int(len(y) * gamma)
            keep = k - 1 if sds_count == "authors" else k
            chosen = sorted(sorted(range(len(y)), key=lambda i: -rise[i].item())[:keep])
            sel = torch.tensor(chosen)
        else:
            sel = torch.arange(len(y))
        g_s, _ = grad_of(w_e, x[sel], y[sel])
        ws = sgd.step(ws, g_s)
        dropped = {i for i in range(len(ws)) if rng.random() > beta}
        loss = opt.step(closure_for(opt, model, x, y), context=esam_context(opt, model, x, y))
        torch.testing.assert_close(loss.detach(), loss_w)
        assert_params(model, ws)
    assert opt.method_state["swp_dropped"] == sorted(dropped)


def test_esam_resumes_its_draws_and_refuses_bad_settings():
    from sharpbench.optim import ESAM
    batches = make_batches(n=6)
    a = make_model()
    oa = ESAM(a.parameters(), torch.optim.SGD, beta=0.5, swp_seed=1, **SGD_KW)
    for x, y in batches[:3]:
        oa.step(closure_for(oa, a, x, y), context=esam_context(oa, a, x, y))
    saved_model, saved_opt = copy.deepcopy(a.state_dict()), copy.deepcopy(oa.state_dict())
    b = make_model(seed=7)
    ob = ESAM(b.parameters(), torch.optim.SGD, beta=0.5, swp_seed=1, **SGD_KW)
    b.load_state_dict(saved_model)
    ob.load_state_dict(saved_opt)
    for x, y in batches[3:]:
        for o, m in ((oa, a), (ob, b)):
            o.step(closure_for(o, m, x, y), context=esam_context(o, m, x, y))
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    assert oa.method_state["swp_dropped"] == ob.method_state["swp_dropped"]
    for bad, match in ((dict(beta=0.0), "beta"), (dict(gamma=1.5), "gamma"),
                       (dict(sds_count="all"), "sds_count")):
        with pytest.raises(ValueError, match=match):
            ESAM(make_model().parameters(), torch.optim.SGD, **bad, **SGD_KW)
    opt = ESAM(a.parameters(), torch.optim.SGD, gamma=0.1, **SGD_KW)   # keeps 0 of 12
    x, y = batches[0]
    with pytest.raises(ValueError, match="keeps 0 of a batch of 12"):
        opt.step(closure_for(opt, a, x, y), context=esam_context(opt, a, x, y))
    with pytest.raises(ValueError, match="closure_of"):
        ESAM(a.parameters(), torch.optim.SGD, **SGD_KW).step(closure_for(opt, a, x, y))


# ------------------------------------------------------------------------------ SAF and MESA
def trajectory_context(opt, model, x, y, ids, epoch, n):
    """What a driver offers SAF/MESA: a closure with a loss term, the samples' ids, the epoch."""
    from sharpbench.optim.context import StepContext

    def closure_with(term):
        def closure():
            opt.zero_grad()
            logits = model(x)
            extra = term(logits, x, ids)
            loss = F.cross_entropy(logits, y)
            (loss if extra is None else loss + extra).backward()
            return loss
        return closure
    return StepContext(closure_with=closure_with, sample_ids=ids, dataset_size=n, epoch=epoch,
                       model=model)


def epochs_of_batches(epochs, n=12, size=4, seed=5):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 5, generator=g, dtype=DT), torch.randint(0, 4, (n,), generator=g)
    for epoch in range(epochs):
        order = torch.randperm(n, generator=g)
        for b in range(0, n, size):
            ids = order[b:b + size]
            yield epoch, ids, x[ids], y[ids]


def kl_by_hand(now, target, tau):
    """tau² · mean_i Σ_c p_c (log p_c − log q_c), p = softmax(target/tau), q = softmax(now/tau)."""
    p, q = torch.softmax(target / tau, 1), torch.softmax(now / tau, 1)
    return (p * (p.log() - q.log())).sum(1).mean() * tau ** 2


def test_saf_matches_hand_written():
    from sharpbench.optim import SAF
    lmbda, tau, start_epoch, past = 0.5, 2.0, 1, 1
    model = make_model()
    opt = SAF(model.parameters(), torch.optim.SGD, lmbda=lmbda, tau=tau, kl_start_epoch=start_epoch,
              past_epochs=past, **SGD_KW)
    ws, sgd = start(model), RefSGD()
    record = torch.zeros(past + 1, 12, 4, dtype=DT)
    steps_with_kl = 0
    for epoch, ids, x, y in epochs_of_batches(5):
        w = [v.detach().clone().requires_grad_(True) for v in ws]
        logits = forward(w, x)
        loss = F.cross_entropy(logits, y)
        total = loss
        if epoch > start_epoch:
            total = loss + lmbda * kl_by_hand(logits, record[(epoch - past) % (past + 1)][ids], tau)
            steps_with_kl += 1
        g = torch.autograd.grad(total, w)
        record[epoch % (past + 1)][ids] = logits.detach().float().double()   # kept in float32
        ws = sgd.step(ws, [gi.detach() for gi in g])
        out = opt.step(closure_for(opt, model, x, y),
                       context=trajectory_context(opt, model, x, y, ids, epoch, 12))
        torch.testing.assert_close(out.detach(), loss.detach())   # the cross-entropy alone
        assert_params(model, ws)
    assert steps_with_kl == 9
    torch.testing.assert_close(opt.method_state["record"].double(), record, rtol=0, atol=0)


def test_mesa_matches_hand_written():
    from sharpbench.optim import MESA
    lmbda, tau, start_epoch, decay = 0.7, 3.0, 0, 0.9
    model = make_model()
    opt = MESA(model.parameters(), torch.optim.SGD, lmbda=lmbda, tau=tau, kl_start_epoch=start_epoch,
               ema_decay=decay, **SGD_KW)
    ws, sgd = start(model), RefSGD()
    ema = [w.clone() for w in ws]
    for epoch, ids, x, y in epochs_of_batches(3):
        w = [v.detach().clone().requires_grad_(True) for v in ws]
        logits = forward(w, x)
        loss = F.cross_entropy(logits, y)
        total = loss + lmbda * kl_by_hand(logits, forward(ema, x), tau) if epoch > start_epoch \
            else loss
        g = torch.autograd.grad(total, w)
        ws = sgd.step(ws, [gi.detach() for gi in g])
        ema = [decay * e + (1 - decay) * v for e, v in zip(ema, ws)]
        opt.step(closure_for(opt, model, x, y),
                 context=trajectory_context(opt, model, x, y, ids, epoch, 12))
        assert_params(model, ws)
    for p, e in zip(opt.teacher.parameters(), ema):
        torch.testing.assert_close(p.detach(), e, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["saf", "mesa"])
def test_trajectory_methods_resume_exactly_and_refuse_bad_keys(name):
    from sharpbench.optim import MESA, SAF
    cls = {"saf": SAF, "mesa": MESA}[name]
    kw = dict(kl_start_epoch=0, **SGD_KW)
    batches = list(epochs_of_batches(4))
    a = make_model()
    oa = cls(a.parameters(), torch.optim.SGD, **kw)
    for epoch, ids, x, y in batches[:5]:
        oa.step(closure_for(oa, a, x, y), context=trajectory_context(oa, a, x, y, ids, epoch, 12))
    saved_model, saved_opt = copy.deepcopy(a.state_dict()), copy.deepcopy(oa.state_dict())
    b = make_model(seed=9)
    ob = cls(b.parameters(), torch.optim.SGD, **kw)
    b.load_state_dict(saved_model)
    ob.load_state_dict(saved_opt)
    for epoch, ids, x, y in batches[5:]:
        for o, m in ((oa, a), (ob, b)):
            o.step(closure_for(o, m, x, y), context=trajectory_context(o, m, x, y, ids, epoch, 12))
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    for bad, match in ((dict(lmbda=-1.0), "lmbda"), (dict(tau=0.0), "tau"),
                       (dict(kl_start_epoch=3, kl_end_epoch=2), "kl_end_epoch")):
        with pytest.raises(ValueError, match=match):
            cls(make_model().parameters(), torch.optim.SGD, **bad, **SGD_KW)
    x, y = batches[0][2:]
    with pytest.raises(ValueError, match="StepContext"):
        oa.step(closure_for(oa, a, x, y))


# ------------------------------------------------------------------------------ EG-SAM, OG-SAM
@pytest.mark.parametrize("lookahead_lr", [None, 0.03, 0.0])
def test_eg_sam_matches_hand_written(lookahead_lr):
    """w̃ = w + (rho/||g|| − eta)·g, eta the lr unless set; the step with ∇L(w̃); eta = 0 is SAM."""
    from sharpbench.optim import EGSAM
    rho = 0.2
    eta = LR if lookahead_lr is None else lookahead_lr
    model, batches = make_model(), make_batches(n=5)
    opt = EGSAM(model.parameters(), torch.optim.SGD, rho=rho, lookahead_lr=lookahead_lr, **SGD_KW)
    ws, sgd = start(model), RefSGD()
    for x, y in batches:
        g, loss_w = grad_of(ws, x, y)
        scale = rho / (norm(g) + 1e-12) - eta
        g_t, _ = grad_of([w + scale * gi for w, gi in zip(ws, g)], x, y)
        ws = sgd.step(ws, g_t)
        loss = opt.step(closure_for(opt, model, x, y))
        torch.testing.assert_close(loss.detach(), loss_w)
        assert_params(model, ws)


def test_og_sam_matches_hand_written_and_resumes():
    """One pass: w̃_t = w_t + (rho/||ĝ_{t−1}|| − lr)·ĝ_{t−1} (w̃_0 = w_0), ĝ_t = ∇L(w̃_t) is the
    step's gradient and the next extrapolation's."""
    from sharpbench.optim import OGSAM
    from sharpbench.optim.context import StepContext
    rho = 0.2
    model, batches = make_model(), make_batches(n=6)
    opt = OGSAM(model.parameters(), torch.optim.SGD, rho=rho, **SGD_KW)
    ws, sgd, prev = start(model), RefSGD(), None
    for t, (x, y) in enumerate(batches):
        if prev is None:
            w_t = ws
        else:
            scale = rho / (norm(prev) + 1e-12) - LR
            w_t = [w + scale * gi for w, gi in zip(ws, prev)]
        g_t, loss_t = grad_of(w_t, x, y)
        ws, prev = sgd.step(ws, g_t), g_t
        calls = [0]

        def closure():
            calls[0] += 1
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss
        ctx = StepContext()
        loss = opt.step(closure, context=ctx)
        assert calls[0] == 1 and ctx.loss_is_perturbed == (t > 0)
        torch.testing.assert_close(loss.detach(), loss_t)
        assert_params(model, ws)
        if t == 2:                              # resume from a state_dict mid-run
            saved_m, saved_o = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
            model = make_model(seed=4)
            opt = OGSAM(model.parameters(), torch.optim.SGD, rho=rho, **SGD_KW)
            model.load_state_dict(saved_m)
            opt.load_state_dict(saved_o)

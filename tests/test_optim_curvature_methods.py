"""A²SAM, X-SAM and HATAM against independent hand-written updates.

The references below use plain tensor math on one flat parameter vector: the explicit Hessian
(torch.autograd.functional.hessian) with torch.linalg.eigh, a dense matrix inverse, and
hand-written SGD/Adam/HATAM steps, so they share no code with sharpbench's Lanczos, power
iteration, Woodbury formula or optimizers.
"""
import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.autograd.functional import hessian

from sharpbench.bench import optimizer_config
from sharpbench.optim import A2SAM, HATAM, METHODS, XSAM
from sharpbench.optim.a2sam import ellipsoid_inverse_apply
from sharpbench.optim.factory import build_optimizer

DT = torch.float64
CONF = Path(__file__).resolve().parents[1] / "sharpbench" / "conf" / "optimizer"


# ------------------------------------------------------------------------------ the problem
def tiny_model(seed=2):
    """tanh MLP 3 -> 4 -> 2 in float64, 26 parameters, no BatchNorm."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)


def batches(n, seed=0, size=8):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, generator=g, dtype=DT), torch.randint(0, 2, (size,), generator=g))
            for _ in range(n)]


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def ref_loss(theta, x, y):
    """The same MLP written by hand on a flat vector (order: W1, b1, W2, b2)."""
    W1, b1 = theta[:12].view(4, 3), theta[12:16]
    W2, b2 = theta[16:24].view(2, 4), theta[24:26]
    z = torch.tanh(x @ W1.T + b1) @ W2.T + b2
    return (z.logsumexp(1) - z.gather(1, y[:, None]).squeeze(1)).mean()


def ref_grad(theta, x, y):
    t = theta.detach().clone().requires_grad_(True)
    return torch.autograd.grad(ref_loss(t, x, y), t)[0]


def ref_hessian(theta, x, y):
    return hessian(lambda t: ref_loss(t, x, y), theta.detach().clone())


def closures(model, opt, x, y, counter=None):
    def closure():
        if counter is not None:
            counter["closure"] += 1
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    def loss_closure():
        if counter is not None:
            counter["loss_closure"] += 1
        return nn.functional.cross_entropy(model(x), y)
    return closure, loss_closure


# --------------------------------------------------------------------- hand-written base steps
class RefSGD:
    def __init__(self, lr=0.1, momentum=0.9, weight_decay=5e-4):
        self.lr, self.mu, self.wd, self.buf = lr, momentum, weight_decay, None

    def __call__(self, theta, g):
        d = g + self.wd * theta
        self.buf = d.clone() if self.buf is None else self.mu * self.buf + d
        return theta - self.lr * self.buf


class RefAdam:
    def __init__(self, lr=0.01, b1=0.9, b2=0.999, eps=1e-8):
        self.lr, self.b1, self.b2, self.eps = lr, b1, b2, eps
        self.m = self.v = None
        self.t = 0

    def __call__(self, theta, g):
        if self.m is None:
            self.m, self.v = torch.zeros_like(g), torch.zeros_like(g)
        self.t += 1
        self.m = self.b1 * self.m + (1 - self.b1) * g
        self.v = self.b2 * self.v + (1 - self.b2) * g * g
        m_hat = self.m / (1 - self.b1 ** self.t)
        v_hat = self.v / (1 - self.b2 ** self.t)
        return theta - self.lr * m_hat / (v_hat.sqrt() + self.eps)


BASES = {
    "sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=5e-4), RefSGD),
    "adam": (torch.optim.Adam, dict(lr=0.01), RefAdam),
}


# ------------------------------------------------------------------------ reference methods
def ref_a2sam(theta, data, rho, alpha, k, interval, base):
    theta, stale, lam, V = theta.clone(), None, None, None
    d = theta.numel()
    for t, (x, y) in enumerate(data):
        if t % interval == 0:
            evals, evecs = torch.linalg.eigh(ref_hessian(theta, x, y))
            lam, V = evals[-k:].clamp(min=0), evecs[:, -k:]
        if stale is None:  # step 0: plain SAM
            g = ref_grad(theta, x, y)
            e = rho * g / g.norm()
        else:
            A = torch.eye(d, dtype=DT) + alpha * V @ torch.diag(lam) @ V.T
            u = torch.linalg.solve(A, stale)
            e = rho * u / torch.sqrt(stale @ u)
            assert torch.allclose(e @ A @ e, torch.tensor(rho ** 2, dtype=DT))
        g_p = ref_grad(theta + e, x, y)
        theta = base(theta, g_p)
        stale = g_p
    return theta


def ref_xsam(theta, data, rho, alpha, freq, base, top="magnitude"):
    theta, v = theta.clone(), None
    for t, (x, y) in enumerate(data):
        if t % freq == 0:
            evals, evecs = torch.linalg.eigh(ref_hessian(theta, x, y))
            if top == "magnitude":
                order = evals.abs().argsort(descending=True)
                assert evals[order[1]].abs() < 0.9 * evals[order[0]].abs()  # power iteration converges
                v = evecs[:, order[0]]
            else:
                v = evecs[:, -1]
        g = ref_grad(theta, x, y)
        g_p = ref_grad(theta + rho * g / g.norm(), x, y)
        theta = base(theta, g_p - alpha * (g_p @ v) * v)
    return theta


def run(opt_cls, data, model, counter=None, **kwargs):
    opt = opt_cls(model.parameters(), **kwargs)
    for x, y in data:
        closure, loss_closure = closures(model, opt, x, y, counter)
        if isinstance(opt, (A2SAM, XSAM)):
            opt.step(closure, loss_closure=loss_closure)
        else:
            opt.step(closure)
    return opt


# ============================================================================== A²SAM
def test_woodbury_inverse_equals_dense_inverse():
    gen = torch.Generator().manual_seed(0)
    d, k, alpha = 30, 4, 0.7
    V, _ = torch.linalg.qr(torch.randn(d, k, generator=gen, dtype=DT))
    lam = torch.tensor([5.0, 2.0, 0.3, -1.0], dtype=DT)  # the negative one is clamped to 0
    g = torch.randn(d, generator=gen, dtype=DT)
    dense = torch.eye(d, dtype=DT) + alpha * V @ torch.diag(lam.clamp(min=0)) @ V.T
    expected = torch.linalg.inv(dense) @ g
    got = ellipsoid_inverse_apply(g, V, lam, alpha)
    assert torch.allclose(got, expected, atol=1e-12)
    # the per-tensor form (row blocks of V) gives the same vector
    sizes = [7, 20, 3]
    blocks = ellipsoid_inverse_apply(list(g.split(sizes)), list(V.split(sizes)), lam, alpha)
    assert torch.allclose(torch.cat(blocks), expected, atol=1e-12)


@pytest.mark.parametrize("base,solver", [("sgd", "lanczos"), ("adam", "lanczos"), ("sgd", "block"),
                                         ("adam", "block")])
def test_a2sam_matches_hand_written_update(base, solver):
    base_cls, base_kwargs, ref_base = BASES[base]
    data = batches(5, seed=1)
    model = tiny_model()
    theta0 = flat(model)
    hp = dict(rho=0.1, alpha=2.0, k=3, interval=2)
    # each solve run to the exact eigenpairs (26 = the dimension; the block solver to a residual
    # of 1e-10, warm-started from the previous solve's eigenvectors from step 2 on)
    run(A2SAM, data, model, base_optimizer=base_cls, lanczos_iters=26, solver=solver,
        lanczos_tol=None if solver == "lanczos" else 1e-10, **hp, **base_kwargs)
    expected = ref_a2sam(theta0, data, base=ref_base(), **hp)
    assert torch.allclose(flat(model), expected, rtol=0, atol=1e-9)
    # and the method is not vacuous: plain SAM on the same data ends elsewhere
    sam_like = ref_a2sam(theta0, data, rho=0.1, alpha=0.0, k=3, interval=2, base=ref_base())
    assert (sam_like - expected).abs().max() > 1e-5


def test_a2sam_counters_and_returned_loss():
    data = batches(5, seed=3)
    model = tiny_model()
    counter = {"closure": 0, "loss_closure": 0}
    opt = A2SAM(model.parameters(), torch.optim.SGD, lr=0.1, k=2, interval=2, lanczos_iters=6)
    flags = []
    for x, y in data:
        closure, loss_closure = closures(model, opt, x, y, counter)
        before = flat(model)
        loss = opt.step(closure, loss_closure=loss_closure)
        flags.append(opt.last_loss_is_perturbed)
        with torch.no_grad():
            at_w = ref_loss(before, x, y)
        if not opt.last_loss_is_perturbed:
            assert torch.allclose(loss.detach(), at_w)
    # refreshes at steps 0, 2, 4 (6 HVPs each); step 0 calls the closure twice
    assert opt.num_hvps == 18 and opt.num_eigen_solves == 3
    assert counter == {"closure": 6, "loss_closure": 3}
    assert opt.num_closure_calls == 6 and opt.num_loss_closure_calls == 3
    assert opt.passes == 6 + 3 + 18
    assert flags == [False, True, False, True, False]
    assert opt.eigenvalues.shape == (2,) and (opt.eigenvalues >= 0).all()


def test_a2sam_needs_loss_closure_on_refresh_steps():
    model = tiny_model()
    opt = A2SAM(model.parameters(), torch.optim.SGD, lr=0.1, k=2, interval=2, lanczos_iters=6)
    (x, y), = batches(1)
    closure, _ = closures(model, opt, x, y)
    with pytest.raises(ValueError, match="loss_closure"):
        opt.step(closure)


# ============================================================================== X-SAM
@pytest.mark.parametrize("base,solver", [("sgd", "power"), ("adam", "power"), ("sgd", "lanczos"),
                                         ("adam", "lanczos")])
def test_xsam_matches_hand_written_update(base, solver):
    base_cls, base_kwargs, ref_base = BASES[base]
    data = batches(5, seed=4)
    model = tiny_model()
    theta0 = flat(model)
    hp = dict(rho=0.1, alpha=0.5, freq=2)
    # power: 400 iterations (the eigenvalue of largest magnitude); Lanczos from the previous v to
    # a residual of 1e-10 (the algebraically largest eigenvalue)
    run(XSAM, data, model, base_optimizer=base_cls, solver=solver,
        power_iters=400 if solver == "power" else 26, tol=None if solver == "power" else 1e-10,
        **hp, **base_kwargs)
    expected = ref_xsam(theta0, data, base=ref_base(), top="magnitude" if solver == "power"
                        else "algebraic", **hp)
    assert torch.allclose(flat(model), expected, rtol=0, atol=1e-9)
    plain_sam = ref_xsam(theta0, data, rho=0.1, alpha=0.0, freq=2, base=ref_base())
    assert (plain_sam - expected).abs().max() > 1e-5


def test_xsam_correction_is_sign_invariant():
    model = tiny_model()
    opt = XSAM(model.parameters(), torch.optim.SGD, lr=0.1, alpha=0.3)
    gen = torch.Generator().manual_seed(0)
    v = [torch.randn(p.shape, generator=gen, dtype=DT) for p in model.parameters()]
    norm = math.sqrt(sum(float((t * t).sum()) for t in v))
    g = [torch.randn(p.shape, generator=gen, dtype=DT) for p in model.parameters()]
    results = []
    for sign in (1.0, -1.0):
        for p, vi, gi in zip(model.parameters(), v, g):
            opt.state[p]["eigvec"] = sign * vi / norm
            p.grad = gi.clone()
        opt.correct_gradient()
        results.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    assert torch.allclose(results[0], results[1], atol=1e-14)


def test_xsam_counts_hvps():
    data = batches(5, seed=5)
    model = tiny_model()
    counter = {"closure": 0, "loss_closure": 0}
    opt = run(XSAM, data, model, counter=counter, base_optimizer=torch.optim.SGD, lr=0.1,
              freq=2, power_iters=3)
    assert opt.num_hvps == 9 and opt.num_eigen_solves == 3
    assert counter == {"closure": 10, "loss_closure": 3}
    assert opt.num_closure_calls == 10 and opt.num_loss_closure_calls == 3
    assert opt.passes == 10 + 3 + 9


# ============================================================================== HATAM
def ref_hatam(params, grads_per_step, lr, betas, eps, wd, beta_c, gamma, modulator):
    """The seed-002 pseudocode, line by line, on lists of tensors."""
    b1, b2 = betas
    w = [p.clone() for p in params]
    m = [torch.zeros_like(p) for p in w]
    v = [torch.zeros_like(p) for p in w]
    c = [torch.zeros_like(p) for p in w]
    g_prev = [torch.zeros_like(p) for p in w]
    for t, grad_fn in enumerate(grads_per_step, start=1):
        g = grad_fn(w)
        hs = []
        for i in range(len(w)):
            y = g[i] - g_prev[i]
            c[i] = beta_c * c[i] + (1 - beta_c) * y
            v_prev_corr = v[i] / (1 - b2 ** (t - 1)) if t > 1 else v[i]
            hs.append(torch.sqrt(v_prev_corr) + eps)
        if modulator == "global":
            all_h = torch.cat([h.reshape(-1) for h in hs])
            means = [all_h.mean()] * len(hs)
        else:
            means = [h.mean() for h in hs]
        for i in range(len(w)):
            S = hs[i] / (means[i] + eps)
            g_h = g[i] + gamma * S * c[i]
            m[i] = b1 * m[i] + (1 - b1) * g_h
            v[i] = b2 * v[i] + (1 - b2) * g_h ** 2
            m_hat = m[i] / (1 - b1 ** t)
            v_hat = v[i] / (1 - b2 ** t)
            w[i] = w[i] - lr * (m_hat / (torch.sqrt(v_hat) + eps) + wd * w[i])
            g_prev[i] = g[i]
    return w


def _mlp_grads(theta_list, x, y):
    theta = torch.cat([t.reshape(-1) for t in theta_list])
    g = ref_grad(theta, x, y)
    return [gi.view_as(t) for gi, t in zip(g.split([t.numel() for t in theta_list]), theta_list)]


@pytest.mark.parametrize("modulator", ["tensor", "global"])
def test_hatam_matches_pseudocode(modulator):
    data = batches(4, seed=6)
    model = tiny_model()
    p0 = [p.detach().clone() for p in model.parameters()]
    hp = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05, beta_c=0.8, gamma=0.7)
    run(HATAM, data, model, modulator=modulator, **hp)
    expected = ref_hatam(p0, [lambda w, b=b: _mlp_grads(w, *b) for b in data],
                         hp["lr"], hp["betas"], hp["eps"], hp["weight_decay"], hp["beta_c"],
                         hp["gamma"], modulator)
    for p, e in zip(model.parameters(), expected):
        assert torch.allclose(p.detach(), e, rtol=0, atol=1e-12)
    adamw = ref_hatam(p0, [lambda w, b=b: _mlp_grads(w, *b) for b in data], hp["lr"], hp["betas"],
                      hp["eps"], hp["weight_decay"], hp["beta_c"], 0.0, modulator)
    assert max((a - e).abs().max() for a, e in zip(adamw, expected)) > 1e-5


def test_hatam_with_gamma_zero_is_adamw():
    data = batches(6, seed=7)
    hp = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
    m1, m2 = tiny_model(), tiny_model()
    run(HATAM, data, m1, gamma=0.0, beta_c=0.9, **hp)
    run(torch.optim.AdamW, data, m2, **hp)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-13)


def test_hatam_calls_closure_once_and_runs_without_closure():
    data = batches(3, seed=8)
    model = tiny_model()
    counter = {"closure": 0, "loss_closure": 0}
    opt = run(HATAM, data, model, counter=counter)
    assert counter["closure"] == 3 and HATAM.passes_per_step == 1.0
    assert all(opt.state[p]["step"] == 3 for p in model.parameters())
    x, y = data[0]
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    assert opt.step() is None


# ======================================================================= state_dict round trip
CASES = {
    "a2sam": (A2SAM, dict(base_optimizer=torch.optim.SGD, lr=0.1, momentum=0.9, rho=0.1,
                          alpha=2.0, k=2, interval=2, lanczos_iters=8)),
    "xsam": (XSAM, dict(base_optimizer=torch.optim.SGD, lr=0.1, momentum=0.9, rho=0.1,
                        alpha=0.5, freq=2, power_iters=3)),
    "hatam": (HATAM, dict(lr=0.01, gamma=0.5, beta_c=0.9)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_state_dict_round_trip_takes_identical_next_steps(name):
    cls, kwargs = CASES[name]
    data = batches(6, seed=9)
    model = tiny_model()
    opt = run(cls, data[:3], model, **kwargs)
    saved_opt = copy.deepcopy(opt.state_dict())
    saved_model = copy.deepcopy(model.state_dict())

    resumed_model = tiny_model(seed=11)
    resumed_model.load_state_dict(saved_model)
    resumed = cls(resumed_model.parameters(), **kwargs)
    resumed.load_state_dict(saved_opt)
    fresh_model = tiny_model(seed=11)
    fresh_model.load_state_dict(saved_model)
    fresh = cls(fresh_model.parameters(), **kwargs)   # same weights, no optimizer state

    def take(m, o, batch):
        closure, loss_closure = closures(m, o, *batch)
        return (o.step(closure, loss_closure=loss_closure) if isinstance(o, (A2SAM, XSAM))
                else o.step(closure))

    for batch in data[3:]:  # step 3: no refresh, step 4: refresh (warm start), step 5: none
        take(model, opt, batch)
        take(resumed_model, resumed, batch)
        take(fresh_model, fresh, batch)
        for a, b in zip(model.parameters(), resumed_model.parameters()):
            assert torch.equal(a, b)
    assert max((a - b).abs().max() for a, b in zip(model.parameters(), fresh_model.parameters())) > 0
    if name != "hatam":
        assert resumed.num_hvps == opt.num_hvps


# ======================================================================================= configs
@pytest.mark.parametrize("name", ["a2sam", "xsam", "hatam"])
def test_configs_build(name):
    cfg = optimizer_config(name)
    assert cfg["name"] == name and METHODS[name] is not None
    model = tiny_model()
    opt = build_optimizer(model, cfg)
    assert type(opt) is METHODS[name]
    group = opt.param_groups[0]
    assert group["lr"] == cfg["lr"] and group["weight_decay"] == cfg["weight_decay"]
    if name == "hatam":
        assert group["betas"] == tuple(cfg["betas"]) and group["eps"] == cfg["eps"]
        assert group["beta_c"] == cfg["beta_c"] and group["gamma"] == cfg["gamma"]
    else:
        assert isinstance(opt.base_optimizer, torch.optim.SGD)
        assert group["momentum"] == cfg["momentum"] and group["rho"] == cfg["rho"]
        keys = ("k", "interval", "lanczos_iters") if name == "a2sam" else ("freq", "power_iters")
        assert all(getattr(opt, key) == cfg[key] for key in keys)
    # one step through the driver protocol
    x, y = batches(1)[0]
    closure, loss_closure = closures(model, opt, x, y)
    extra = {"loss_closure": loss_closure} if isinstance(opt, (A2SAM, XSAM)) else {}
    assert torch.isfinite(opt.step(closure, **extra))


@pytest.mark.parametrize("name", ["a2sam", "xsam"])
@pytest.mark.parametrize("base", ["sgd", "rmsprop"])
def test_config_alpha_reaches_the_method(name, base):
    cfg = optimizer_config(name)
    cfg.update(alpha=0.37, base=base)
    opt = build_optimizer(tiny_model(), cfg)
    assert opt.alpha == 0.37  # the method's alpha, not RMSprop's smoothing constant
    if base == "rmsprop":
        assert opt.base_optimizer.defaults["alpha"] == 0.99

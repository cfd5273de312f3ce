"""A²SAM and X-SAM: eigen-solves that say how accurate they are, fp16 safety, the ablations and
the X-SAM authors' variants, and the FLOP-priced cost. References are written independently with
explicit Hessians (torch.autograd.functional.hessian + torch.linalg.eigh) in float64."""
import logging
import math

import pytest
import torch
import torch.nn as nn
import torch.utils._python_dispatch

from sharpbench.cost import cost_per_step, pass_flops
from sharpbench.curvature import lanczos, power_iteration
from sharpbench.optim import A2SAM, SAM, XSAM
from test_optim_curvature_methods import (DT, RefSGD, batches, closures, flat, ref_grad,
                                          ref_hessian, tiny_model)


def sym_matrix(eigs, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=g, dtype=DT))
    return q @ torch.diag(torch.as_tensor(eigs, dtype=DT)) @ q.T


# ================================================================================ solvers
def test_lanczos_stops_on_ritz_residual_and_reports_it():
    # two nearly equal top eigenvalues and a slowly decaying rest: 10 cold iterations are not enough
    eigs = torch.cat([torch.tensor([10.0, 9.99, 6.0, 5.5, 5.2]), torch.linspace(0, 5, 195)])
    A = sym_matrix(eigs)
    calls = []
    vals, vecs, info = lanczos(lambda v: calls.append(1) or A @ v, 200, k=5, num_iters=120,
                               tol=1e-6, check_every=5, return_info=True, dtype=DT,
                               generator=torch.Generator().manual_seed(0))
    assert info.converged and info.finite and info.iterations == len(calls) < 120
    assert info.iterations % 5 == 0 and info.host_syncs == info.iterations // 5
    true_res = (A @ vecs - vecs * vals).norm(dim=0) / vals.abs()
    torch.testing.assert_close(torch.tensor(info.residuals, dtype=DT), true_res, rtol=1e-3, atol=1e-12)  # the reported ones
    assert (true_res <= 1e-6).all()
    torch.testing.assert_close(vals, eigs[:5].to(DT), rtol=1e-9, atol=0)  # both of the close pair
    # the fixed 10-iteration solve misses them and its residuals say so
    v10, _, info10 = lanczos(lambda v: A @ v, 200, k=5, num_iters=10, return_info=True, dtype=DT,
                             generator=torch.Generator().manual_seed(0))
    assert not info10.converged and info10.host_syncs == 1 and max(info10.residuals) > 1e-2
    assert (v10[3:] < eigs[3:5].to(DT) * 0.995).all()


def test_lanczos_non_finite_products_do_not_raise():
    A = sym_matrix(torch.linspace(1, 5, 30))
    calls = []

    def matvec(v):
        calls.append(1)
        return A @ v * (float("nan") if len(calls) == 3 else 1.0)
    vals, vecs, info = lanczos(matvec, 30, k=2, num_iters=10, return_info=True, dtype=DT,
                               generator=torch.Generator().manual_seed(0))
    assert not info.finite and not info.converged and torch.isnan(vals).all()


def test_power_iteration_applies_the_operator_once_per_matvec():
    A = sym_matrix(torch.cat([torch.tensor([4.0, 3.0]), torch.linspace(0, 2, 18)]), seed=1)
    v0 = torch.randn(20, generator=torch.Generator().manual_seed(3), dtype=DT)
    calls = []
    lam, v, info = power_iteration(lambda u: calls.append(1) or A @ u, init=v0, iters=3,
                                   return_info=True)
    expected = torch.linalg.matrix_power(A, 3) @ v0
    assert len(calls) == 3 and info.iterations == 3 and info.host_syncs == 1
    torch.testing.assert_close(v, expected / expected.norm(), rtol=0, atol=1e-12)
    prev = torch.linalg.matrix_power(A, 2) @ v0
    prev = prev / prev.norm()
    torch.testing.assert_close(lam, prev @ A @ prev)  # Rayleigh quotient of the last input
    assert info.residuals[0] == pytest.approx(((A @ prev - lam * prev).norm() / lam).item(), rel=1e-9)


# ================================================================================ A²SAM
def ref_a2sam(theta, data, rho, alpha, k, interval, stale=True, relative=False):
    """Explicit-Hessian reference of every A²SAM variant (SGD base, as RefSGD)."""
    base, theta, g_stale, lam, V = RefSGD(), theta.clone(), None, None, None
    d = theta.numel()
    for t, (x, y) in enumerate(data):
        if alpha > 0 and t % interval == 0:
            evals, evecs = torch.linalg.eigh(ref_hessian(theta, x, y))
            lam, V = evals[-k:].flip(0).clamp(min=0), evecs[:, -k:].flip(1)
        g = g_stale if stale else ref_grad(theta, x, y)
        if g is None:  # step 0 of the stale variant: SAM
            g = ref_grad(theta, x, y)
            e = rho * g / g.norm()
        else:
            A = torch.eye(d, dtype=DT)
            if alpha > 0:
                scale = lam / lam[0] if relative else lam
                A = A + alpha * V @ torch.diag(scale) @ V.T
            u = torch.linalg.solve(A, g)
            e = rho * u / torch.sqrt(g @ u)
        g_p = ref_grad(theta + e, x, y)
        theta = base(theta, g_p)
        g_stale = g_p
    return theta


def run_a2sam(data, counter=None, with_loss_closure=True, **kw):
    model = tiny_model()
    opt = A2SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=5e-4,
                lanczos_iters=26, lanczos_tol=None, **kw)
    for x, y in data:
        closure, loss_closure = closures(model, opt, x, y, counter)
        opt.step(closure, loss_closure=loss_closure if with_loss_closure else None)
    return model, opt


@pytest.mark.parametrize("variant", [dict(stale_gradient=False), dict(alpha_mode="relative"),
                                     dict(alpha=0.0), dict(alpha=0.0, stale_gradient=False)])
def test_a2sam_ablations_match_reference(variant):
    data = batches(4, seed=21)
    hp = dict(rho=0.1, alpha=2.0, k=3, interval=2)
    hp.update({k: v for k, v in variant.items() if k == "alpha"})
    counter = {"closure": 0, "loss_closure": 0}
    model, opt = run_a2sam(data, counter, with_loss_closure=hp["alpha"] > 0, **{**hp, **variant})
    expected = ref_a2sam(flat(tiny_model()), data, rho=hp["rho"], alpha=hp["alpha"], k=3,
                         interval=2, stale=variant.get("stale_gradient", True),
                         relative=variant.get("alpha_mode") == "relative")
    assert torch.allclose(flat(model), expected, rtol=0, atol=1e-9)
    fresh = not variant.get("stale_gradient", True)
    assert counter["closure"] == (8 if fresh else 5)          # 2 per step, or 1 after step 0
    if hp["alpha"] == 0:
        assert opt.num_hvps == 0 and counter["loss_closure"] == 0
    if fresh and hp["alpha"] == 0:  # the sphere with a fresh gradient is SAM
        sam_model = tiny_model()
        sam = SAM(sam_model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9,
                  weight_decay=5e-4)
        for x, y in data:
            sam.step(closures(sam_model, sam, x, y)[0])
        assert torch.allclose(flat(sam_model), flat(model), rtol=0, atol=1e-12)


def test_a2sam_relative_alpha_is_scale_free():
    """Scaling the loss by c scales H by c: relative α gives the same perturbation, absolute α not."""
    (x, y), = batches(1, seed=2)
    for mode, same in (("relative", True), ("absolute", False)):
        outs = []
        for c in (1.0, 10.0):
            model = tiny_model()
            opt = A2SAM(model.parameters(), torch.optim.SGD, lr=0.0, rho=0.1, alpha=3.0, k=3,
                        alpha_mode=mode, lanczos_iters=26, lanczos_tol=None)

            def closure():
                opt.zero_grad()
                loss = c * nn.functional.cross_entropy(model(x), y)
                loss.backward()
                return loss
            opt.step(closure, loss_closure=lambda: c * nn.functional.cross_entropy(model(x), y))
            for p in model.parameters():  # the same stale gradient for both scales
                opt.state[p]["stale_grad"] = torch.ones_like(p)
            outs.append(torch.cat([e.reshape(-1) for e in opt.perturbation().values()]))
        assert torch.allclose(outs[0], outs[1], rtol=1e-6, atol=1e-9) == same


@pytest.mark.parametrize("solver", ["lanczos", "block"])
def test_a2sam_records_each_solve_and_keeps_geometry_on_non_finite(caplog, solver):
    data = batches(5, seed=22)
    model = tiny_model()
    opt = A2SAM(model.parameters(), torch.optim.SGD, lr=0.1, rho=0.1, alpha=2.0, k=2, interval=2,
                lanczos_iters=20, lanczos_tol=1e-3, lanczos_check_every=4, solver=solver)
    every = 4 if solver == "lanczos" else 2      # a check every 4 iterations, or every block of k
    for t, (x, y) in enumerate(data):
        closure, loss_closure = closures(model, opt, x, y)
        poisoned = (lambda lc=loss_closure: lc() * float("nan")) if t == 2 else loss_closure
        before = None if opt.eigenvalues is None else opt.eigenvalues.clone()
        with caplog.at_level(logging.WARNING, logger="sharpbench"):
            opt.step(closure, loss_closure=poisoned)
        if t == 2:
            assert torch.equal(opt.eigenvalues, before)  # previous geometry kept
        s = opt.method_state
        if t == 0:
            assert 2 <= s["eigen_iterations_last"] <= 20 and s["eigen_iterations_last"] % every == 0
            assert s["refresh_host_syncs_last"] == s["eigen_iterations_last"] // every
            assert len(s["eigen_residuals_last"]) == 2
            assert max(s["eigen_residuals_last"]) <= 1e-3 or s["num_unconverged_solves"] == 1
    assert opt.method_state["num_nonfinite_solves"] == 1 and opt.num_eigen_solves == 3
    assert "not finite" in caplog.text and "keeping the previous geometry" in caplog.text
    assert torch.isfinite(flat(model)).all()
    summary = opt.solve_summary()
    assert summary["eigen_solves"] == 3 and summary["eigen_nonfinite_solves"] == 1
    # one row per solve, the poisoned one included: step, matvecs, largest residual, converged
    rows = summary["eigen_refreshes"]
    assert [r[0] for r in rows] == [0, 2, 4] and math.isnan(rows[1][2]) and not rows[1][3]
    assert all(r[3] == (r[2] <= 1e-3) for r in (rows[0], rows[2]))
    assert summary["eigen_tol"] == 1e-3
    assert summary["eigen_residual_max"] == max(rows[0][2], rows[2][2])


# ================================================================================ X-SAM
@pytest.mark.parametrize("correction,normalize", [("projection", False), ("sign", False),
                                                  ("projection", True), ("sign", True)])
def test_xsam_authors_corrections(correction, normalize):
    """Their correction ĝ − α·sign(g·v)(ĝ·v)v with ĝ = g/‖g‖, each part a switch, by hand."""
    model = tiny_model()
    opt = XSAM(model.parameters(), torch.optim.SGD, lr=0.1, alpha=0.3, correction=correction,
               normalize_gradient=normalize)
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(26, generator=gen, dtype=DT)
    v = v / v.norm()
    g = torch.randn(26, generator=gen, dtype=DT)
    results = []
    for sign in (1.0, -1.0):
        for p, vi, gi in zip(model.parameters(), (sign * v).split(_sizes(model)), g.split(_sizes(model))):
            opt.state[p]["eigvec"] = vi.view_as(p).clone()
            p.grad = gi.view_as(p).clone()
        opt.correct_gradient()
        got = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        gh = g / g.norm() if normalize else g
        sv = sign * v
        c = gh @ sv if correction == "projection" else torch.sign(g @ sv) * (gh @ sv)
        torch.testing.assert_close(got, gh - 0.3 * c * sv, rtol=0, atol=1e-12)
        results.append(got)
    differs = (results[0] - results[1]).abs().max() > 1e-6
    assert differs == (correction == "sign")  # the sign form depends on v's arbitrary sign


def _sizes(model):
    return [p.numel() for p in model.parameters()]


def test_xsam_per_epoch_schedule_refreshes_at_batch_freq_of_each_epoch():
    data = batches(5, seed=8)
    model = tiny_model()
    opt = XSAM(model.parameters(), torch.optim.SGD, lr=0.1, freq=2, power_iters=2,
               refresh_schedule="per_epoch")
    refreshed = []
    for epoch in range(2):
        for i, (x, y) in enumerate(data):
            closure, loss_closure = closures(model, opt, x, y)
            before = opt.num_eigen_solves
            opt.step(closure, loss_closure=loss_closure, batch_idx=i)
            refreshed.append((epoch, i)) if opt.num_eigen_solves > before else None
    assert refreshed == [(0, 2), (0, 4), (1, 2), (1, 4)]
    with pytest.raises(ValueError, match="batch_idx"):
        opt.step(closures(model, opt, *data[0])[0], loss_closure=closures(model, opt, *data[0])[1])
    # before the first refresh X-SAM is plain SAM
    m1, m2 = tiny_model(), tiny_model()
    o1 = XSAM(m1.parameters(), torch.optim.SGD, lr=0.1, freq=2, refresh_schedule="per_epoch")
    o2 = SAM(m2.parameters(), torch.optim.SGD, lr=0.1)
    for i, (x, y) in enumerate(data[:2]):
        o1.step(closures(m1, o1, x, y)[0], loss_closure=None, batch_idx=i)
        o2.step(closures(m2, o2, x, y)[0])
    assert torch.equal(flat(m1), flat(m2))


@pytest.mark.parametrize("solver", ["power", "lanczos"])
def test_xsam_keeps_previous_eigenvector_on_non_finite_solve(solver):
    data = batches(3, seed=9)
    model = tiny_model()
    opt = XSAM(model.parameters(), torch.optim.SGD, lr=0.1, freq=1, power_iters=3, solver=solver)
    for t, (x, y) in enumerate(data):
        closure, loss_closure = closures(model, opt, x, y)
        kept = None if t == 0 else [opt.state[p]["eigvec"].clone() for p in model.parameters()]
        opt.step(closure, loss_closure=(lambda lc=loss_closure: lc() * float("inf")) if t == 1
                 else loss_closure)
        if t == 1:
            assert all(torch.equal(opt.state[p]["eigvec"], k) for p, k in zip(model.parameters(), kept))
    assert opt.method_state["num_nonfinite_solves"] == 1 and torch.isfinite(flat(model)).all()
    # power iteration reads the device once per solve; Lanczos once per product (k = 1)
    last = opt.method_state["eigen_refreshes"][-1][1]
    assert opt.method_state["refresh_host_syncs_last"] == (1 if solver == "power" else last)


def test_module_hessian_losses():
    """The driver's loss_closure: fp32 train-mode objective, or the authors' eval-mode plain CE."""
    from sharpbench.models import build_model
    from sharpbench.module import SharpnessModule
    torch.manual_seed(0)
    net = build_model("tiny_cnn", num_classes=10)
    module = SharpnessModule(net, {"name": "xsam"}, {"name": "constant"}, num_classes=10,
                             epochs=1, precision="16-mixed", label_smoothing=0.1)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    running = net.bn1.running_mean.clone()
    with torch.autocast("cpu", dtype=torch.float16):  # an outer autocast does not reach HVPs
        train_loss = module.hessian_loss_closure(x, y)("train")
        eval_loss = module.hessian_loss_closure(x, y)("eval")
    assert train_loss.dtype == eval_loss.dtype == torch.float32 and net.training
    assert torch.equal(net.bn1.running_mean, running)
    with torch.no_grad():
        net.eval()
        torch.testing.assert_close(eval_loss, nn.functional.cross_entropy(net(x), y))
        net.train()
        torch.testing.assert_close(train_loss, nn.functional.cross_entropy(net(x), y, label_smoothing=0.1))
    assert (train_loss - eval_loss).abs() > 1e-3


# ================================================================================ host reads
class ScalarReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts scalar reads (.item(), float(t), bool(t), `if t:`): each one waits for a GPU."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("cls,kw,reads", [
    (A2SAM, dict(k=2, interval=2, lanczos_iters=8, lanczos_tol=1e-3, lanczos_check_every=4,
                 solver="lanczos"), 2),                   # 8 iterations, a check every 4
    (A2SAM, dict(k=2, interval=2, lanczos_iters=8, lanczos_tol=1e-3, solver="block"), 4),  # per block
    (XSAM, dict(freq=2, power_iters=3, solver="power"), 1),   # one read per power-iteration solve
    (XSAM, dict(freq=2, power_iters=3, solver="lanczos", tol=1e-12), 3)])  # one per product
def test_no_scalar_reads_in_steps_and_refreshes(cls, kw, reads):
    """The solvers read the device once per check (a bulk .tolist(), counted in host_syncs), never
    element by element; ordinary steps read nothing."""
    model = tiny_model()
    opt = cls(model.parameters(), torch.optim.SGD, lr=0.1, **kw)
    for x, y in batches(4, seed=12):
        closure, loss_closure = closures(model, opt, x, y)
        with ScalarReads() as mode:
            opt.step(closure, loss_closure=loss_closure)
        assert mode.reads == 0
    assert opt.num_eigen_solves == 2
    assert opt.method_state["refresh_host_syncs_last"] == reads


# ================================================================================ cost
def test_flop_prices_and_cost_per_step():
    from sharpbench.models import build_model
    prices = pass_flops(build_model("tiny_cnn", num_classes=10), (16, 3, 32, 32), 10)
    assert prices["flops_per_pass"] > 0 and prices["graph_cost"] == pytest.approx(1.0, abs=0.05)
    assert 1.5 < prices["hvp_cost"] < 2.5  # a double backward: about two passes
    # A²SAM, 100 steps at interval 50 with 10 HVPs per solve, HVP = 2 passes:
    # closures 100 + 1 (step 0), loss_closures 2 (counted in passes), HVPs 20
    assert cost_per_step(passes=103, loss_closure_calls=2, hvps=20, steps=100, graph_cost=1.0,
                         hvp_cost=2.0) == pytest.approx((101 + 2 + 40) / 100)


# ================================================================================ training
@pytest.mark.parametrize("method,extra", [
    ("a2sam", ["optimizer.interval=2", "optimizer.k=2", "optimizer.lanczos_iters=6"]),
    ("xsam", ["optimizer.freq=2", "optimizer.refresh_schedule=per_epoch"]),
])
def test_trains_under_fp16_without_nan(compose_cfg, tmp_path, method, extra):
    """precision=16-mixed on CPU: HVPs through BatchNorm's double backward overflowed fp16 (NaN
    eigenvectors reached the weights, or Lanczos crashed). Also: the per-epoch X-SAM schedule gets
    its batch index from the driver, A²SAM's perturbed loss is logged apart, and metrics.json
    prices every HVP."""
    import pandas as pd

    from sharpbench.train import train
    overrides = ["experiment=smoke", f"optimizer={method}", "trainer.precision=16-mixed",
                 "trainer.enable_progress_bar=false", "dataset.train_subset=160",
                 "dataset.batch_size=32", "dataset.test_subset=64", "trainer.max_epochs=2", *extra]
    record = train(compose_cfg(overrides), tmp_path, overrides)
    assert record["status"] == "completed", record.get("error")
    assert record["eigen_nonfinite_solves"] == 0 and record["eigen_solves"] == (5 if method == "a2sam" else 4)
    frame = pd.read_csv(tmp_path / "csv" / "metrics.csv")
    at_w = frame["train/loss_step"].dropna()
    assert len(at_w) and all(math.isfinite(v) for v in at_w)
    if method == "a2sam":  # loss at w on step 0 and refresh steps only; L(w + e) on the others
        perturbed = frame["train/loss_perturbed_step"].dropna()
        assert len(at_w) == 5 and len(perturbed) == 5 and all(math.isfinite(v) for v in perturbed)
    expected = (record["passes_per_step"] * record["steps"]
                + record["eigen_solves"] * (record["hessian_graph_cost_passes"] - 1)
                + record["hvps_per_step"] * record["steps"] * record["hvp_cost_passes"]) / record["steps"]
    assert record["cost_per_step"] == pytest.approx(expected)
    assert record["cost_per_step"] > record["passes_per_step"] + 0.5 * record["hvps_per_step"]

import math

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call

from sharpbench.curvature import (HessianOperator, block_lanczos, block_power_iteration,
                                  hutchinson_trace,
                                  hvp, lanczos, params_to_vector, power_iteration,
                                  vector_to_tensors)


def sym_matrix(eigs, seed=0):
    """Symmetric float64 matrix with the given spectrum and a random eigenbasis."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=g, dtype=torch.float64))
    return q @ torch.diag(torch.as_tensor(eigs, dtype=torch.float64)) @ q.T, q


class Counter:
    def __init__(self, A):
        self.A, self.calls = A, 0

    def __call__(self, v):
        self.calls += 1
        return self.A @ v


def tiny_mlp_problem(seed=0):
    """A float64 tanh MLP with a CE loss; returns (model, loss_fn(flat θ), θ)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    names = [n for n, _ in model.named_parameters()]
    shapes = list(model.parameters())

    def loss_of(theta):
        ps = dict(zip(names, vector_to_tensors(theta, shapes)))
        return nn.functional.cross_entropy(functional_call(model, ps, (x,)), y)

    theta = params_to_vector(model.parameters()).detach()
    return model, loss_of, theta, x, y


@pytest.fixture(scope="module")
def mlp_hessian():
    model, loss_of, theta, x, y = tiny_mlp_problem()
    H = torch.autograd.functional.hessian(loss_of, theta)
    return model, x, y, H


# --------------------------------------------------------------------------- flat vectors

def test_vector_roundtrip_and_none_grads():
    ts = [torch.randn(3, 4), torch.randn(5), torch.randn(2, 3, 3, 3).to(memory_format=torch.channels_last)]
    v = params_to_vector(ts)
    assert v.shape == (12 + 5 + 54,)
    for a, b in zip(vector_to_tensors(v, ts), ts):
        assert torch.equal(a, b)
    v2 = params_to_vector([None, ts[1], None], like=ts)
    assert torch.equal(v2[12:17], ts[1]) and v2[:12].abs().sum() == 0 and v2[17:].abs().sum() == 0
    with pytest.raises(ValueError):
        params_to_vector([None, ts[1]])
    with pytest.raises(ValueError):
        vector_to_tensors(torch.zeros(3), ts)


# --------------------------------------------------------------------------- HVPs

def test_hvp_quadratic():
    A, _ = sym_matrix(torch.linspace(-2, 3, 8))
    x = torch.randn(8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(8, dtype=torch.float64)
    loss = 0.5 * x @ A @ x + b @ x
    op = HessianOperator(loss, [x])
    v = torch.randn(8, dtype=torch.float64)
    torch.testing.assert_close(op.matvec(v), A @ v)
    torch.testing.assert_close(op.gradient, (A @ x + b).detach())
    assert op.dim == 8 and op.dtype == torch.float64 and op.num_hvps == 1


def test_hvp_matches_explicit_hessian(mlp_hessian):
    model, x, y, H = mlp_hessian
    loss = nn.functional.cross_entropy(model(x), y)
    op = HessianOperator(loss, list(model.parameters()))
    assert op.dim == H.shape[0]
    g = torch.Generator().manual_seed(1)
    for i in range(3):
        v = torch.randn(op.dim, generator=g, dtype=torch.float64)
        torch.testing.assert_close(op(v), H @ v, rtol=1e-10, atol=1e-12)
    assert op.num_hvps == 3
    loss2 = nn.functional.cross_entropy(model(x), y)
    torch.testing.assert_close(hvp(loss2, model.parameters(), v), H @ v, rtol=1e-10, atol=1e-12)
    true_grad = params_to_vector(torch.autograd.grad(loss2, list(model.parameters())))
    torch.testing.assert_close(op.gradient, true_grad)


def test_hvp_unused_and_linear_params():
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    lin = torch.randn(2, dtype=torch.float64, requires_grad=True)   # loss is linear in it
    unused = torch.randn(4, dtype=torch.float64, requires_grad=True)
    loss = (w ** 3).sum() + lin.sum()
    op = HessianOperator(loss, [w, unused, lin])
    v = torch.randn(9, dtype=torch.float64)
    expected = torch.cat([6 * w.detach() * v[:3], torch.zeros(6, dtype=torch.float64)])
    torch.testing.assert_close(op(v), expected)
    torch.testing.assert_close(op.gradient, torch.cat([3 * w.detach() ** 2, torch.zeros(4, dtype=torch.float64), torch.ones(2, dtype=torch.float64)]))
    op_lin = HessianOperator(lin.sum() * 2, [lin])   # Hessian identically zero
    assert torch.equal(op_lin(torch.ones(2, dtype=torch.float64)), torch.zeros(2, dtype=torch.float64))


def test_hvp_on_tiny_cnn_train_mode():
    from sharpbench.models import build_model
    torch.manual_seed(0)
    m = build_model("tiny_cnn", num_classes=10)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    params = [p for p in m.parameters()]
    op = HessianOperator(nn.functional.cross_entropy(m(x), y), params)
    v = torch.randn(op.dim)
    hv1, hv2 = op(v), op(2 * v)
    assert hv1.shape == (op.dim,) and torch.isfinite(hv1).all()
    torch.testing.assert_close(hv2, 2 * hv1, rtol=1e-4, atol=1e-6)
    # symmetry: uᵀ H v = vᵀ H u
    u = torch.randn(op.dim)
    assert math.isclose((u @ hv1).item(), (v @ op(u)).item(), rel_tol=1e-3, abs_tol=1e-5)


# --------------------------------------------------------------------------- power iteration

def test_power_iteration_top_eigenpair():
    eigs = torch.cat([torch.tensor([10.0, 6.0]), torch.linspace(-3, 3, 48)])
    A, Q = sym_matrix(eigs)
    g = torch.Generator().manual_seed(0)
    lam, v = power_iteration(lambda u: A @ u, 50, iters=200, generator=g, dtype=torch.float64)
    assert abs(lam.item() - 10.0) < 1e-8
    assert abs(abs(v @ Q[:, 0]).item() - 1) < 1e-8
    assert abs(v.norm().item() - 1) < 1e-12


def test_power_iteration_dominant_by_magnitude():
    A, Q = sym_matrix(torch.cat([torch.tensor([-8.0, 5.0]), torch.linspace(-1, 1, 18)]))
    lam, v = power_iteration(lambda u: A @ u, 20, iters=300, dtype=torch.float64,
                             generator=torch.Generator().manual_seed(0))
    assert abs(lam.item() + 8.0) < 1e-8


def test_power_iteration_warm_start_and_tol():
    eigs = torch.cat([torch.tensor([5.0, 4.0]), torch.linspace(0, 3, 48)])
    A, Q = sym_matrix(eigs, seed=3)
    g = torch.Generator().manual_seed(0)
    cold = Counter(A)
    lam, v = power_iteration(cold, 50, iters=500, tol=1e-10, generator=g, dtype=torch.float64)
    assert abs(lam.item() - 5.0) < 1e-6 and cold.calls < 500
    # perturb the matrix slightly (like one optimizer step later) and warm-start
    A2 = A + 1e-3 * sym_matrix(torch.linspace(-1, 1, 50), seed=4)[0]
    cold2, warm2 = Counter(A2), Counter(A2)
    lam_c, _ = power_iteration(cold2, 50, iters=500, tol=1e-10, generator=g, dtype=torch.float64)
    lam_w, _ = power_iteration(warm2, iters=500, tol=1e-10, init=v)
    assert abs(lam_c.item() - lam_w.item()) < 1e-6
    assert warm2.calls < cold2.calls
    lam_p, _ = power_iteration(Counter(A2), v, iters=500, tol=1e-10)  # init as 2nd positional
    assert lam_p.item() == lam_w.item()


def test_power_iteration_on_hessian_operator(mlp_hessian):
    model, x, y, H = mlp_hessian
    op = HessianOperator(nn.functional.cross_entropy(model(x), y), list(model.parameters()))
    lam, v = power_iteration(op, iters=30, generator=torch.Generator().manual_seed(0))
    assert op.num_hvps == 30 and v.dtype == torch.float64
    top = torch.linalg.eigvalsh(H).abs().max().item()
    assert abs(abs(lam.item()) - top) / top < 1e-3


# --------------------------------------------------------------------------- Lanczos

def test_lanczos_known_spectrum():
    eigs = torch.cat([torch.tensor([9.0, 7.5, 6.0, 5.0, 4.5]), torch.linspace(-2, 4, 45)])
    A, _ = sym_matrix(eigs)
    ref_vals, ref_vecs = torch.linalg.eigh(A)
    ref_vals, ref_vecs = ref_vals.flip(0), ref_vecs.flip(1)
    c = Counter(A)
    vals, vecs = lanczos(c, 50, k=5, num_iters=50, generator=torch.Generator().manual_seed(0),
                         dtype=torch.float64)
    assert vals.shape == (5,) and vecs.shape == (50, 5) and c.calls == 50
    torch.testing.assert_close(vals, ref_vals[:5], rtol=1e-6, atol=0)
    assert torch.all(vals[:-1] >= vals[1:])
    overlap = (vecs.T @ ref_vecs[:, :5]).abs().diagonal()
    torch.testing.assert_close(overlap, torch.ones(5, dtype=torch.float64), rtol=0, atol=1e-6)
    torch.testing.assert_close(A @ vecs, vecs * vals, rtol=0, atol=1e-6)


def test_lanczos_default_iters_fewer_than_dim():
    # a well-separated top of the spectrum converges in m = 20 << dim
    eigs = torch.cat([torch.tensor([100.0, 80.0, 60.0]), torch.rand(197, generator=torch.Generator().manual_seed(1))])
    A, _ = sym_matrix(eigs, seed=2)
    c = Counter(A)
    vals, _ = lanczos(c, 200, k=3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert c.calls == 20
    torch.testing.assert_close(vals, torch.tensor([100.0, 80.0, 60.0], dtype=torch.float64), rtol=1e-6, atol=0)


def test_lanczos_explicit_hessian(mlp_hessian):
    model, x, y, H = mlp_hessian
    op = HessianOperator(nn.functional.cross_entropy(model(x), y), list(model.parameters()))
    d = op.dim
    vals, vecs = lanczos(op, k=4, num_iters=d, generator=torch.Generator().manual_seed(0))
    ref = torch.linalg.eigvalsh(H).flip(0)[:4]
    assert op.num_hvps <= d
    torch.testing.assert_close(vals, ref, rtol=1e-6, atol=1e-10)
    torch.testing.assert_close(H @ vecs, vecs * vals, rtol=0, atol=1e-6)


def test_lanczos_breakdown_low_rank():
    # rank-3 PSD matrix: the Krylov space is exhausted after ~4 steps
    g = torch.Generator().manual_seed(0)
    U = torch.randn(30, 3, generator=g, dtype=torch.float64)
    A = U @ U.T
    c = Counter(A)
    vals, vecs = lanczos(c, 30, k=2, num_iters=25, generator=g, dtype=torch.float64)
    assert c.calls == 25  # no tol: one check at the end, the matvecs after the breakdown discarded
    torch.testing.assert_close(vals, torch.linalg.eigvalsh(A).flip(0)[:2], rtol=1e-8, atol=1e-10)
    c = Counter(A)
    vals, _, info = lanczos(c, 30, k=2, num_iters=25, generator=g, dtype=torch.float64, tol=1e-8,
                            return_info=True)
    assert c.calls == 5 and info.converged and info.host_syncs == 1  # stopped at the first check
    torch.testing.assert_close(vals, torch.linalg.eigvalsh(A).flip(0)[:2], rtol=1e-8, atol=1e-10)
    # k larger than the Krylov dimension: restart keeps going and returns k pairs
    vals5, vecs5 = lanczos(Counter(A), 30, k=6, num_iters=25, generator=g, dtype=torch.float64)
    torch.testing.assert_close(vals5, torch.linalg.eigvalsh(A).flip(0)[:6], rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(vecs5.T @ vecs5, torch.eye(6, dtype=torch.float64), rtol=0, atol=1e-8)


def test_lanczos_repeated_eigenvalue_identity():
    A = 3 * torch.eye(10, dtype=torch.float64)
    vals, vecs = lanczos(lambda v: A @ v, 10, k=3, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(vals, torch.full((3,), 3.0, dtype=torch.float64))


def test_lanczos_float32_and_bad_args():
    A, _ = sym_matrix(torch.linspace(0, 10, 40))
    A32 = A.float()
    vals, vecs = lanczos(lambda v: A32 @ v, 40, k=2, num_iters=40, generator=torch.Generator().manual_seed(0))
    assert vals.dtype == torch.float32 and vecs.dtype == torch.float32
    torch.testing.assert_close(vals, torch.tensor([10.0, 10 - 10 / 39]), rtol=1e-5, atol=0)
    with pytest.raises(ValueError):
        lanczos(lambda v: A32 @ v, 40, k=5, num_iters=3)
    with pytest.raises(ValueError):
        lanczos(lambda v: A32 @ v, None, k=1)


# --------------------------------------------------------------------------- warm-started block Lanczos

def true_residuals(A, vals, vecs):
    return [((A @ vecs[:, i] - vals[i] * vecs[:, i]).norm() / vals[i].abs()).item()
            for i in range(len(vals))]


@pytest.mark.parametrize("k", [1, 3, 5])
def test_block_lanczos_cold_matches_eigh_and_reports_true_residuals(k):
    eigs = torch.cat([torch.tensor([50.0, 30, 20, 12, 10, 9]), torch.linspace(5, -3, 94)])
    A, _ = sym_matrix(eigs, seed=3)
    c = Counter(A)
    history = []
    vals, vecs, info = block_lanczos(c, 100, k, max_matvecs=80, tol=1e-6, dtype=torch.float64,
                                     generator=torch.Generator().manual_seed(0), return_info=True,
                                     history=history)
    ref = torch.linalg.eigvalsh(A).flip(0)[:k]
    torch.testing.assert_close(vals, ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(vecs.T @ vecs, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-10)
    # the residual it stops on costs no matvec, and equals ‖Av − λv‖/|λ| computed directly
    assert info.converged and max(info.residuals) <= 1e-6
    torch.testing.assert_close(torch.tensor(info.residuals), torch.tensor(true_residuals(A, vals, vecs)),
                               rtol=1e-3, atol=1e-12)
    assert c.calls == info.iterations and c.calls % k == 0
    assert info.host_syncs == c.calls // k == len(history)         # one read per block
    assert [h[0] for h in history] == list(range(k, c.calls + 1, k))


@pytest.mark.parametrize("k", [1, 3])
def test_block_lanczos_warm_start_costs_a_few_matvecs(k):
    # the operator changes a little between solves, as a Hessian does between refreshes
    eigs = torch.cat([torch.tensor([50.0, 30, 20]), torch.linspace(8, -3, 97)])
    A, _ = sym_matrix(eigs, seed=4)
    g = torch.Generator().manual_seed(1)
    E = torch.randn(100, 100, generator=g, dtype=torch.float64)
    A2 = A + 0.02 * (E + E.T)
    _, V = block_lanczos(lambda v: A @ v, 100, k, max_matvecs=60, tol=1e-8, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(0))
    cold, warm = Counter(A2), Counter(A2)
    _, _, info_cold = block_lanczos(cold, 100, k, max_matvecs=60, tol=1e-3, dtype=torch.float64,
                                    generator=torch.Generator().manual_seed(0), return_info=True)
    vals, vecs, info_warm = block_lanczos(warm, 100, k, max_matvecs=60, tol=1e-3, init=V,
                                          generator=torch.Generator().manual_seed(0),
                                          return_info=True)
    assert info_cold.converged and info_warm.converged
    assert warm.calls <= 3 * k and 2 * warm.calls <= cold.calls
    assert max(true_residuals(A2, vals, vecs)) <= 1e-3
    # from the exact eigenvectors: one block
    _, V2 = torch.linalg.eigh(A2)
    exact = Counter(A2)
    _, _, info = block_lanczos(exact, 100, k, tol=1e-8, init=V2.flip(1)[:, :k], return_info=True)
    assert exact.calls == k and info.converged


def test_block_lanczos_bad_starts_caps_and_non_finite():
    A, _ = sym_matrix(torch.linspace(1, 10, 12), seed=6)
    # zero, NaN and duplicated columns are replaced by random directions
    init = torch.zeros(12, 3, dtype=torch.float64)
    init[:, 1] = float("nan")
    vals, vecs = block_lanczos(lambda v: A @ v, 12, 3, max_matvecs=12, tol=1e-10, init=init,
                               generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(vals, torch.linalg.eigvalsh(A).flip(0)[:3], rtol=1e-8, atol=0)
    same = torch.randn(12, 1, dtype=torch.float64).repeat(1, 3)
    vals, _ = block_lanczos(lambda v: A @ v, 12, 3, max_matvecs=12, tol=1e-10, init=same,
                            generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(vals, torch.linalg.eigvalsh(A).flip(0)[:3], rtol=1e-8, atol=0)
    # the cap: no tolerance runs whole blocks up to max_matvecs (rounded up to a block)
    c = Counter(A)
    _, _, info = block_lanczos(c, 12, 2, max_matvecs=5, dtype=torch.float64, return_info=True)
    assert c.calls == 6 and not info.converged
    # a NaN product: reported, never raised
    _, _, info = block_lanczos(lambda v: torch.full_like(v, float("nan")), 12, 2,
                               dtype=torch.float64, return_info=True)
    assert not info.finite and not info.converged
    with pytest.raises(ValueError, match="max_matvecs"):
        block_lanczos(lambda v: A @ v, 12, 3, max_matvecs=2, dtype=torch.float64)
    with pytest.raises(ValueError, match="tol"):
        block_lanczos(lambda v: A @ v, 12, 3, tol=0.0, dtype=torch.float64)


def test_block_lanczos_on_hessian_operator(mlp_hessian):
    model, x, y, H = mlp_hessian
    op = HessianOperator(nn.functional.cross_entropy(model(x), y), list(model.parameters()))
    vals, vecs, info = block_lanczos(op, k=2, max_matvecs=op.dim, tol=1e-8,
                                     generator=torch.Generator().manual_seed(0), return_info=True)
    torch.testing.assert_close(vals, torch.linalg.eigvalsh(H).flip(0)[:2], rtol=1e-6, atol=1e-10)
    assert info.converged and op.num_hvps == info.iterations


# --------------------------------------------------------------------------- block power / Hutchinson

def test_block_power_iteration():
    eigs = torch.cat([torch.tensor([10.0, 8.0, 6.0]), torch.linspace(-1, 1, 37)])
    A, Q = sym_matrix(eigs, seed=5)
    c = Counter(A)
    vals, vecs = block_power_iteration(c, 40, k=3, iters=60, dtype=torch.float64,
                                       generator=torch.Generator().manual_seed(0))
    assert c.calls == 3 * 60
    torch.testing.assert_close(vals, torch.tensor([10.0, 8.0, 6.0], dtype=torch.float64), rtol=1e-8, atol=0)
    torch.testing.assert_close(vecs.T @ vecs, torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-10)
    # warm start from the answer converges immediately
    vals2, _ = block_power_iteration(lambda v: A @ v, k=3, iters=1, init=vecs)
    torch.testing.assert_close(vals2, vals, rtol=1e-10, atol=0)


def test_hutchinson_trace():
    g = torch.Generator().manual_seed(0)
    D = torch.diag(torch.rand(30, generator=g, dtype=torch.float64))
    # exact for diagonal matrices with Rademacher probes
    est = hutchinson_trace(lambda v: D @ v, 30, num_samples=3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(est, D.trace())
    A, _ = sym_matrix(torch.rand(50, generator=g) + 0.5, seed=6)
    c = Counter(A)
    est = hutchinson_trace(c, 50, num_samples=2000, generator=g, dtype=torch.float64)
    assert c.calls == 2000
    assert abs(est.item() - A.trace().item()) / A.trace().item() < 0.03
    std = (2 * (A.pow(2).sum() - A.diagonal().pow(2).sum()) / 2000).sqrt().item()
    assert abs(est.item() - A.trace().item()) < 4 * std


def test_hutchinson_on_hessian(mlp_hessian):
    model, x, y, H = mlp_hessian
    op = HessianOperator(nn.functional.cross_entropy(model(x), y), list(model.parameters()))
    est = hutchinson_trace(op, num_samples=500, generator=torch.Generator().manual_seed(0))
    assert op.num_hvps == 500
    # Rademacher Hutchinson variance per probe: 2 Σ_{i≠j} H_ij²; allow 4 standard errors
    std = (2 * (H.pow(2).sum() - H.diagonal().pow(2).sum()) / 500).sqrt().item()
    assert abs(est.item() - H.trace().item()) < 4 * std

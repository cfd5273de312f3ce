"""Sharpness diagnostics against exact Hessians, invariances and the no-side-effect contract."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from sharpbench.curvature import MeanLossHessian
from sharpbench.sharpness import (broadened_density, filter_normalized_direction,
                                  gradient_eigenvector_angle, hessian_density, hessian_eigenvalues,
                                  hessian_trace, sharpness)


def mse(out, y):
    return ((out.squeeze(-1) - y) ** 2).mean()


def batches_of(x, y, size):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(y), size)]


@pytest.fixture
def least_squares():
    g = torch.Generator().manual_seed(0)
    n, d = 90, 12
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.3, 3, d, dtype=torch.float64)
    y = torch.randn(n, generator=g, dtype=torch.float64)
    model = nn.Linear(d, 1, bias=False).double()
    h_exact = 2 * x.T @ x / n
    return model, batches_of(x, y, 32), h_exact, x, y  # batches of 32, 32, 26: a weighted mean


def exact_hessian(model, loss_fn, x, y):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(flat):
        parts, i = {}, 0
        for name, shape in zip(names, shapes):
            k = math.prod(shape)
            parts[name] = flat[i:i + k].view(shape)
            i += k
        return loss_fn(functional_call(model, parts, (x,)), y)
    return torch.autograd.functional.hessian(f, flat0)


def test_least_squares_eigenvalues_and_trace(least_squares):
    model, batches, h, _, _ = least_squares
    exact = torch.linalg.eigvalsh(h).flip(0)
    eig = hessian_eigenvalues(model, mse, batches, k=3, num_iters=12)
    assert torch.allclose(torch.tensor(eig.eigenvalues, dtype=torch.float64), exact[:3], rtol=1e-9)
    power = hessian_eigenvalues(model, mse, batches, k=1, method="power", num_iters=500)
    assert power.eigenvalues[0] == pytest.approx(float(exact[0]), rel=1e-6)
    tr = hessian_trace(model, mse, batches, n_samples=400)
    assert tr.stderr > 0
    assert abs(tr.trace - float(torch.trace(h))) < 4 * tr.stderr
    # a diagonal Hessian: Hutchinson is exact, every probe gives tr H
    diag = nn.Linear(3, 1, bias=False).double()
    xd = torch.eye(3, dtype=torch.float64) * torch.tensor([[1.0], [2.0], [3.0]], dtype=torch.float64)
    tr_d = hessian_trace(diag, mse, [(xd, torch.zeros(3, dtype=torch.float64))], n_samples=5)
    assert tr_d.trace == pytest.approx(2 * (1 + 4 + 9) / 3, rel=1e-12) and tr_d.stderr == pytest.approx(0, abs=1e-12)


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (64,), generator=g)
    return model, x, y


def test_mlp_top3_against_autograd_hessian(mlp):
    model, x, y = mlp
    h = exact_hessian(model, F.cross_entropy, x, y)
    exact = torch.linalg.eigvalsh(h).flip(0)[:3]
    eig = hessian_eigenvalues(model, F.cross_entropy, batches_of(x, y, 40), k=3, num_iters=40)
    rel = (torch.tensor(eig.eigenvalues, dtype=torch.float64) - exact).abs() / exact.abs()
    assert rel.max() < 1e-6, (eig.eigenvalues, exact)


def test_density_integrates_to_one_and_covers_the_spectrum(mlp):
    model, x, y = mlp
    exact = torch.linalg.eigvalsh(exact_hessian(model, F.cross_entropy, x, y))
    dens = hessian_density(model, F.cross_entropy, [(x, y)], num_iters=40, num_runs=2)
    assert torch.trapezoid(dens.density, dens.grid) == pytest.approx(1.0, abs=1e-9)
    assert torch.allclose(dens.weights.sum(1), torch.ones(2, dtype=torch.float64))
    assert dens.grid[0] <= exact[0] and dens.grid[-1] >= exact[-1]
    # a discrete spectrum: the mass sits at the nodes
    d = broadened_density(torch.tensor([[0.0, 10.0]]), torch.tensor([[0.25, 0.75]]), sigma=0.1, grid_points=4001)
    right = d.grid > 5
    assert torch.trapezoid(d.density[right], d.grid[right]) == pytest.approx(0.75, abs=1e-3)


def test_gradient_eigenvector_angle_matches_exact(least_squares):
    model, batches, h, x, y = least_squares
    w = model.weight.detach().reshape(-1)
    g = 2 * x.T @ (x @ w - y) / len(y)
    v = torch.linalg.eigh(h).eigenvectors[:, -1]
    want = math.degrees(math.acos(abs(float(g @ v) / float(g.norm()))))
    got = gradient_eigenvector_angle(model, mse, batches, num_iters=12)
    assert got.angle_deg == pytest.approx(want, abs=1e-6)
    assert got.grad_norm == pytest.approx(float(g.norm()), rel=1e-9)


def test_mean_loss_hessian_weights_batches_by_size(least_squares):
    model, batches, h, _, _ = least_squares
    params = list(model.parameters())
    weights = [len(b[1]) / 90 for b in batches]
    op = MeanLossHessian([lambda b=b: mse(model(b[0]), b[1]) for b in batches], params, weights)
    v = torch.randn(12, dtype=torch.float64)
    assert torch.allclose(op(v), h @ v, rtol=1e-10)
    assert op.dtype == torch.float64 and op.num_hvps == 3


def test_filter_normalized_direction():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    dirs = filter_normalized_direction(model, torch.Generator().manual_seed(0))
    for p, d in zip(model.parameters(), dirs):
        assert d.shape == p.shape
        if p.dim() <= 1:
            assert torch.count_nonzero(d) == 0
        else:
            assert torch.allclose(d.reshape(len(d), -1).norm(dim=1), p.reshape(len(p), -1).norm(dim=1), rtol=1e-5)
            assert not torch.allclose(d, p)


def relu_net():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)).double()


@pytest.fixture
def relu_data():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(64, 6, generator=g, dtype=torch.float64)
    return [(x, torch.randint(0, 4, (64,), generator=g))]


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_msharpness_nonnegative_and_grows_with_rho(relu_data, norm):
    model = relu_net()
    values = [sharpness(model, F.cross_entropy, relu_data, rho=r, norm=norm, m=16, steps=10).value
              for r in (0.01, 0.05, 0.2)]
    assert values[0] >= 0 and values[0] < values[1] < values[2]
    avg = [sharpness(model, F.cross_entropy, relu_data, rho=r, kind="average", n_samples=8).value
           for r in (0.01, 0.1)]
    assert avg[0] < avg[1]


def test_adaptive_sharpness_is_invariant_to_filter_rescaling(relu_data):
    model = relu_net()
    scaled = relu_net()
    alpha = torch.linspace(0.2, 5.0, 8, dtype=torch.float64)
    with torch.no_grad():
        scaled[0].weight.mul_(alpha[:, None]); scaled[0].bias.mul_(alpha)
        scaled[2].weight.div_(alpha[None, :])
    x = relu_data[0][0]
    assert torch.allclose(model(x), scaled(x), atol=1e-12)  # same function
    kw = dict(rho=0.1, m=64, steps=5)
    a = sharpness(model, F.cross_entropy, relu_data, adaptive=True, **kw).value
    b = sharpness(scaled, F.cross_entropy, relu_data, adaptive=True, **kw).value
    assert a > 0 and a == pytest.approx(b, rel=1e-8)
    s_a = sharpness(model, F.cross_entropy, relu_data, adaptive=False, **kw).value
    s_b = sharpness(scaled, F.cross_entropy, relu_data, adaptive=False, **kw).value
    assert abs(s_a - s_b) > 1e-3 * s_a  # the standard kind is not invariant


def test_measures_leave_weights_buffers_and_mode_bit_identical():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 2 * 2, 3))
    model.train()
    with torch.no_grad():  # non-trivial running statistics
        model(torch.randn(16, 2, 4, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 2, 4, 4, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(2)]
    from sharpbench.sharpness import loss_line, loss_surface
    calls = [lambda: hessian_eigenvalues(model, F.cross_entropy, data, k=2, num_iters=4),
             lambda: hessian_trace(model, F.cross_entropy, data, n_samples=3),
             lambda: hessian_density(model, F.cross_entropy, data, num_iters=5),
             lambda: gradient_eigenvector_angle(model, F.cross_entropy, data, num_iters=3),
             lambda: sharpness(model, F.cross_entropy, data, rho=0.1, m=8, steps=2),
             lambda: sharpness(model, F.cross_entropy, data, rho=0.1, kind="average", adaptive=True, n_samples=2),
             lambda: loss_surface(model, F.cross_entropy, data, grid=3, progress=False),
             lambda: loss_line(model, F.cross_entropy, data, before, {k: v * 0.5 for k, v in before.items()},
                               points=3, progress=False)]
    for call in calls:
        call()
        assert model.training and all(m.training for m in model.modules())
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k]), k
        assert all(p.grad is None for p in model.parameters())


def test_bad_input_is_refused(relu_data):
    model = relu_net()
    with pytest.raises(ValueError, match="kind"):
        sharpness(model, F.cross_entropy, relu_data, rho=0.1, kind="best")
    with pytest.raises(ValueError, match="rho"):
        sharpness(model, F.cross_entropy, relu_data, rho=0.0)
    with pytest.raises(ValueError, match="m \\(samples"):
        sharpness(model, F.cross_entropy, relu_data, rho=0.1, m=1000)
    with pytest.raises(ValueError, match="empty"):
        hessian_eigenvalues(model, F.cross_entropy, [])


def test_line_ends_at_both_states_even_when_end_is_the_live_state_dict(relu_data):
    from sharpbench.sharpness import evaluate, loss_line
    model, other = relu_net(), nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)).double()
    line = loss_line(model, F.cross_entropy, relu_data, start=other.state_dict(), end=model.state_dict(),
                     points=3, t_range=(0.0, 1.0), progress=False)
    assert line.loss[0] == pytest.approx(evaluate(other, F.cross_entropy, relu_data)[0], rel=1e-12)
    assert line.loss[-1] == pytest.approx(evaluate(model, F.cross_entropy, relu_data)[0], rel=1e-12)

"""fp16 loss scaling with a two-pass optimizer: unscale every pass, skip on overflow, never leave
the weights perturbed; gradient clipping acts on the base step's gradient."""
import torch
import torch.nn.functional as F
from torch import nn

from sharpbench.amp import DynamicLossScaler
from sharpbench.module import SharpnessModule
from sharpbench.optim import SAM
from sharpbench.optim.context import StepContext


def setup(scale):
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    scaler = DynamicLossScaler(init_scale=scale, growth_interval=2)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    seen = []

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.unscale_(list(model.parameters()))
        seen.append(model.weight.grad.detach().clone())
        return loss

    return model, opt, scaler, closure, seen, (x, y)


def step(opt, scaler, closure):
    return opt.step(closure, context=StepContext(before_base_step=scaler.step_is_finite))


def test_overflow_skips_the_step_and_restores_weights():
    model, opt, scaler, closure, _, _ = setup(scale=1e39)  # loss × scale overflows float32
    before = [p.detach().clone() for p in model.parameters()]
    step(opt, scaler, closure)
    assert scaler.update() is False
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b)  # neither stepped nor left perturbed
    assert scaler.scale_value == 0.5e39


def test_unscaled_gradients_equal_full_precision_ones_and_scale_grows():
    model, opt, scaler, closure, seen, (x, y) = setup(scale=2.0 ** 10)
    w = [p.detach().clone().requires_grad_() for p in model.parameters()]
    reference = torch.autograd.grad(F.cross_entropy(x @ w[0].T + w[1], y), w)[0]
    step(opt, scaler, closure)
    torch.testing.assert_close(seen[0], reference)  # the optimizer saw true gradients in pass 1
    assert scaler.update() is True
    step(opt, scaler, closure)
    scaler.update()
    assert scaler.scale_value == 2.0 ** 11  # grown after growth_interval clean steps


def test_gradient_clipping_limits_the_base_step_gradient():
    model = nn.Linear(4, 3)
    module = SharpnessModule(model, {"name": "sgd", "lr": 0.1}, {"name": "constant"},
                             num_classes=3, epochs=1, grad_clip=0.01)
    for p in model.parameters():
        p.grad = torch.full_like(p, 10.0)
    assert module.before_base_step() is True
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert abs(norm.item() - 0.01) < 1e-6

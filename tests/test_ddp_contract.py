"""DDP contract of the SAM machinery: perturb with the local gradient, step with the average."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from sharpbench.module import all_reduce_mean
from sharpbench.optim import SAM
from sharpbench.optim.context import StepContext

pytestmark = pytest.mark.e2e  # runs sharpbench end to end (make test-quick leaves it out)


def test_perturbation_is_local_and_base_step_uses_reduced_gradients():
    torch.manual_seed(0)
    model = nn.Linear(3, 2, bias=False)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=1.0)
    w0 = model.weight.detach().clone()
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    seen = {}
    other_rank = torch.full_like(w0, 0.5)  # what "the other device" contributes

    def reducer(grads):
        seen.setdefault("calls", 0)
        seen["calls"] += 1
        for g in grads:
            g.add_(other_rank).div_(2)


    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if "g_local" not in seen:
            seen["g_local"] = model.weight.grad.detach().clone()
            seen["w_perturbed"] = None
        else:
            seen["w_perturbed"] = model.weight.detach().clone()
            seen["g_p"] = model.weight.grad.detach().clone()
        return loss

    opt.step(closure, context=StepContext(grad_reducer=reducer))
    g = seen["g_local"]
    torch.testing.assert_close(seen["w_perturbed"], w0 + 0.1 * g / g.norm())  # local gradient
    assert seen["calls"] == 1  # reduced once, before the base step
    torch.testing.assert_close(model.weight.detach(), w0 - (seen["g_p"] + other_rank) / 2)


def test_sync_perturbation_reduces_before_perturbing():
    model = nn.Linear(3, 2, bias=False)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=1.0)
    calls = []
    context = StepContext(grad_reducer=lambda grads: calls.append(len(grads)),
                          reduce_perturbation_grads=True)
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.step(closure, context=context)
    assert calls == [1, 1]


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.5, momentum=0.9)
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    for _ in range(3):
        x, y = torch.randn(8, 3, generator=g), torch.randint(0, 2, (8,), generator=g)

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure, context=StepContext(grad_reducer=all_reduce_mean))
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_two_processes_stay_in_sync(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    a, b = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)

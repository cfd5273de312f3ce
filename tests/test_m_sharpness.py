"""m-sharpness on one device (``optimizer.m``): each chunk of m samples perturbs with its own
gradient and the base step averages; checked against a hand-written loop in float64, against DDP
over batch/m processes (gloo), and through the training command."""
from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from sharpbench.module import all_reduce_mean
from sharpbench.optim import GSAM, SAM, FriendlySAM
from sharpbench.optim.context import StepContext

DT = torch.float64
LR, MOM, WD, RHO = 0.1, 0.9, 5e-4, 0.3
BATCH, M, STEPS = 12, 4, 4


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)


def batches(n: int = STEPS, size: int = BATCH, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 5, generator=g, dtype=DT), torch.randint(0, 3, (size,), generator=g))
            for _ in range(n)]


def closure_over(opt, model, x, y):
    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return closure


def chunked_context(opt, model, x, y) -> StepContext:
    return StepContext(chunk_closures=lambda m: [closure_over(opt, model, x[i:i + m], y[i:i + m])
                                                 for i in range(0, len(y), m)])


def test_sam_with_m_matches_hand_written_chunks():
    model, ref = make_model(), make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, m=M, lr=LR, momentum=MOM,
              weight_decay=WD)
    params, bufs = list(ref.parameters()), None
    for x, y in batches():
        hs, losses = [], []
        for i in range(0, BATCH, M):                     # each chunk: its own perturbation
            xc, yc = x[i:i + M], y[i:i + M]
            loss = F.cross_entropy(ref(xc), yc)
            g = torch.autograd.grad(loss, params)
            norm = torch.sqrt(sum((gi * gi).sum() for gi in g))
            w = [p.detach().clone() for p in params]
            with torch.no_grad():
                for p, gi in zip(params, g):
                    p.add_(gi * (RHO / (norm + 1e-12)))   # 1e-12: sharpbench's guard
            hs.append(torch.autograd.grad(F.cross_entropy(ref(xc), yc), params))
            with torch.no_grad():
                for p, wi in zip(params, w):
                    p.copy_(wi)
            losses.append(loss.detach())
        h = [sum(parts) / len(hs) for parts in zip(*hs)]
        with torch.no_grad():                            # SGD, heavy ball, L2 at w
            d = [hi + WD * p for hi, p in zip(h, params)]
            bufs = [di.clone() for di in d] if bufs is None else [MOM * b + di for b, di in zip(bufs, d)]
            for p, b in zip(params, bufs):
                p.sub_(LR * b)
        loss = opt.step(closure_over(opt, model, x, y), context=chunked_context(opt, model, x, y))
        torch.testing.assert_close(loss, torch.stack(losses).mean())
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-14)


def test_m_equal_to_the_batch_is_sam():
    a, b = make_model(), make_model()
    oa = SAM(a.parameters(), torch.optim.SGD, rho=RHO, m=BATCH, lr=LR)
    ob = SAM(b.parameters(), torch.optim.SGD, rho=RHO, lr=LR)
    for x, y in batches():
        oa.step(closure_over(oa, a, x, y), context=chunked_context(oa, a, x, y))
        ob.step(closure_over(ob, b, x, y))
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-15)


def test_m_is_refused_where_a_chunk_would_advance_state_and_without_chunks():
    with pytest.raises(ValueError, match="does not take m"):
        FriendlySAM(make_model().parameters(), torch.optim.SGD, m=4, lr=0.1)
    from sharpbench.optim import XSAM
    with pytest.raises(ValueError, match="does not take m"):     # a SAM subclass that opts out
        XSAM(make_model().parameters(), torch.optim.SGD, m=4, lr=0.1)
    with pytest.raises(ValueError, match="integer >= 1"):
        SAM(make_model().parameters(), torch.optim.SGD, m=0, lr=0.1)
    model = make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, m=4, lr=0.1)
    x, y = batches(1)[0]
    with pytest.raises(ValueError, match="chunk_closures"):
        opt.step(closure_over(opt, model, x, y))


# ----------------------------------------------------------------- equal to DDP over batch/m ranks
def _ddp_worker(rank, world, port, method, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = make_model()
    opt = make_opt(method, model, m=None)
    m = BATCH // world
    for x, y in batches():
        xs, ys = x[rank * m:(rank + 1) * m], y[rank * m:(rank + 1) * m]   # this rank's share
        opt.step(closure_over(opt, model, xs, ys), context=StepContext(grad_reducer=all_reduce_mean))
    torch.save([p.detach() for p in model.parameters()], f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def make_opt(method, model, m):
    kw = dict(lr=LR, momentum=MOM, weight_decay=WD, m=m)
    if method == "gsam":
        return GSAM(model.parameters(), torch.optim.SGD, rho=RHO, gsam_alpha=0.3, **kw)
    return SAM(model.parameters(), torch.optim.SGD, rho=RHO, **kw)


@pytest.mark.e2e
@pytest.mark.parametrize("method", ["sam", "gsam"])
def test_m_on_one_device_equals_ddp_over_batch_over_m_processes(tmp_path, method):
    world = BATCH // M
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(world, port, method, str(tmp_path)), nprocs=world, join=True)
    ddp = torch.load(tmp_path / "rank0.pt")
    model = make_model()
    opt = make_opt(method, model, m=M)
    for x, y in batches():
        opt.step(closure_over(opt, model, x, y), context=chunked_context(opt, model, x, y))
    for p, q in zip(model.parameters(), ddp):
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=1e-14)


@pytest.mark.e2e
def test_training_with_m_counts_two_passes_and_a_bad_m_is_refused(tmp_path):
    from sharpbench.train import main  # noqa: F401  (the command below runs it)
    import subprocess
    import sys
    common = ["experiment=smoke", "optimizer=sam", "trainer.max_epochs=1",
              "dataset.train_subset=256", "dataset.test_subset=128", "logger=none",
              "trainer.enable_progress_bar=false"]
    res = subprocess.run([sys.executable, "-m", "sharpbench.train", *common, "optimizer.m=16",
                          f"hydra.run.dir={tmp_path / 'ok'}"], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    record = json.loads((tmp_path / "ok" / "metrics.json").read_text())
    assert record["status"] == "completed" and record["passes_per_step"] == 2.0
    assert record["config"]["optimizer"]["m"] == 16
    res = subprocess.run([sys.executable, "-m", "sharpbench.train", *common, "optimizer.m=24",
                          f"hydra.run.dir={tmp_path / 'bad'}"], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode != 0
    assert "must divide" in res.stdout + res.stderr


def test_m_steps_have_no_host_sync_and_ops_independent_of_the_tensor_count():
    from sharpbench.bench import StepHarness
    from sharpbench.optim.factory import build_optimizer
    from sharpbench.profiling import count_dispatch
    ops = {}
    for layers in (1, 12):
        h = StepHarness("sam", f"mlp{layers}", 8, torch.device("cpu"))
        h.opt = build_optimizer(h.model, dict(h.cfg, m=4))
        counts = []
        for _ in range(3):
            with count_dispatch() as c:
                h.counts = c
                h.step()
                h.counts = None
            counts.append((c.ops, c.syncs))
        assert all(s == 0 for _, s in counts), counts
        ops[layers] = counts[-1][0]
    assert ops[1] == ops[12], ops

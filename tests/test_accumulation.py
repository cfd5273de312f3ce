"""Gradient accumulation (``trainer.micro_batches``): a batch run as k micro-batches. Checked in
float64 against the same updates written by hand, for every method of the registry, and through
the training command (passes, BatchNorm updates, equality with m-sharpness, bad settings)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sharpbench.bench import optimizer_config
from sharpbench.optim import SAM
from sharpbench.optim.factory import method_registry
from sharpbench.optim.accumulation import accumulated_closure
from sharpbench.optim.base import SharpnessAwareOptimizer
from sharpbench.optim.context import StepContext
from sharpbench.optim.factory import build_optimizer
from sharpbench.optim.registry import methods

DT = torch.float64
BATCH, K, STEPS = 12, 3, 4
MICRO = BATCH // K


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)


def batches(n: int = STEPS, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(BATCH, 5, generator=g, dtype=DT),
             torch.randint(0, 3, (BATCH,), generator=g)) for _ in range(n)]


def closure_over(opt, model, x, y, zero=True):
    def closure(*args, **kwargs):
        if zero:
            opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return closure


def micro_closures(opt, model, x, y, zero=True):
    return [closure_over(opt, model, x[i:i + MICRO], y[i:i + MICRO], zero)
            for i in range(0, BATCH, MICRO)]


def test_accumulated_sgd_matches_hand_written_mean_of_micro_gradients():
    model, ref = make_model(), make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    params, bufs = list(ref.parameters()), None
    for step, (x, y) in enumerate(batches()):
        parts = [torch.autograd.grad(F.cross_entropy(ref(x[i:i + MICRO]), y[i:i + MICRO]), params)
                 for i in range(0, BATCH, MICRO)]
        with torch.no_grad():
            d = [sum(g) / K + 5e-4 * p for g, p in zip(zip(*parts), params)]
            bufs = d if bufs is None else [0.9 * b + di for b, di in zip(bufs, d)]
            for p, b in zip(params, bufs):
                p.sub_(0.1 * b)
        # a closure that does not zero the gradients (davda54/sam's README) accumulates nothing
        # extra either
        opt.step(accumulated_closure(micro_closures(opt, model, x, y, zero=step % 2 == 0),
                                     model.parameters()))
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-15)


def test_sam_perturbs_each_micro_batch_with_its_own_gradient_by_hand():
    """SAM (a method that takes m) with context.micro_batch: per micro-batch g_i, e_i, h_i; the
    base step with mean h_i, written out here."""
    model, ref = make_model(), make_model()
    rho, lr = 0.3, 0.1
    opt = SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=lr)
    params = list(ref.parameters())
    for x, y in batches():
        hs = []
        for i in range(0, BATCH, MICRO):
            xc, yc = x[i:i + MICRO], y[i:i + MICRO]
            g = torch.autograd.grad(F.cross_entropy(ref(xc), yc), params)
            norm = torch.sqrt(sum((gi * gi).sum() for gi in g))
            e = [gi * (rho / (norm + 1e-12)) for gi in g]
            with torch.no_grad():
                for p, ei in zip(params, e):
                    p.add_(ei)
            hs.append(torch.autograd.grad(F.cross_entropy(ref(xc), yc), params))
            with torch.no_grad():
                for p, ei in zip(params, e):
                    p.sub_(ei)
        with torch.no_grad():
            for p, h in zip(params, zip(*hs)):
                p.sub_(lr * sum(h) / K)
        closures = micro_closures(opt, model, x, y)
        opt.step(accumulated_closure(closures, model.parameters()),
                 context=StepContext(micro_batch=MICRO, chunk_closures=lambda m: closures))
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-14)


def plain_closure_methods() -> list[str]:
    """Methods whose step needs nothing but the closure and that perturb with the accumulated
    gradient (no m): each, accumulated over micro-batches, must equal its full-batch step on a
    model without BatchNorm."""
    out = []
    for name, info in methods().items():
        cls = info.cls
        if info.needs or (cls is not None and getattr(cls, "takes_m", False)):
            continue
        out.append(name)
    return out


@pytest.mark.parametrize("name", plain_closure_methods())
def test_methods_without_m_accumulate_to_their_full_batch_step(name):
    a, b = make_model(), make_model()
    cfg = dict(optimizer_config(name), lr=0.05)   # its YAML's defaults
    oa, ob = build_optimizer(a, cfg), build_optimizer(b, cfg)
    for x, y in batches(6):
        ctx_a = StepContext(micro_batch=MICRO, model=a)
        oa.step(accumulated_closure(micro_closures(oa, a, x, y), a.parameters()),
                **({"context": ctx_a} if isinstance(oa, SharpnessAwareOptimizer) else {}))
        kw = {"context": StepContext(model=b)} if isinstance(ob, SharpnessAwareOptimizer) else {}
        ob.step(closure_over(ob, b, x, y), **kw)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_m_methods_with_a_micro_batch_equal_m_sharpness_and_refuse_a_bad_m():
    a, b = make_model(), make_model()
    oa = SAM(a.parameters(), torch.optim.SGD, rho=0.2, lr=0.1, m=2)
    ob = SAM(b.parameters(), torch.optim.SGD, rho=0.2, lr=0.1, m=2)
    for x, y in batches():
        chunks = lambda opt, model: (lambda m: [closure_over(opt, model, x[i:i + m], y[i:i + m])
                                                for i in range(0, BATCH, m)])
        oa.step(accumulated_closure(micro_closures(oa, a, x, y), a.parameters()),
                context=StepContext(micro_batch=MICRO, chunk_closures=chunks(oa, a)))
        ob.step(closure_over(ob, b, x, y), context=StepContext(chunk_closures=chunks(ob, b)))
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    bad = SAM(a.parameters(), torch.optim.SGD, rho=0.2, lr=0.1, m=3)
    x, y = batches(1)[0]
    with pytest.raises(ValueError, match="must divide the micro-batch"):
        bad.step(closure_over(bad, a, x, y), context=StepContext(micro_batch=MICRO,
                                                                 chunk_closures=chunks(bad, a)))


def test_every_registered_method_is_covered():
    """Each method is either accumulated to its full-batch step above, or takes m (per micro-batch
    perturbation, equal to m-sharpness), or reads the step context (trained with micro-batches in
    the smoke test below)."""
    covered = set(plain_closure_methods())
    for name, cls in method_registry().items():
        assert name in covered or getattr(cls, "takes_m", False) or methods()[name].needs, name


# ----------------------------------------------------------------------------- training command
def smoke(compose_cfg, tmp_path, *overrides):
    from sharpbench.train import train
    cfg = compose_cfg(["experiment=smoke", "trainer.enable_progress_bar=false",
                       "dataset.train_subset=256", "dataset.batch_size=32", *overrides])
    return train(cfg, tmp_path, list(overrides))


def final_weights(run_dir):
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    return ckpt["state_dict"], ckpt["global_step"]


def test_training_with_micro_batches_is_m_sharpness_and_updates_bn_once_per_step(compose_cfg,
                                                                                  tmp_path):
    acc = smoke(compose_cfg, tmp_path / "acc", "optimizer=sam", "trainer.micro_batches=4")
    msharp = smoke(compose_cfg, tmp_path / "m", "optimizer=sam", "optimizer.m=8")
    assert acc["status"] == msharp["status"] == "completed"
    assert acc["passes_per_step"] == pytest.approx(2.0)
    sd_a, steps = final_weights(tmp_path / "acc")
    sd_m, _ = final_weights(tmp_path / "m")
    for k in sd_a:
        torch.testing.assert_close(sd_a[k], sd_m[k], rtol=0, atol=1e-6)
    tracked = [v for k, v in sd_a.items() if k.endswith("num_batches_tracked")]
    assert tracked and all(int(t) == steps == acc["steps"] for t in tracked)
    assert json.loads((tmp_path / "acc" / "metrics.json").read_text())["config"]["trainer"][
        "micro_batches"] == 4


@pytest.mark.parametrize("method", ["sgd", "looksam", "ssam_f", "imb_sam", "esam"])
def test_training_with_micro_batches_runs_every_kind_of_method(compose_cfg, tmp_path, method):
    record = smoke(compose_cfg, tmp_path, f"optimizer={method}", "trainer.micro_batches=2")
    assert record["status"] == "completed"
    assert record["passes_per_step"] >= 1.0


def test_bad_micro_batches_are_refused_before_training(compose_cfg, tmp_path):
    from sharpbench.checks import ConfigError
    with pytest.raises(ConfigError, match="micro_batches=5 must divide"):
        smoke(compose_cfg, tmp_path / "a", "optimizer=sam", "trainer.micro_batches=5")
    with pytest.raises(ConfigError, match="optimizer.m=16 must divide the micro-batch"):
        smoke(compose_cfg, tmp_path / "b", "optimizer=sam", "trainer.micro_batches=4",
              "optimizer.m=16")


def test_lightnings_accumulation_key_points_to_micro_batches(compose_cfg, tmp_path):
    from sharpbench.checks import ConfigError
    with pytest.raises(ConfigError, match="trainer.micro_batches=k"):
        smoke(compose_cfg, tmp_path, "optimizer=sam", "+trainer.accumulate_grad_batches=4")

"""Speed proxies that carry over to any device: ops per optimizer step do not grow with the
number of parameter tensors, no host sync in a training step, no recompilation under compile."""
import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from sharpbench.bench import (METHODS, BenchConfigError, StepHarness, optimizer_config,
                              parse_options, refresh_period)
from sharpbench.optim import registry
from sharpbench.profiling import StepCounter, count_dispatch

ALL = registry.names()  # every registered method


def regular_ops(method: str, layers: int, steps: int = 3) -> list[int]:
    """Ops the optimizer dispatches (closures excluded) on each regular step after two warm-up
    steps, on an MLP with ``2·layers + 4`` parameter tensors."""
    h = StepHarness(method, f"mlp{layers}", 8, torch.device("cpu"))
    period = getattr(h.opt, "update_interval", None)
    out = []
    for i in range(2 + steps):
        refresh = h.refresh_due()
        with count_dispatch() as c:
            h.counts = c
            h.step()
            h.counts = None
        if i >= 2 and not refresh:
            out.append(c.ops)
    assert out, (method, period)
    return out


@pytest.mark.parametrize("method", ALL)
def test_ops_per_step_do_not_grow_with_parameter_tensors(method):
    few, many = regular_ops(method, 1), regular_ops(method, 12)
    assert len(set(few)) == 1 and few == many[:len(few)], (few, many)
    assert few[0] <= 40, few   # a handful of foreach calls, not a loop


@pytest.mark.parametrize("method", ["ssam_f", "ssam_d"])
def test_mask_refresh_steps_do_not_grow_with_parameter_tensors_or_sync(method):
    """SSAM's amortised mask refresh (closures excluded): masks, scores and |g| live in flat
    buffers, and SSAM-D knows its mask's size without reading it back."""
    from sharpbench.bench import step_counts
    out = {}
    for layers in (1, 12):
        h = StepHarness(method, f"mlp{layers}", 8, torch.device("cpu"))
        if hasattr(h.opt, "num_samples"):
            h.opt.num_samples = 8
        counts = step_counts(h, 11)
        assert counts["refresh_steps"] == 2 and counts["refresh_syncs"] == 0, counts   # steps 5, 10
        out[layers] = counts["refresh_ops"]
    assert out[1] == out[12] <= 60, out


def test_counter_sees_scalar_reads_and_copies():
    t = torch.ones(3)
    with count_dispatch() as c:
        float(t.sum()), t.tolist(), bool(t.sum() > 0)
        with c.paused():
            t + 1
    assert (c.syncs, c.ops) == (3, 5), dict(c.by_op)   # sum, read, sum, gt, read; not t + 1
    assert any("test_speed.py" in site for site in c.sync_sites)


class Counter(StepCounter, L.pytorch.callbacks.Callback):
    pass


@pytest.mark.parametrize("method", ALL)
def test_no_host_sync_in_a_training_step(method):
    """The whole step (closures included), every method at its defaults, regular steps."""
    h = StepHarness(method, "mlp1", 8, torch.device("cpu"))
    if hasattr(h.opt, "num_samples"):
        h.opt.num_samples = 8            # SSAM-F: one Fisher pass per refresh
    period = refresh_period(h.opt)
    sites = {}
    for i in range(7):
        with count_dispatch() as c:
            h.step()
        if not period or i % period != 0:
            sites[i] = dict(c.sync_sites)
    assert sites and all(not s for s in sites.values()), sites


LIGHTNING_FAST = ("sam", "ssam_f", "adamw")   # one-pass, two-pass with an extra input, fused base


@pytest.mark.parametrize("method", [pytest.param(m, marks=() if m in LIGHTNING_FAST
                                                 else pytest.mark.slow) for m in ALL])
def test_no_host_sync_in_a_lightning_training_step(method, tmp_path, monkeypatch):
    """The path ``sharpbench.train`` runs: Lightning, SharpnessModule, its closures. Logging
    steps are boundaries where the logged values are read; short epochs are logged at every
    step, so the interval is kept at 50 here to leave steps that are not logging steps."""
    import sharpbench.run_logging
    monkeypatch.setattr(sharpbench.run_logging, "dense_log_interval", lambda n, steps: n)
    from sharpbench.bench import synthetic_data
    from sharpbench.models import build_model
    from sharpbench.module import SharpnessModule
    torch.manual_seed(0)
    data = synthetic_data(7, 16, False)
    cfg = optimizer_config(method)
    if method == "imb_sam":
        cfg["class_threshold"] = 1e9   # every class is tail: the three passes do real work
    if method == "ssam_f":
        cfg["num_samples"] = cfg["fisher_batch_size"] = 16   # one Fisher pass per refresh
    module = SharpnessModule(build_model("tiny_cnn", num_classes=10), cfg,
                             {"name": "constant", "warmup_epochs": 0}, num_classes=10, epochs=1,
                             class_counts=data.train_class_counts)
    counter = Counter()
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_val_batches=0, logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, num_sanity_val_steps=0, callbacks=[counter],
                        default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    period = refresh_period(module.optimizers(use_pl_optimizer=False))
    regular = {i: dict(s.sync_sites) for i, s in enumerate(counter.steps)
               if (not period or i % period != 0) and i not in counter.logging_steps}
    assert len(counter.steps) == 7 and regular
    assert all(not sites for sites in regular.values()), regular


@pytest.mark.parametrize("bn_policy", ["first_pass", "both_passes", "momentum_zero"])
def test_compiled_model_keeps_one_graph_across_passes_and_steps(bn_policy):
    """No BatchNorm policy changes a module attribute between passes (frozen statistics and
    "momentum 0" are saved and restored buffers), so dynamo compiles the forward once: no
    recompilation between SAM's two passes or between steps."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    h = StepHarness("sam", "tiny_cnn", 8, torch.device("cpu"), compile=True,
                    compile_backend="eager",   # dynamo's guards, without inductor's compile time
                    bn_policy=bn_policy)
    for _ in range(3):
        h.step()
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["recompiles"], dict(counters["recompiles"])
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize("method", ALL)
def test_every_method_steps_compiled_without_recompiling(method):
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    h = StepHarness(method, "tiny_cnn", 8, torch.device("cpu"), compile=True)
    h.step()
    graphs = counters["stats"]["unique_graphs"]
    for _ in range(3):
        h.step()
    assert counters["stats"]["unique_graphs"] == graphs == 1, dict(counters["stats"])
    torch._dynamo.reset()


def test_bench_options_are_checked():
    o = parse_options(["model=tiny_cnn", "batch=8", "compile=true", "methods=sgd,sam"])
    assert o["batch"] == 8 and o["compile"] is True and o["device"] == "cpu"
    for bad in (["batch=0"], ["methods=sgd,nope"], ["colour=red"], ["compile=maybe"], ["model"],
                ["precision=fp8"]):
        with pytest.raises(BenchConfigError):
            parse_options(bad)
    with pytest.raises(BenchConfigError, match="saf its closure_with, dataset_size, epoch"):
        parse_options(["driver_methods=sgd,saf"])     # the driver's own loop lacks SAF's fields


def test_bench_help_and_bad_option_exit_codes(capsys):
    from sharpbench.bench import main
    assert main(["--help"]) == 0 and "key=value" in capsys.readouterr().out
    assert main(["batch=zero"]) == 2 and "batch" in capsys.readouterr().err


def test_bench_writes_markdown_and_csv(tmp_path):
    from sharpbench.bench import main
    rc = main(["model=mlp2", "batch=8", "steps=1", "repeats=1", "warmup=1", "count_steps=4",
               "mlp_layers=3", "methods=sgd,sam,ssam_d", "sections=optim", f"out={tmp_path}"])
    assert rc == 0
    text = (tmp_path / "bench.md").read_text()
    assert "| `sam` |" in text and "ops/step" in text
    rows = (tmp_path / "bench.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[0].startswith("section")


def test_bench_cost_section_prices_refreshes_and_fisher(tmp_path):
    """The amortised cost counts refresh steps: A²SAM's solves at their FLOP price, SSAM-F's Fisher
    samples against a training batch of ``batch`` images, two-pass methods exactly 2."""
    from sharpbench.bench import bench_cost
    from sharpbench.cost import pass_flops
    from sharpbench.bench import build_net
    o = parse_options(["model=mlp2", "batch=128", "cost_batch=4", "cost_periods=1",
                       "methods=sgd,sam,a2sam,ssam_f"])
    rows = {r["method"]: r for r in bench_cost(o, torch.device("cpu"), lambda m: None)}
    assert rows["sgd"]["cost_per_step"] == 1.0 and rows["sam"]["cost_per_step"] == 2.0
    ssam = rows["ssam_f"]          # 256 Fisher samples every K = 5 steps, priced at batch 128
    assert ssam["period"] == 5 and ssam["cost_per_step"] == pytest.approx(2 + (256 / 128) / 5)
    a2 = rows["a2sam"]             # one refresh in the measured period: 1 + (graph + n·HVP)/interval
    prices = pass_flops(build_net("mlp2"), (4, 3, 32, 32), 10)
    assert a2["solves"] == 1 and a2["steps"] == a2["period"]
    expected = 1 + (prices["graph_cost"] + a2["iterations_mean"] * prices["hvp_cost"]) / a2["period"]
    assert a2["cost_per_step"] == pytest.approx(expected)
    assert a2["claimed_cost"].startswith("(interval + k)/interval")
    assert 0 < a2["residual_max"] < float("inf") and a2["eigen_tol"] > 0


def test_bench_fisher_section_times_each_exact_method(tmp_path):
    from sharpbench.bench import bench_fisher
    o = parse_options(["model=mlp2", "batch=16", "fisher_samples=8", "fisher_batch=4", "repeats=1"])
    rows = bench_fisher(o, torch.device("cpu"), lambda m: None)
    assert [r["method"] for r in rows] == ["loop", "vmap", "batched", "chunked"]
    assert all(r["ms"] > 0 and r["passes"] > 0 for r in rows)
    assert [r["auto"] for r in rows] == [True, False, False, False]   # the loop on CPU

"""Speed benchmark of every optimizer: ``python -m sharpbench.bench [key=value ...]``.

One process, interleaved repeats (round r times every method once before round r+1 starts, so
a slow phase of a shared machine hits them all alike), warm-up excluded, medians with min/max.
Sections (``sections=optim,driver,pipeline,compile``):

- ``optim``: per method, ms/step and images/s (plain PyTorch loop on one fixed random batch of
  CIFAR shape: the optimizer's cost, not the data's), the ratio to SGD (to AdamW for HATAM),
  forward/backward passes and HVPs per step (counted), **ops per step** (aten operators the
  optimizer dispatches outside the forward/backward passes, ``sharpbench.profiling``) on the
  chosen model and on an MLP of ``mlp_layers`` small layers (does it grow with the number of
  parameter tensors?), **host syncs per step** (the whole step), regular steps and amortised
  refresh steps (mask refresh, eigen-solve) reported apart, and peak memory (CUDA);
- ``cost``: per method, the **amortised cost per step**, refresh steps included: ``cost_periods``
  whole refresh periods (eigen-solve, mask or Fisher refresh) after a first period of warm-up (the
  cold first solve), a fresh random batch of ``cost_batch`` images every step; passes, Hessian
  graphs and Hessian-vector products counted and priced by their FLOPs (``sharpbench.cost``: SGD
  = 1, device-independent; SSAM-F's Fisher samples priced against a training batch of ``batch``
  images, as in a run at that batch), beside the cost the method's source claims (the registry's
  ``claimed_cost``), with the eigen-solves' iterations and largest residual, and the wall time per
  step against SGD's in the same run;
- ``fisher``: SSAM-F's per-sample Fisher over ``fisher_samples`` samples by each exact method
  (the loop of single-sample passes, ``torch.func`` ``vmap`` and a batched backward, ``fisher_batch``
  samples per call), in milliseconds and in training passes of ``batch`` images, and the method
  ``fisher_method=auto`` picks on this device;
- ``driver``: the Lightning training step (``SharpnessModule``, the path ``sharpbench.train``
  runs) against a plain loop over the same ``DeviceLoader``, model and optimizer, and the host
  syncs per step the Lightning path makes; every (model, method) pair once per round; and end
  to end, each method's Lightning step against SGD's (AdamW's for HATAM) in the same round;
- ``pipeline``: the whole sharpbench pipeline (device-resident data, batched augmentation,
  Lightning) against the conventional loop: torchvision ``DataLoader`` + per-image
  ``RandomCrop``/``RandomHorizontalFlip``/``ToTensor``/``Normalize``;
- ``compile``: ``torch.compile`` of the model's forward on and off, step time, and the number of
  graphs dynamo compiled (recompilation between passes or steps would show here).

Writes ``bench.md`` and ``bench.csv`` (atomically) under ``out``. Options, with defaults::

    model=resnet18 batch=128 device=auto precision=32 channels_last=false compile=false
    methods=<every registered method with bench=True: sharpbench.optim.registry>
    warmup=2 steps=2 repeats=3 count_steps=12 mlp_layers=200
    driver_models=tiny_cnn,resnet18 driver_methods=sgd,sam,adamw,hatam driver_steps=4 loader_workers=2
    compile_methods=sgd,sam compile_model=<model> sections=optim,cost,fisher,driver,pipeline,compile
    out=outputs/bench threads=0 cost_batch=8 cost_periods=3 fisher_samples=256 fisher_batch=32

``precision``: 32, bf16-mixed, 16-mixed. On a GPU: ``python -m sharpbench.bench device=cuda
precision=bf16-mixed channels_last=true compile=true``.
"""
from __future__ import annotations

import csv
import io
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .fileio import atomic_write_text
from .optim import registry
from .optim.context import StepContext

METHODS = tuple(name for name, info in registry.methods().items() if info.bench)
SECTIONS = ("optim", "cost", "fisher", "driver", "pipeline", "compile")
PRECISIONS = {"32": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
DEFAULTS: dict[str, Any] = dict(
    model="resnet18", batch=128, device="auto", precision="32", channels_last=False,
    compile=False, methods=",".join(METHODS), warmup=2, steps=2, repeats=3, count_steps=12,
    mlp_layers=200, driver_models="tiny_cnn,resnet18", driver_methods="sgd,sam,adamw,hatam", driver_steps=4,
    loader_workers=2, compile_methods="sgd,sam", compile_model="", sections=",".join(SECTIONS),
    out="outputs/bench", threads=0, cost_batch=8, cost_periods=3, fisher_samples=256,
    fisher_batch=32)
CONF = Path(__file__).resolve().parent / "conf" / "optimizer"
TAIL_COUNTS = torch.tensor([5000, 2000, 800, 300, 120, 50, 20, 10, 5, 2])  # ImbSAM's split


class BenchConfigError(ValueError):
    """A bad option; the message says what to change."""


# ---------------------------------------------------------------------------------- options
def parse_options(argv: list[str]) -> dict[str, Any]:
    """``key=value`` pairs over :data:`DEFAULTS` (types follow the defaults)."""
    opts = dict(DEFAULTS)
    for arg in argv:
        key, sep, value = arg.partition("=")
        key = key.lstrip("-").replace("-", "_")
        if not sep:
            raise BenchConfigError(f"options are key=value, got {arg!r} (e.g. model=tiny_cnn)")
        if key not in DEFAULTS:
            raise BenchConfigError(f"unknown option {key!r}; known: {', '.join(DEFAULTS)}")
        default = DEFAULTS[key]
        try:
            if isinstance(default, bool):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                opts[key] = value.lower() in ("true", "1", "yes")
            elif isinstance(default, int):
                opts[key] = int(value)
            else:
                opts[key] = value
        except ValueError:
            raise BenchConfigError(f"{key}={value!r}: expected {type(default).__name__}") from None
    if opts["device"] == "auto":
        opts["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    if opts["device"].startswith("cuda") and not torch.cuda.is_available():
        raise BenchConfigError("device=cuda but no CUDA device is visible; use device=cpu")
    if opts["precision"] not in PRECISIONS:
        raise BenchConfigError(f"precision must be one of {list(PRECISIONS)}, got {opts['precision']!r}")
    for key in ("methods", "driver_methods", "compile_methods"):
        unknown = [m for m in split(opts[key]) if not (CONF / f"{m}.yaml").is_file()]
        if unknown:
            raise BenchConfigError(f"{key}: unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    refused = {m: sorted(set(registry.methods()[m].needs) - set(PLAIN_RUN_OFFERS))
               for m in split(opts["driver_methods"]) if m in registry.methods()}
    refused = {m: missing for m, missing in refused.items() if missing}
    if refused:
        raise BenchConfigError(
            "driver_methods: the hand-written loop of the driver section does not offer "
            + "; ".join(f"{m} its {', '.join(missing)}" for m, missing in refused.items())
            + " (the Lightning module does): leave these methods out of driver_methods")
    unknown = [s for s in split(opts["sections"]) if s not in SECTIONS]
    if unknown:
        raise BenchConfigError(f"sections: unknown {unknown}; choose from {', '.join(SECTIONS)}")
    for key in ("batch", "steps", "repeats", "count_steps", "mlp_layers", "driver_steps"):
        if opts[key] < 1:
            raise BenchConfigError(f"{key} must be >= 1, got {opts[key]}")
    return opts


def split(value: str) -> list[str]:
    return [v for v in str(value).split(",") if v]


# ----------------------------------------------------------------------------- the harness
def optimizer_config(name: str) -> dict:
    """``conf/optimizer/<name>.yaml`` as Hydra composes it (the method's typed config's defaults,
    then the file's own keys)."""
    import copy
    from .schema import yaml_defaults
    return copy.deepcopy(yaml_defaults("optimizer", name))


def mlp(layers: int, width: int = 8) -> nn.Module:
    """``layers`` small linear layers (2·layers+4 parameter tensors) on CIFAR-shaped input."""
    body = [m for _ in range(layers) for m in (nn.Linear(width, width), nn.ReLU())]
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, width), nn.ReLU(), *body,
                         nn.Linear(width, 10))


def build_net(name: str) -> nn.Module:
    if name.startswith("mlp"):
        return mlp(int(name[3:] or 200))
    from .models import build_model
    return build_model(name, num_classes=10)


@dataclass
class StepHarness:
    """One method on one model and one fixed batch, stepped the way a user (or the module) does:
    the closure and the extra inputs the method declares, BatchNorm statistics updated as
    ``bn_policy`` says (by the first pass, by default)."""

    method: str
    model_name: str
    batch: int
    device: torch.device
    precision: str = "32"
    channels_last: bool = False
    compile: bool = False
    compile_backend: str = "inductor"
    bn_policy: str = "first_pass"   # which passes update BatchNorm statistics (optim/bn.py)
    passes: float = 0
    pass_batch: int = 0         # the batch a Fisher pass is priced against (0: ``batch``)
    extra_calls: int = 0
    counts: Any = None          # a DispatchCounts while ops are being counted
    epoch: int = 1000           # the epoch a step reports (SAF/MESA: past their kl_start_epoch)
    model: nn.Module = field(init=False)
    opt: torch.optim.Optimizer = field(init=False)

    def __post_init__(self):
        from .optim.factory import build_optimizer
        torch.manual_seed(0)
        self.model = build_net(self.model_name).to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.forward = (torch.compile(self.model, backend=self.compile_backend) if self.compile
                        else self.model)
        self.cfg = optimizer_config(self.method)
        self.opt = build_optimizer(self.model, self.cfg)
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(self.batch, 3, 32, 32, generator=gen).to(self.device)
        if self.channels_last:
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.y = torch.randint(0, 10, (self.batch,), generator=gen).to(self.device)
        self.class_counts = TAIL_COUNTS.to(self.device)  # ImbSAM's head/tail split
        amp = PRECISIONS[self.precision]
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=amp)) if amp else nullcontext

    def _uncounted(self):
        return self.counts.paused() if self.counts is not None else nullcontext()

    def closure(self, reduce=None, rows: slice | torch.Tensor | None = None, term=None):
        """The step's closure (over the batch, or its ``rows``: a chunk or the positions of some
        samples, priced by their share)."""
        x, y = (self.x, self.y) if rows is None else (self.x[rows], self.y[rows])
        self.passes += len(y) / self.batch
        with self._uncounted():
            self.opt.zero_grad(set_to_none=True)
            with self.autocast():
                logits = self.forward(x)
                ids = torch.arange(self.batch, device=y.device)
                extra = None if term is None else term(logits, x, ids if rows is None else ids[rows])
            if reduce is None:
                loss = F.cross_entropy(logits.float(), y)
            else:
                loss = reduce(F.cross_entropy(logits.float(), y, reduction="none"), y)
            (loss if extra is None else loss + extra.float()).backward()
            return loss.detach()

    def chunk_closures(self, m: int) -> list:
        """Closures over chunks of ``m`` samples (m-sharpness), BatchNorm handled as the
        Lightning module does (``sharpbench.optim.bn.chunk_bn_closures``)."""
        from .optim.bn import chunk_bn_closures
        from .optim.context import chunk_slices
        return chunk_bn_closures(self.model, [partial(self.closure, rows=s)
                                              for s in chunk_slices(self.batch, m)], self.bn_policy)

    def closure_on(self, index: torch.Tensor):
        """The closure over the samples ``index`` (ESAM's selection), BatchNorm as a later pass."""
        from .optim.bn import later_pass

        def closure(reduce=None):
            with later_pass(self.model, self.bn_policy):
                return self.closure(reduce, rows=index)
        return closure

    def per_sample_losses(self):
        """Each sample's loss, forward only (priced ``FORWARD_SHARE`` of a pass; part of every
        ESAM step, so not counted as a refresh's extra call)."""
        from .optim.bn import later_pass
        from .optim.context import FORWARD_SHARE
        self.passes += FORWARD_SHARE
        with self._uncounted(), torch.no_grad(), later_pass(self.model, self.bn_policy), \
                self.autocast():
            return F.cross_entropy(self.forward(self.x).float(), self.y, reduction="none")

    def loss_closure(self, mode: str = "train"):
        from .optim.bn import frozen_bn_stats
        self.passes += 1
        self.extra_calls += 1
        with self._uncounted(), self.autocast():
            if mode == "eval":
                self.model.eval()
                try:
                    return F.cross_entropy(self.model(self.x).float(), self.y)
                finally:
                    self.model.train()
            with frozen_bn_stats(self.model):
                return F.cross_entropy(self.model(self.x).float(), self.y)

    def sample(self, n: int):
        """Training samples for a Fisher estimate: the first ``n`` of the batch, repeated if the
        batch is smaller."""
        idx = torch.arange(int(n), device=self.x.device) % self.batch
        return self.x[idx], self.y[idx]

    @contextmanager
    def extra_pass(self, samples: int | None = None, forward_only: bool = False):
        """A pass the method runs itself (SSAM-F's Fisher passes, MESA's teacher): a pass
        (``samples / batch`` of one, priced by its FLOPs; a third of that forward only), not
        optimizer ops."""
        from .optim.context import FORWARD_SHARE
        share = 1 if samples is None else samples / (self.pass_batch or self.batch)
        self.passes += share * (FORWARD_SHARE if forward_only else 1)
        if not forward_only:   # a forward-only pass (MESA's teacher) is part of every step
            self.extra_calls += 1
        with self._uncounted():
            yield

    def context(self, closure) -> StepContext:
        """The step context the Lightning module would build (``sharpbench.optim.context``)."""
        return StepContext(model=self.model, loss_closure=self.loss_closure, sample=self.sample,
                           extra_pass=self.extra_pass, class_counts=self.class_counts,
                           chunk_closures=self.chunk_closures,
                           closure_of=lambda reduce: partial(closure, reduce=reduce),
                           closure_on=self.closure_on, per_sample_losses=self.per_sample_losses,
                           closure_with=lambda term: partial(closure, term=term),
                           sample_ids=torch.arange(self.batch, device=self.y.device),
                           dataset_size=self.batch, epoch=self.epoch)

    @property
    def hvps(self) -> int:
        return int(getattr(self.opt, "num_hvps", 0) or 0)

    def refresh_due(self) -> bool:
        """Whether the coming step refreshes a mask (SSAM) — eigen-solves show as extra calls."""
        due = getattr(self.opt, "refresh_due", None)
        return bool(due()) if callable(due) else False

    def step(self) -> None:
        """One optimizer step on the batch; each step counts as a new epoch of a long run, so
        that epoch-windowed terms (SAF's and MESA's trajectory losses) are on."""
        from .optim.bn import bn_policy_closure
        self.epoch += 1
        if hasattr(self.opt, "base_optimizer"):
            closure = bn_policy_closure(self.model, self.closure, self.bn_policy)
            self.opt.step(closure, context=self.context(closure))
        else:
            self.closure()
            self.opt.step()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[[], None]) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


# ------------------------------------------------------------------------- counting steps
def count_steps(h: StepHarness, n: int) -> list[dict]:
    """Per step: ops dispatched by the optimizer (closures excluded), host syncs (whole step),
    whether it was an amortised refresh (extra closure calls, an HVP, or a mask refresh)."""
    from .profiling import count_dispatch
    rows = []
    for i in range(n):
        refresh = h.refresh_due()
        calls, hvps = h.extra_calls, h.hvps
        with count_dispatch() as counts:
            h.counts = counts
            try:
                h.step()
            finally:
                h.counts = None
        refresh = refresh or h.extra_calls > calls or h.hvps > hvps
        rows.append({"step": i, "ops": counts.ops, "syncs": counts.syncs, "refresh": refresh,
                     "sites": dict(counts.sync_sites)})
    return rows


def step_counts(h: StepHarness, n: int, skip: int = 2) -> dict[str, Any]:
    """Regular steps and refresh steps summarised apart, both after ``skip`` warm-up steps (which
    create lazily built state: buffers, the first mask, the first eigenvectors); the sync sites
    listed come from every step, the warm-up included."""
    rows = count_steps(h, n)
    regular = [r for r in rows[skip:] if not r["refresh"]]
    refresh = [r for r in rows[skip:] if r["refresh"]]
    out = {"ops": statistics.median(r["ops"] for r in regular) if regular else math.nan,
           "ops_max": max((r["ops"] for r in regular), default=math.nan),
           "syncs": max((r["syncs"] for r in regular), default=math.nan),
           "refresh_steps": len(refresh),
           "refresh_ops": statistics.median(r["ops"] for r in refresh) if refresh else math.nan,
           "refresh_syncs": statistics.median(r["syncs"] for r in refresh) if refresh else math.nan,
           "sync_sites": sorted({s for r in rows for s in r["sites"]}), "steps": n}
    return out


def refresh_period(opt) -> int:
    """Steps between a method's amortised refreshes (mask, eigen-solve); 0 if it has none."""
    for name in ("refresh_period", "update_interval", "interval", "freq"):
        if hasattr(opt, name):
            return int(getattr(opt, name))
    return 0


def num_tensors(model: nn.Module) -> int:
    return sum(1 for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- optim section
def bench_optimizers(o: dict, device: torch.device, log: Callable[[str], None]) -> list[dict]:
    methods = split(o["methods"])
    harness = {m: StepHarness(m, o["model"], o["batch"], device, o["precision"],
                              o["channels_last"], o["compile"]) for m in methods}
    times: dict[str, list[float]] = {m: [] for m in methods}
    passes: dict[str, list[int]] = {m: [0, 0, 0] for m in methods}   # passes, hvps, steps
    peak: dict[str, float] = {m: math.nan for m in methods}
    for m, h in harness.items():
        log(f"optim: warm-up {m}")
        for _ in range(o["warmup"]):
            h.step()
    for r in range(o["repeats"]):
        for m, h in harness.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            p0, v0 = h.passes, h.hvps
            t = timed(device, lambda: [h.step() for _ in range(o["steps"])])
            times[m].append(t / o["steps"])
            passes[m][0] += h.passes - p0
            passes[m][1] += h.hvps - v0
            passes[m][2] += o["steps"]
            if device.type == "cuda":
                peak[m] = max(0.0 if math.isnan(peak[m]) else peak[m],
                              torch.cuda.max_memory_allocated(device) / 2 ** 20)
        log(f"optim: round {r + 1}/{o['repeats']} done")
    rows = []
    for m, h in harness.items():
        s = summary(times[m])
        log(f"optim: counting ops and syncs for {m}")
        on_model = step_counts(h, o["count_steps"])
        # The MLP (cheap) from a fresh optimizer, long enough to hold a refresh after step 0.
        small = StepHarness(m, f"mlp{o['mlp_layers']}", 16, device)
        on_mlp = step_counts(small, max(o["count_steps"], refresh_period(small.opt) + 3))
        # (long enough for a refresh after the two warm-up steps: at step refresh_period)
        rows.append({"method": m, "ms_per_step": 1000 * s["median"], "ms_min": 1000 * s["min"],
                     "ms_max": 1000 * s["max"], "images_per_s": o["batch"] / s["median"],
                     "passes_per_step": passes[m][0] / passes[m][2],
                     "hvps_per_step": passes[m][1] / passes[m][2],
                     "tensors": num_tensors(h.model), "ops_per_step": on_model["ops"],
                     "mlp_tensors": num_tensors(small.model), "mlp_ops_per_step": on_mlp["ops"],
                     "syncs_per_step": on_model["syncs"],
                     "refresh_steps": on_mlp["refresh_steps"],
                     "counted_steps": on_mlp["steps"],
                     "refresh_ops": on_mlp["refresh_ops"],
                     "refresh_syncs": on_mlp["refresh_syncs"],
                     "sync_sites": "; ".join(sorted(set(on_model["sync_sites"] + on_mlp["sync_sites"]))),
                     "peak_mem_mb": peak[m]})
        del small
    by_name = {r["method"]: r for r in rows}
    for r in rows:
        ref = baseline_of(r["method"])
        r["baseline"] = ref if ref in by_name else ""
        r["vs_baseline"] = (r["ms_per_step"] / by_name[ref]["ms_per_step"]) if ref in by_name else math.nan
    return rows


# ----------------------------------------------------------------------------- cost section
def bench_cost(o: dict, device: torch.device, log: Callable[[str], None]) -> list[dict]:
    """Amortised FLOP-priced cost per step of every method, refreshes included (module docstring)."""
    from .cost import cost_per_step, pass_flops
    prices = pass_flops(build_net(o["model"]), (o["cost_batch"], 3, 32, 32), 10)
    gen = torch.Generator().manual_seed(1)
    rows = []
    for m in split(o["methods"]):
        h = StepHarness(m, o["model"], o["cost_batch"], device, o["precision"], o["channels_last"],
                        o["compile"], pass_batch=o["batch"])
        period = refresh_period(h.opt) or 1
        warm, window = max(period, 2), period * max(int(o["cost_periods"]), 1)
        log(f"cost: {m}, {warm} warm-up steps then {window} measured steps")

        def counters() -> tuple:
            return (h.passes, int(getattr(h.opt, "num_loss_closure_calls", 0) or 0), h.hvps)

        def run(n: int) -> None:
            for _ in range(n):
                h.x = torch.randn(h.x.shape, generator=gen).to(h.x)
                h.y = torch.randint(0, 10, h.y.shape, generator=gen).to(h.y)
                h.step()

        run(warm)
        state = getattr(h.opt, "method_state", {})
        solves0 = len(state.get("eigen_refreshes", []))
        before = counters()
        seconds = timed(device, lambda: run(window))
        after = counters()
        passes, graphs, hvps = (a - b for a, b in zip(after, before))
        refreshes = state.get("eigen_refreshes", [])[solves0:]
        info = registry.methods().get(m)
        rows.append({"method": m, "period": refresh_period(h.opt), "steps": window,
                     "cost_per_step": cost_per_step(passes=passes, loss_closure_calls=graphs,
                                                    hvps=hvps, steps=window,
                                                    graph_cost=prices["graph_cost"],
                                                    hvp_cost=prices["hvp_cost"]),
                     "claimed_cost": info.claimed_cost if info is not None else "",
                     "solves": len(refreshes),
                     "iterations_mean": (statistics.mean(r[1] for r in refreshes)
                                         if refreshes else math.nan),
                     "residual_max": max((r[2] for r in refreshes), default=math.nan),
                     "eigen_tol": getattr(h.opt, "eigen_tol", None),
                     "ms_per_step": 1000 * seconds / window})
        del h
    by_name = {r["method"]: r for r in rows}
    for r in rows:
        ref = by_name.get(baseline_of(r["method"]))
        r["wall_vs_baseline"] = r["ms_per_step"] / ref["ms_per_step"] if ref else math.nan
    return rows


# ---------------------------------------------------------------------------- fisher section
def bench_fisher(o: dict, device: torch.device, log: Callable[[str], None]) -> list[dict]:
    """One SSAM-F Fisher estimate by each exact method, against a training pass (``batch``)."""
    from .optim.fisher import bn_mode, fisher_terms, resolve_method
    torch.manual_seed(0)
    model = build_net(o["model"]).to(device)
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(2)
    n, b = int(o["fisher_samples"]), int(o["fisher_batch"])
    x = torch.randn(n, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(0, 10, (n,), generator=gen).to(device)
    xb = torch.randn(o["batch"], 3, 32, 32, generator=gen).to(device)
    yb = torch.randint(0, 10, (o["batch"],), generator=gen).to(device)

    def train_pass() -> None:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(xb), yb).backward()

    def estimate(method: str) -> Callable[[], None]:
        if method == "chunked":    # the cheaper estimator (squared chunk-mean gradients), for scale
            return lambda: [fisher_terms(model, params, xc, yc, batch_size=b, estimator="chunked")
                            for xc, yc in zip(x.split(b), y.split(b))]
        return lambda: [fisher_terms(model, params, xc, yc, batch_size=b, method=method)
                        for xc, yc in zip(x.split(b), y.split(b))]

    methods = ("loop", "vmap", "batched", "chunked")
    times: dict[str, list[float]] = {m: [] for m in ("pass", *methods)}
    for m in methods[:3]:                          # warm-up: one call each (vmap traces)
        fisher_terms(model, params, x[:b], y[:b], batch_size=b, method=m)
    train_pass()
    for r in range(o["repeats"]):
        times["pass"].append(timed(device, train_pass))
        for m in methods:
            times[m].append(timed(device, estimate(m)))
        log(f"fisher: round {r + 1}/{o['repeats']} done")
    unit = statistics.median(times["pass"])
    auto = resolve_method("auto", device)
    return [{"method": m, "samples": n, "per_call": b, "ms": 1000 * statistics.median(times[m]),
             "passes": statistics.median(times[m]) / unit, "pass_ms": 1000 * unit,
             "auto": m == auto} for m in methods]


# ---------------------------------------------------------------------------- driver section
def synthetic_data(n_batches: int, batch: int, channels_last: bool):
    from .data import CIFARDataModule
    data = CIFARDataModule(name="synthetic", num_train=batch * n_batches, num_test=batch,
                           batch_size=batch, seed=0, channels_last=channels_last)
    data.prepare_data()
    data.setup("fit")
    return data


def cifar_log_interval(batch: int) -> int:
    """The logging interval of a real run over CIFAR's 50,000 training images at this batch size
    (every 19 steps at batch 128): the bench's short epochs would otherwise be logged at every
    step (``run_logging.dense_log_interval``), which is not the cost a user's run pays."""
    from .run_logging import dense_log_interval
    return dense_log_interval(50, 50_000 // batch)


def lightning_run(model: nn.Module, method: str, data, o: dict, device: torch.device,
                  n_steps: int, warmup: int, counter=None) -> float:
    """Seconds per step of ``SharpnessModule`` under a Lightning ``Trainer``, measured between the
    start of batch ``warmup`` and the end of the last batch (data fetches in between included)."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loggers import CSVLogger
    from .module import SharpnessModule
    marks: list[float] = []

    class Clock(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0:   # log as often as a run over the full training set would
                trainer.log_every_n_steps = cifar_log_interval(o["batch"])
            if batch_idx == warmup:
                sync(device)
                marks.append(time.perf_counter())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == warmup + n_steps - 1:
                sync(device)
                marks.append(time.perf_counter())

    module = SharpnessModule(model, optimizer_config(method), {"name": "constant", "warmup_epochs": 0},
                             num_classes=10, epochs=1, precision=o["precision"],
                             class_counts=data.train_class_counts, compile=o["compile"])
    callbacks = [Clock()] + ([counter] if counter is not None else [])
    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
                            max_epochs=1, limit_train_batches=warmup + n_steps, limit_val_batches=0,
                            logger=CSVLogger(tmp), log_every_n_steps=50, enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=False,
                            num_sanity_val_steps=0, callbacks=callbacks, default_root_dir=tmp)
        trainer.fit(module, datamodule=data)
    return (marks[1] - marks[0]) / n_steps


# The step-context fields the driver section's hand-written loop (plain_run) offers a method.
PLAIN_RUN_OFFERS = ("model", "loss_closure", "sample", "class_counts", "batch_idx", "closure_on",
                    "per_sample_losses", "closure_of")


def plain_run(model: nn.Module, method: str, loader, o: dict, device: torch.device,
              n_steps: int, warmup: int) -> float:
    """Seconds per step of a hand-written loop: the same optimizer, closure and BatchNorm
    policy, stepping the LR schedule like the module, over ``loader``."""
    from .optim.bn import first_pass_updates_bn, frozen_bn_stats, later_pass
    from .optim.factory import build_optimizer
    from .schedule import build_scheduler
    opt = build_optimizer(model, optimizer_config(method))
    sched = build_scheduler(opt, {"name": "constant", "warmup_epochs": 0}, warmup + n_steps, 1)
    forward = torch.compile(model) if o["compile"] else model
    amp = PRECISIONS[o["precision"]]
    autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp else nullcontext
    counts = TAIL_COUNTS.to(device)
    start = 0.0
    for i, (x, y) in enumerate(loader):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)

        def closure(reduce=None):
            opt.zero_grad(set_to_none=True)
            with autocast():
                logits = forward(x)
            if reduce is None:
                loss = F.cross_entropy(logits.float(), y)
            else:
                loss = reduce(F.cross_entropy(logits.float(), y, reduction="none"), y)
            loss.backward()
            return loss.detach()

        def loss_closure(mode="train"):
            with frozen_bn_stats(model), autocast():
                return F.cross_entropy(model(x).float(), y)

        def closure_on(index, x=x, y=y):
            def on(reduce=None):
                opt.zero_grad(set_to_none=True)
                with later_pass(model), autocast():
                    loss = F.cross_entropy(forward(x[index]).float(), y[index])
                loss.backward()
                return loss.detach()
            return on

        def per_sample_losses(x=x, y=y):
            with torch.no_grad(), later_pass(model), autocast():
                return F.cross_entropy(forward(x).float(), y, reduction="none")

        if hasattr(opt, "base_optimizer"):
            step_closure = first_pass_updates_bn(model, closure)
            opt.step(step_closure, context=StepContext(
                model=model, loss_closure=loss_closure, sample=lambda n: (x[:n], y[:n]),
                class_counts=counts, batch_idx=i, closure_on=closure_on,
                per_sample_losses=per_sample_losses,
                closure_of=lambda reduce: partial(step_closure, reduce=reduce)))
        else:
            closure()
            opt.step()
        sched.step()
        if i == warmup + n_steps - 1:
            break
    sync(device)
    return (time.perf_counter() - start) / n_steps


def baseline_of(method: str) -> str:
    """The method a ratio is taken against: the registry's ``baseline`` (AdamW for HATAM)."""
    info = registry.methods().get(method)
    return info.baseline if info is not None else "sgd"


def bench_driver(o: dict, device: torch.device,
                 log: Callable[[str], None]) -> tuple[list[dict], list[dict]]:
    """Lightning vs the plain loop for every (model, method), interleaved: each round runs every
    pair once, Lightning then plain, so a slow phase of the machine hits all of them alike.

    Returns the per-pair rows and the end-to-end rows: each method's Lightning step against its
    baseline's (SGD, or AdamW for HATAM) on the same model, the ratio taken within each round."""
    from .profiling import StepCounter
    import lightning as L
    warmup, n = o["warmup"], o["driver_steps"]
    channels_last = o["channels_last"] and device.type == "cuda"
    methods = split(o["driver_methods"])

    class Counter(StepCounter, L.pytorch.callbacks.Callback):
        pass

    setups = []
    for model_name in split(o["driver_models"]):
        data = synthetic_data(warmup + n + 1, o["batch"], channels_last)
        for method in methods:
            torch.manual_seed(0)
            model = build_net(model_name).to(device)
            if channels_last:
                model = model.to(memory_format=torch.channels_last)
            setups.append((model_name, method, model, data))
    lit = {(m, me): [] for m, me, _, _ in setups}
    plain = {(m, me): [] for m, me, _, _ in setups}
    for r in range(o["repeats"]):
        for model_name, method, model, data in setups:
            key = (model_name, method)
            lit[key].append(lightning_run(model, method, data, o, device, n, warmup))
            data.trainer = None
            plain[key].append(plain_run(model, method, data.train_dataloader(), o, device, n, warmup))
            log(f"driver: {model_name}/{method} round {r + 1}/{o['repeats']}: "
                f"Lightning {1000 * lit[key][-1]:.0f} ms, plain {1000 * plain[key][-1]:.0f} ms")
    rows = []
    for model_name, method, model, data in setups:
        key = (model_name, method)
        counter = Counter()
        lightning_run(model, method, data, o, device, 1, warmup + 1, counter=counter)
        data.trainer = None
        ratios = [a / b for a, b in zip(lit[key], plain[key])]
        rows.append({"model": model_name, "method": method,
                     "lightning_ms": 1000 * statistics.median(lit[key]),
                     "plain_ms": 1000 * statistics.median(plain[key]),
                     "ratio": statistics.median(ratios), "ratio_min": min(ratios),
                     "ratio_max": max(ratios),
                     "lightning_syncs_per_step": max(
                         (s.syncs for i, s in enumerate(counter.steps)
                          if i and i not in counter.logging_steps), default=0),
                     "sync_sites": "; ".join(sorted({k for s in counter.steps for k in s.sync_sites}))})
    end_to_end = []
    for model_name, method, _, _ in setups:
        base = baseline_of(method)
        if method == base or (model_name, base) not in lit:
            continue
        ours, theirs = lit[(model_name, method)], lit[(model_name, base)]
        ratios = [a / b for a, b in zip(ours, theirs)]
        plain_ratios = [a / b for a, b in zip(plain[(model_name, method)], plain[(model_name, base)])]
        end_to_end.append({"model": model_name, "method": method, "baseline": base,
                           "ratio": statistics.median(ratios), "ratio_min": min(ratios),
                           "ratio_max": max(ratios), "plain_ratio": statistics.median(plain_ratios)})
    return rows, end_to_end


# -------------------------------------------------------------------------- pipeline section
class ConventionalCIFAR(torch.utils.data.Dataset):
    """What ``torchvision.datasets.CIFAR10`` does per item: a PIL image from a uint8 HWC array,
    then the usual per-image transforms."""

    def __init__(self, x_uint8: torch.Tensor, y: torch.Tensor, mean, std):
        import torchvision.transforms as T
        self.images = x_uint8.permute(0, 2, 3, 1).contiguous().numpy()
        self.labels = y.tolist()
        self.transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(),
                                    T.ToTensor(), T.Normalize(mean, std)])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image
        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def bench_pipeline(o: dict, device: torch.device, log: Callable[[str], None]) -> list[dict]:
    warmup, n = o["warmup"], o["driver_steps"]
    rows = []
    for model_name in split(o["driver_models"]):
        method = split(o["driver_methods"])[0]
        data = synthetic_data(warmup + n + 1, o["batch"], False)
        splits = data.splits
        conventional = torch.utils.data.DataLoader(
            ConventionalCIFAR(splits.train_x, splits.train_y, splits.mean, splits.std),
            batch_size=o["batch"], shuffle=True, drop_last=True, num_workers=o["loader_workers"],
            pin_memory=device.type == "cuda", persistent_workers=False)
        torch.manual_seed(0)
        model = build_net(model_name).to(device)
        ours, theirs = [], []
        for r in range(o["repeats"]):
            ours.append(lightning_run(model, method, data, o, device, n, warmup))
            data.trainer = None
            theirs.append(plain_run(model, method, conventional, o, device, n, warmup))
            log(f"pipeline: {model_name}/{method} round {r + 1}/{o['repeats']}: sharpbench "
                f"{1000 * ours[-1]:.0f} ms, DataLoader {1000 * theirs[-1]:.0f} ms")
        ratios = [a / b for a, b in zip(ours, theirs)]
        rows.append({"model": model_name, "method": method,
                     "sharpbench_ms": 1000 * statistics.median(ours),
                     "dataloader_ms": 1000 * statistics.median(theirs),
                     "ratio": statistics.median(ratios), "ratio_min": min(ratios),
                     "ratio_max": max(ratios), "loader_workers": o["loader_workers"]})
    return rows


# --------------------------------------------------------------------------- compile section
def bench_compile(o: dict, device: torch.device, log: Callable[[str], None]) -> list[dict]:
    from torch._dynamo.utils import counters
    rows = []
    model = o["compile_model"] or o["model"]
    for method in split(o["compile_methods"]):
        eager = StepHarness(method, model, o["batch"], device, o["precision"], o["channels_last"], False)
        torch._dynamo.reset()
        counters.clear()
        t0 = time.perf_counter()
        compiled = StepHarness(method, model, o["batch"], device, o["precision"], o["channels_last"], True)
        for _ in range(max(2, o["warmup"])):
            compiled.step()
        sync(device)
        first = time.perf_counter() - t0
        graphs_warm = counters["stats"]["unique_graphs"]
        for _ in range(o["warmup"]):
            eager.step()
        te, tc = [], []
        for _ in range(o["repeats"]):
            te.append(timed(device, lambda: [eager.step() for _ in range(o["steps"])]) / o["steps"])
            tc.append(timed(device, lambda: [compiled.step() for _ in range(o["steps"])]) / o["steps"])
        ratios = [c / e for c, e in zip(tc, te)]
        rows.append({"method": method, "eager_ms": 1000 * statistics.median(te),
                     "compiled_ms": 1000 * statistics.median(tc), "ratio": statistics.median(ratios),
                     "ratio_min": min(ratios), "ratio_max": max(ratios),
                     "warmup_s": first, "graphs_after_warmup": graphs_warm,
                     "graphs_after_timing": counters["stats"]["unique_graphs"]})
        log(f"compile: {method}: eager {rows[-1]['eager_ms']:.0f} ms, compiled "
            f"{rows[-1]['compiled_ms']:.0f} ms, graphs {graphs_warm} → {rows[-1]['graphs_after_timing']}")
    return rows


# --------------------------------------------------------------------------------- output
def header(o: dict, device: torch.device) -> str:
    hw = (torch.cuda.get_device_name(device) if device.type == "cuda"
          else platform.processor() or platform.machine())
    return (f"device {device} ({hw}), {torch.get_num_threads()} threads, torch {torch.__version__}, "
            f"python {platform.python_version()}; model {o['model']}, batch {o['batch']}, precision "
            f"{o['precision']}, channels_last {o['channels_last']}, compile {o['compile']}; "
            f"{o['repeats']} interleaved rounds of {o['steps']} steps after {o['warmup']} warm-up "
            f"steps: median [min–max]")


def fmt(v, spec=".1f") -> str:
    if v is None or v == "" or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return format(v, spec) if isinstance(v, (int, float)) else str(v)


def markdown(o: dict, device: torch.device, results: dict[str, list[dict]], command: str) -> str:
    out = [f"# sharpbench bench", "", f"`{command}`", "", header(o, device), ""]
    rows = results.get("optim")
    if rows:
        t, m = rows[0]["tensors"], rows[0]["mlp_tensors"]
        out += ["| method | ms/step | images/s | vs base | passes/step | HVPs/step | "
                f"ops/step ({t} tensors) | ops/step ({m} tensors) | syncs/step | refresh steps ({m} tensors): ops, syncs | peak MiB |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            vs = f"{r['vs_baseline']:.2f}× {r['baseline']}" if r["baseline"] else "–"
            refresh = (f"{r['refresh_steps']} of {r['counted_steps']}: {fmt(r['refresh_ops'], '.0f')}, "
                       f"{fmt(r['refresh_syncs'], '.0f')}" if r["refresh_steps"] else "–")
            out.append(f"| `{r['method']}` | {r['ms_per_step']:.1f} [{r['ms_min']:.0f}–{r['ms_max']:.0f}] "
                       f"| {r['images_per_s']:.0f} | {vs} | {r['passes_per_step']:.2f} "
                       f"| {r['hvps_per_step']:.2f} | {fmt(r['ops_per_step'], '.0f')} "
                       f"| {fmt(r['mlp_ops_per_step'], '.0f')} | {fmt(r['syncs_per_step'], '.0f')} "
                       f"| {refresh} | {fmt(r['peak_mem_mb'], '.0f')} |")
        sites = [f"- `{r['method']}`: {r['sync_sites']}" for r in rows if r["sync_sites"]]
        if sites:
            out += ["", "Host syncs (all on refresh steps unless the syncs/step column says otherwise):", *sites]
        out.append("")
    out += table(results.get("cost"),
                 f"Amortised cost per step, refresh steps included ({o['cost_periods']} refresh "
                 f"periods after a warm-up period; {o['model']}, a fresh random batch of "
                 f"{o['cost_batch']} each step; passes, Hessian graphs and HVPs priced by their "
                 "FLOPs, SGD = 1):",
                 ["method", "refresh every", "cost/step (FLOPs, SGD = 1)", "source's claim",
                  "eigen-solves: HVPs (mean), largest residual / tol", "wall ms/step", "wall vs base"],
                 lambda r: [f"`{r['method']}`", r["period"] or "–", f"{r['cost_per_step']:.2f}",
                            r["claimed_cost"] or "–",
                            (f"{r['solves']}: {r['iterations_mean']:.1f}, {r['residual_max']:.3f}"
                             f" / {fmt(r['eigen_tol'], '.3g')}" if r["solves"] else "–"),
                            f"{r['ms_per_step']:.0f}", fmt(r["wall_vs_baseline"], ".2f")])
    out += table(results.get("fisher"),
                 f"SSAM-F's per-sample Fisher, one estimate by each exact method (same result), and "
                 f"the chunked estimator (another result, for scale); passes: the estimate's time "
                 f"over a training pass of {o['batch']} images:",
                 ["method", "samples (per call)", "ms", "training passes", "fisher_method=auto"],
                 lambda r: [f"`{r['method']}`", f"{r['samples']} ({r['per_call']})",
                            f"{r['ms']:.0f}", f"{r['passes']:.2f}", "picked" if r["auto"] else ""])
    spread = lambda r: f"{r['ratio']:.3f} [{r['ratio_min']:.3f}–{r['ratio_max']:.3f}]"  # noqa: E731
    out += table(results.get("driver"),
                 "Lightning training step vs a plain loop (same DeviceLoader, model, optimizer):",
                 ["model", "method", "Lightning ms/step", "plain loop ms/step", "ratio [min–max]",
                  "Lightning syncs/step"],
                 lambda r: [r["model"], f"`{r['method']}`", f"{r['lightning_ms']:.1f}",
                            f"{r['plain_ms']:.1f}", spread(r), r["lightning_syncs_per_step"]])
    out += table(results.get("end_to_end"),
                 "End to end (Lightning training step, the path `sharpbench.train` runs) against the "
                 "baseline on the same model, the ratio taken within each round:",
                 ["model", "method", "vs", "Lightning ratio [min–max]", "plain-loop ratio"],
                 lambda r: [r["model"], f"`{r['method']}`", f"`{r['baseline']}`", spread(r),
                            f"{r['plain_ratio']:.3f}"])
    out += table(results.get("pipeline"),
                 "Whole pipeline vs torchvision DataLoader + per-image transforms (plain loop):",
                 ["model", "method", "sharpbench ms/step", "DataLoader ms/step (workers)",
                  "ratio [min–max]"],
                 lambda r: [r["model"], f"`{r['method']}`", f"{r['sharpbench_ms']:.1f}",
                            f"{r['dataloader_ms']:.1f} ({r['loader_workers']})", spread(r)])
    out += table(results.get("compile"),
                 f"torch.compile (model forward, {o['compile_model'] or o['model']}) vs eager:",
                 ["method", "eager ms/step", "compiled ms/step", "compiled/eager [min–max]",
                  "compile warm-up s", "graphs after warm-up → after timing"],
                 lambda r: [f"`{r['method']}`", f"{r['eager_ms']:.1f}", f"{r['compiled_ms']:.1f}",
                            spread(r), f"{r['warmup_s']:.0f}",
                            f"{r['graphs_after_warmup']} → {r['graphs_after_timing']}"])
    return "\n".join(out)


def table(rows: list[dict] | None, caption: str, header: list[str],
          cells: Callable[[dict], list]) -> list[str]:
    """A captioned Markdown table (and a blank line), one row per result; nothing without rows."""
    if not rows:
        return []
    return [caption, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(c) for c in cells(r)) + " |" for r in rows), ""]


def to_csv(results: dict[str, list[dict]]) -> str:
    buf = io.StringIO()
    keys = ["section"] + sorted({k for rows in results.values() for r in rows for k in r})
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    for section, rows in results.items():
        for r in rows:
            writer.writerow({"section": section, **r})
    return buf.getvalue()


def run(o: dict, log: Callable[[str], None] = print) -> dict[str, list[dict]]:
    if o["threads"] > 0:
        torch.set_num_threads(o["threads"])
    device = torch.device(o["device"])
    sections = split(o["sections"])
    results: dict[str, list[dict]] = {}
    for name, fn in (("optim", bench_optimizers), ("cost", bench_cost), ("fisher", bench_fisher),
                     ("driver", bench_driver),
                     ("pipeline", bench_pipeline), ("compile", bench_compile)):
        if name in sections:
            results[name] = fn(o, device, log)
    if "driver" in results:
        results["driver"], results["end_to_end"] = results["driver"]
        if not results["end_to_end"]:
            del results["end_to_end"]
    return results


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    try:
        o = parse_options(argv)
    except BenchConfigError as err:
        print(f"sharpbench bench: {err}", file=sys.stderr)
        return 2
    import logging
    for name in ("lightning", "lightning.pytorch", "lightning.pytorch.utilities.rank_zero",
                 "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import warnings   # the bench's epochs are short on purpose; Lightning's advice is noise here
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    device = torch.device(o["device"])
    log = lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    log(header(o, device))
    results = run(o, log)
    command = "python -m sharpbench.bench " + " ".join(argv)
    text = markdown(o, device, results, command.strip())
    out = Path(o["out"])
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "bench.md", text + "\n")
    atomic_write_text(out / "bench.csv", to_csv(results))
    print(text)
    log(f"wrote {out / 'bench.md'} and {out / 'bench.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

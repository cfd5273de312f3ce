"""One-process benchmark of every optimizer: time per training step on one model and batch.

    python scripts/benchmark_optimizers.py [--model resnet18] [--batch 128] [--steps 20]
                                           [--device cuda] [--precision bf16] [--methods sam sgd]

Plain PyTorch (no Lightning): each method is stepped the way a user would, with the closure and
the extra inputs it declares (``extra_inputs``), BatchNorm updated by the first pass only. Times
are medians (and means: amortised eigen-solves and mask refreshes show there) over ``--steps`` timed steps after ``--warmup`` untimed ones, with the device
synchronised around each step; passes per step are counted by the closures. Random data of
CIFAR shape, so the number is the optimizer's cost, not the data pipeline's.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from sharpbench.models import build_model
from sharpbench.optim import first_pass_updates_bn, frozen_bn_stats
from sharpbench.optim.factory import build_optimizer
from sharpbench.optim.imbalanced import split_loss, tail_class_mask

CONF = "sharpbench/conf/optimizer"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(name: str, args, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = build_model(args.model, num_classes=10).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    cfg = OmegaConf.to_container(OmegaConf.load(f"{CONF}/{name}.yaml"), resolve=True)
    opt = build_optimizer(model, cfg)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp else nullcontext
    x = torch.randn(args.batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    counts = torch.tensor([5000, 2000, 800, 300, 120, 50, 20, 10, 5, 2])  # for ImbSAM's split
    tail = tail_class_mask(counts, getattr(opt, "class_threshold", 20)).to(device)
    passes = 0

    def closure(part=None):
        nonlocal passes
        passes += 1
        opt.zero_grad(set_to_none=True)
        with autocast():
            logits = model(x)
        if part is None:
            loss = F.cross_entropy(logits.float(), y)
        else:
            loss = split_loss(F.cross_entropy(logits.float(), y, reduction="none"), y, tail, part)
        loss.backward()
        return loss.detach()

    def loss_closure():
        nonlocal passes
        passes += 1
        with frozen_bn_stats(model), autocast():
            return F.cross_entropy(model(x).float(), y)

    def fisher_closure():
        nonlocal passes
        passes += 1
        n = int(cfg.get("fisher_batch_size") or 64)
        opt.zero_grad(set_to_none=True)
        with frozen_bn_stats(model), autocast():
            F.cross_entropy(model(x[:n]).float(), y[:n]).backward()
        return n

    extras = {"loss_closure": loss_closure, "fisher_closure": fisher_closure}
    needs = {k: extras[k] for k in getattr(opt, "extra_inputs", ())}
    two_pass = hasattr(opt, "base_optimizer")

    def one_step():
        if two_pass:
            opt.step(first_pass_updates_bn(model, closure), **needs)
        else:
            closure()
            opt.step()

    for _ in range(args.warmup):
        one_step()
    passes = 0
    times = []
    for _ in range(args.steps):
        sync(device)
        t0 = time.perf_counter()
        one_step()
        sync(device)
        times.append(time.perf_counter() - t0)
    hvps = getattr(opt, "num_hvps", None)
    return {"method": name, "ms_per_step": 1000 * statistics.median(times),
            "ms_mean": 1000 * statistics.fmean(times),
            "passes_per_step": passes / args.steps,
            "hvps_total": hvps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", choices=["32", "bf16", "fp16"], default="32")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--methods", nargs="*", default=["sgd", "sam", "asam", "friendly_sam", "ssam_f",
                    "ssam_d", "imb_sam", "gsam", "a2sam", "xsam", "hatam", "adamw"])
    args = ap.parse_args()
    device = torch.device(args.device)
    hw = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"# {args.model}, batch {args.batch}, {args.precision}, {device} ({hw}, "
          f"{torch.get_num_threads()} threads), torch {torch.__version__}, median of {args.steps} steps")
    rows = [bench(m, args, device) for m in args.methods]
    base = next((r["ms_per_step"] for r in rows if r["method"] == "sgd"), None)
    sam = next((r["ms_per_step"] for r in rows if r["method"] == "sam"), None)
    print("| method | ms/step (median) | ms/step (mean) | vs SGD | vs SAM | passes/step (timed steps) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        vs_sgd = f"{r['ms_per_step'] / base:.2f}×" if base else "–"
        vs_sam = f"{100 * r['ms_per_step'] / sam:.0f}%" if sam else "–"
        print(f"| `{r['method']}` | {r['ms_per_step']:.1f} | {r['ms_mean']:.1f} | {vs_sgd} | {vs_sam} "
              f"| {r['passes_per_step']:.2f} |")


if __name__ == "__main__":
    main()

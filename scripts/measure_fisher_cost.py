"""Cost of one SSAM-F mask refresh: the per-sample Fisher in batched passes against the loop of
single-sample backward passes, and against the chunked estimator.

    python scripts/measure_fisher_cost.py [--model resnet18] [--samples 256] [--repeats 2] [--loop]

Random CIFAR-shaped data (the cost does not depend on the pixel values), fp32, the device's
default threads. Prints a Markdown table: milliseconds per refresh (median of ``--repeats``) and
the same in "passes": refresh time divided by the time of one forward+backward of a training
batch of ``--train-batch`` images (the unit the README's passes/step use).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from sharpbench.models import build_model
from sharpbench.optim.fisher import bn_mode, fisher_terms


def timed(fn, repeats: int, warmup=None) -> float:
    (warmup or fn)()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--train-batch", type=int, default=128)
    ap.add_argument("--vmap-batches", type=int, nargs="*", default=[32, 64])
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--loop", action="store_true", help="also time the single-sample loop")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(args.model, num_classes=10)
    params = list(model.parameters())
    x = torch.randn(args.samples, 3, 32, 32)
    y = torch.randint(0, 10, (args.samples,))
    xb, yb = torch.randn(args.train_batch, 3, 32, 32), torch.randint(0, 10, (args.train_batch,))

    def train_pass():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(xb), yb).backward()

    def loop(n=args.samples):
        with bn_mode(model, "eval"):
            for i in range(n):
                torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), params)

    units = [timed(train_pass, args.repeats)]
    print(f"{args.model}, n_s = {args.samples}, fp32, {platform.machine()} CPU, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}\n", flush=True)
    print("| estimator | ms per refresh | training passes per refresh |")
    print("|---|---|---|", flush=True)
    rows = []
    if args.loop:
        rows.append(("per-sample, loop of single-sample backward passes",
                     timed(loop, 1, warmup=lambda: loop(4))))
    for b in args.vmap_batches:
        rows.append((f"per-sample, torch.func vmap, {b} samples per pass",
                     timed(lambda: fisher_terms(model, params, x, y, batch_size=b), args.repeats,
                           warmup=lambda: fisher_terms(model, params, x[:b], y[:b], batch_size=b))))
    rows.append((f"chunked, {args.chunk} samples per backward (n·ḡ², not the Fisher)",
                 timed(lambda: fisher_terms(model, params, x, y, estimator="chunked",
                                            batch_size=args.chunk), args.repeats)))
    units.append(timed(train_pass, args.repeats))
    unit = statistics.mean(units)
    for name, ms in rows:
        print(f"| {name} | {ms:.0f} | {ms / unit:.2f} |")
    print(f"\none training pass (forward+backward, batch {args.train_batch}): {unit:.0f} ms "
          f"(mean of the timings before and after: {units[0]:.0f}, {units[1]:.0f})")


if __name__ == "__main__":
    main()

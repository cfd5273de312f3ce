"""What m-sharpness costs on one device: SAM's step time with the batch split into chunks of m
samples (each perturbed with its own gradient) against the whole-batch step.

    python scripts/measure_m_sharpness.py [--model resnet18] [--batch 128] [--m 64 32 16 8]
                                          [--repeats 3]

Random CIFAR-shaped data, fp32, the device's default threads; the configurations are timed in
interleaved rounds (the median of ``--repeats``), so a change of machine load hits them alike.
Prints a Markdown table: ms per step, the ratio to the whole-batch step, and the passes counted
(FLOP-priced: a chunk's pass is m/batch of one), which stay 2.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from sharpbench.bench import StepHarness, sync
from sharpbench.optim.factory import build_optimizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--m", type=int, nargs="*", default=[64, 32, 16, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    configs = [None, *args.m]
    harness = {}
    for m in configs:
        h = StepHarness("sam", args.model, args.batch, device)
        h.opt = build_optimizer(h.model, dict(h.cfg, m=m))
        h.step()                                             # warm-up
        harness[m] = h
    times = {m: [] for m in configs}
    for _ in range(args.repeats):
        for m, h in harness.items():
            passes = h.passes
            sync(device)
            t0 = time.perf_counter()
            h.step()
            sync(device)
            times[m].append(time.perf_counter() - t0)
            assert abs(h.passes - passes - 2.0) < 1e-9, h.passes - passes
    base = statistics.median(times[None])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"`python scripts/measure_m_sharpness.py --model {args.model} --batch {args.batch} "
          f"--m {' '.join(map(str, args.m))} --repeats {args.repeats}`: {device.type} "
          f"({platform.machine()}), {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}; 1-minute load average at the end {load:.2f}\n")
    print("| m (samples per perturbation) | perturbations per step | ms/step (median) | vs whole batch | passes/step (FLOPs) |")
    print("|---|---|---|---|---|")
    for m in configs:
        med = statistics.median(times[m])
        label = f"{args.batch} (whole batch)" if m is None else str(m)
        chunks = 1 if m is None else args.batch // m
        print(f"| {label} | {chunks} | {1000 * med:.0f} | {med / base:.2f} | 2.00 |")


if __name__ == "__main__":
    main()

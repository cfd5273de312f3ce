"""How many Hessian-vector products a warm-started eigen-solve needs, refresh after refresh.

    python scripts/measure_warm_starts.py --root /path/to/cifar10 [--format folder] [--batch 32]
        [--every 50] [--points 4] [--solvers lanczos5 lanczos1 block5 block3] [--out warm.json]

Trains ResNet-18 on CIFAR-10 with SGD (lr 0.1·batch/128, momentum 0.9, weight decay 5e-4) and,
every ``--every`` steps, solves for the top Hessian eigenpairs of the current batch's loss
(train-mode BatchNorm, running statistics frozen) with each solver, warm-started from that
solver's own previous result (the first solve is cold, from the normalised gradient):

- ``lanczos<k>``: single-vector Lanczos from ``ĝ + Σ_i v_i`` (A²SAM's ``solver=lanczos``);
  ``lanczos1`` is X-SAM's Lanczos from the previous eigenvector;
- ``block<k>``: block Lanczos from the previous ``V`` (A²SAM's ``solver=block``);
- ``lanczos<k>x2``: the single-vector solver refreshed every ``2·every`` steps only.

Every residual check is recorded (``‖Hv − λv‖/|λ|`` of each of the top pairs, no extra product),
to a residual of 0.01 or ``--cap`` products, so one run gives the products needed for every
(k, tolerance) pair; the table printed at the end prices them as A²SAM's amortised cost
``1 + (1 + h·n)/interval`` (h = one HVP in training passes, from ``sharpbench.cost``).
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sharpbench.cost import pass_flops
from sharpbench.curvature import HessianOperator, block_lanczos, lanczos
from sharpbench.data.datamodule import CIFARDataModule
from sharpbench.models import build_model
from sharpbench.optim.bn import frozen_bn_stats

TOLS = (0.1, 0.05, 0.02, 0.01)


def parse(name: str) -> tuple[str, int, int]:
    """``lanczos5x2`` -> ("lanczos", 5, 2): solver, number of pairs, refresh every that many periods."""
    m = re.fullmatch(r"(lanczos|block)(\d+)(x2)?", name)
    if m is None:
        raise SystemExit(f"unknown solver {name!r}: lanczos<k>, block<k>, lanczos<k>x2")
    return m.group(1), int(m.group(2)), 2 if m.group(3) else 1


def solve(name: str, op: HessianOperator, g: torch.Tensor, prev, cap: int, history: list):
    kind, k, _ = parse(name)
    if kind == "block":
        init = prev if prev is not None else g[:, None]
        return block_lanczos(op.matvec, op.dim, k, max_matvecs=cap, init=init, tol=0.01,
                             history=history)
    init = g + prev.sum(dim=1) if prev is not None else g
    if k == 1:
        return block_lanczos(op.matvec, op.dim, 1, max_matvecs=cap, init=init, tol=0.01,
                             history=history)
    return lanczos(op.matvec, op.dim, k, num_iters=cap, init=init, tol=0.01, check_every=1,
                   history=history)


def needed(history: list, k: int, tol: float):
    """Products after which the top ``k`` pairs were all within ``tol`` (None: never)."""
    for matvecs, residuals in history:
        if len(residuals) >= k and max(residuals[:k]) <= tol:
            return matvecs
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", required=True)
    ap.add_argument("--format", default="folder")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--points", type=int, default=4)
    ap.add_argument("--cap", type=int, default=30)
    ap.add_argument("--solvers", nargs="*", default=["lanczos5", "lanczos1", "lanczos5x2"])
    ap.add_argument("--out", type=Path, default=Path("warm_starts.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    dm = CIFARDataModule(dict(name="cifar10", root=args.root, format=args.format,
                              batch_size=args.batch))
    dm.setup("fit")
    model = build_model("resnet18", num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1 * args.batch / 128, momentum=0.9,
                          weight_decay=5e-4)
    hvp_cost = pass_flops(model, (args.batch, 3, 32, 32), 10)["hvp_cost"]
    params = list(model.parameters())
    batches = iter(dm.train_dataloader())
    previous: dict = {}
    records, step = [], 0
    for point in range(args.points):
        x, y = next(batches)
        with torch.enable_grad():
            with frozen_bn_stats(model):
                loss = F.cross_entropy(model(x), y)
            op = HessianOperator(loss, params)
        g = op.gradient / op.gradient.norm()
        record = {"step": step, "loss": float(loss.detach())}
        for name in args.solvers:
            if step % (parse(name)[2] * args.every):
                continue
            history: list = []
            t0, n0 = time.perf_counter(), op.num_hvps
            vals, vecs = solve(name, op, g, previous.get(name), args.cap, history)
            previous[name] = vecs
            record[name] = {"history": history, "hvps": op.num_hvps - n0,
                            "eigenvalues": vals.tolist(), "seconds": time.perf_counter() - t0}
            print(f"step {step} {name}: {op.num_hvps - n0} HVPs, eigenvalues "
                  f"{[round(v, 2) for v in vals.tolist()]}", flush=True)
        records.append(record)
        del op
        args.out.write_text(json.dumps({"hvp_cost": hvp_cost, "every": args.every,
                                        "batch": args.batch, "records": records}))
        if point == args.points - 1:
            break
        for _ in range(args.every):
            x, y = next(batches)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            step += 1
    print(f"\nWarm solves (after the first): products to reach the tolerance, mean [max]; "
          f"amortised cost 1 + (1 + {hvp_cost:.2f}·n)/interval")
    print("| solver | k | tol | HVPs | interval 50 | interval 100 | interval 200 |")
    print("|---|---|---|---|---|---|---|")
    for name in args.solvers:
        top = parse(name)[1]
        for k in (1, 2, 3, 5):
            if k > top:
                continue
            for tol in TOLS:
                ns = [needed(r[name]["history"], k, tol) for r in records[1:] if name in r]
                if not ns:
                    continue
                done = [n for n in ns if n is not None]
                if len(done) < len(ns):
                    print(f"| {name} | {k} | {tol} | not within {args.cap} at {len(ns) - len(done)} "
                          f"of {len(ns)} | | | |")
                    continue
                n = statistics.mean(done)
                cost = [1 + (1 + hvp_cost * n) / interval for interval in (50, 100, 200)]
                print(f"| {name} | {k} | {tol} | {n:.1f} [{max(done)}] | "
                      + " | ".join(f"{c:.2f}" for c in cost) + " |")


if __name__ == "__main__":
    main()

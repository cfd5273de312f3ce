"""A small CPU sweep of HATAM's beta_c and gamma (the seed gives neither).

Trains the tiny CNN (sharpbench.models.TinyCNN, ~5.5k parameters) with HATAM on a CIFAR-10
subset (a CIFAR-10 JPEG archive, train/<class>/*.jpg and test/<class>/*.jpg in a .tar.xz,
given by $SHARPBENCH_CIFAR10_JPEG; synthetic data if it is missing) for every
beta_c × gamma on the grid, a few seeds each, and prints final test accuracy / loss. gamma = 0 is
AdamW exactly. Small and CPU-only: it can rank settings only coarsely.

    python scripts/hatam_sweep.py                     # the sweep recorded in HATAM's docstring
                                                      # (≈ 5 min on 2 idle CPU cores)
    python scripts/hatam_sweep.py --epochs 2 --seeds 1  # a smoke run
"""
from __future__ import annotations

import argparse
import os
import io
import itertools
import statistics
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
from sharpbench.models import TinyCNN
from sharpbench.optim import HATAM

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
ARCHIVE = Path(os.environ.get("SHARPBENCH_CIFAR10_JPEG", "cifar10-jpeg.tar.xz"))
MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)


def load_subset(archive: Path, n_train: int, n_test: int, cache: Path):
    """The first n_train / n_test images per class of each split, as uint8 NCHW tensors."""
    if cache.exists():
        d = np.load(cache)
        return [torch.from_numpy(d[k]) for k in ("xtr", "ytr", "xte", "yte")]
    from PIL import Image
    want = {"train": n_train, "test": n_test}
    data = {s: {c: [] for c in range(10)} for s in want}
    with tarfile.open(archive, "r:xz") as tar:
        for member in tar:
            parts = member.name.split("/")
            if len(parts) != 3 or not member.isfile() or parts[1] not in CLASSES:
                continue
            split, label = parts[0], CLASSES.index(parts[1])
            if split not in want or len(data[split][label]) >= want[split]:
                continue
            img = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
            data[split][label].append(np.asarray(img))
    out = []
    for split in ("train", "test"):
        xs = [x for c in range(10) for x in data[split][c]]
        ys = [c for c in range(10) for _ in data[split][c]]
        out += [torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).contiguous(),
                torch.tensor(ys)]
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, xtr=out[0].numpy(), ytr=out[1].numpy(), xte=out[2].numpy(), yte=out[3].numpy())
    return out


def synthetic(n_train: int, n_test: int):
    g = torch.Generator().manual_seed(0)
    protos = torch.rand(10, 3, 32, 32, generator=g)
    def make(n):
        y = torch.arange(10).repeat_interleave(n)
        x = protos[y] * 0.5 + torch.rand(len(y), 3, 32, 32, generator=g) * 0.5
        return (x * 255).to(torch.uint8), y
    return [*make(n_train), *make(n_test)]


def normalise(x: torch.Tensor) -> torch.Tensor:
    return (x.float() / 255 - MEAN) / STD


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random crop 32 with 4-pixel padding and horizontal flip, batched."""
    n = x.shape[0]
    padded = F.pad(x, (4, 4, 4, 4))
    i = torch.randint(0, 9, (n,), generator=g)
    j = torch.randint(0, 9, (n,), generator=g)
    rows = (i[:, None] + torch.arange(32))[:, None, :, None].expand(n, 3, 32, 40)
    cols = (j[:, None] + torch.arange(32))[:, None, None, :].expand(n, 3, 32, 32)
    out = padded.gather(2, rows).gather(3, cols)
    flip = torch.rand(n, generator=g) < 0.5
    out[flip] = out[flip].flip(3)
    return out


def run(data, beta_c: float, gamma: float, seed: int, epochs: int, lr: float, batch: int):
    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    model = TinyCNN(10)
    opt = HATAM(model.parameters(), lr=lr, weight_decay=1e-2, beta_c=beta_c, gamma=gamma)
    g = torch.Generator().manual_seed(seed)
    xtr_n, xte_n = normalise(xtr), normalise(xte)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(ytr), generator=g)
        for k in range(0, len(perm) - batch + 1, batch):
            idx = perm[k:k + batch]
            x, y = augment(xtr_n[idx], g), ytr[idx]

            def closure():
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss
            opt.step(closure)
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(xte_n[k:k + 1000]) for k in range(0, len(yte), 1000)])
        train_logits = torch.cat([model(xtr_n[k:k + 1000]) for k in range(0, len(ytr), 1000)])
    return dict(test_acc=(logits.argmax(1) == yte).float().mean().item() * 100,
                test_loss=F.cross_entropy(logits, yte).item(),
                train_loss=F.cross_entropy(train_logits, ytr).item())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--beta-c", type=float, nargs="+", default=[0.9, 0.99])
    ap.add_argument("--gamma", type=float, nargs="+", default=[0.0, 0.1, 0.5, 1.0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--n-train", type=int, default=500, help="images per class")
    ap.add_argument("--n-test", type=int, default=500, help="images per class")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/sharpbench_hatam_sweep.npz"))
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if ARCHIVE.exists():
        cache = args.cache.with_name(f"{args.cache.stem}_{args.n_train}_{args.n_test}.npz")
        data, source = load_subset(ARCHIVE, args.n_train, args.n_test, cache), "CIFAR-10 subset"
    else:
        data, source = synthetic(args.n_train, args.n_test), "synthetic"
    print(f"{source}: {len(data[1])} train / {len(data[3])} test images, TinyCNN, HATAM lr "
          f"{args.lr}, wd 1e-2, batch {args.batch}, {args.epochs} epochs, {args.seeds} seeds")
    print(f"{'beta_c':>7} {'gamma':>6} {'test acc %':>14} {'test loss':>16} {'train loss':>16} "
          f"{'Δacc vs AdamW':>14} {'Δtest loss':>11} {'s':>5}")
    adamw = None  # gamma = 0 is AdamW whatever beta_c: run it once; deltas are paired by seed
    for beta_c, gamma in itertools.product(args.beta_c, args.gamma):
        t0 = time.time()
        if gamma == 0 and adamw is not None:
            rs = adamw
        else:
            rs = [run(data, beta_c, gamma, s, args.epochs, args.lr, args.batch)
                  for s in range(args.seeds)]
        if gamma == 0:
            adamw = rs

        def fmt(vals):
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            return f"{statistics.mean(vals):.3f} ± {sd:.3f}"
        deltas = ("", "")
        if adamw is not None:
            d_acc = statistics.mean(r["test_acc"] - a["test_acc"] for r, a in zip(rs, adamw))
            d_loss = statistics.mean(r["test_loss"] - a["test_loss"] for r, a in zip(rs, adamw))
            deltas = (f"{d_acc:+.2f}", f"{d_loss:+.4f}")
        print(f"{beta_c:>7} {gamma:>6} {fmt([r['test_acc'] for r in rs]):>14} "
              f"{fmt([r['test_loss'] for r in rs]):>16} {fmt([r['train_loss'] for r in rs]):>16} "
              f"{deltas[0]:>14} {deltas[1]:>11} {time.time() - t0:>5.0f}", flush=True)

if __name__ == "__main__":
    main()

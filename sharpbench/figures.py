"""The toy figures of Feldman 2025 ("Ландшафт функции потерь нейронных сетей: SAM и его
модификации"), made with sharpbench's own optimizer classes:

    python -m sharpbench.figures [all | sam_x6 | beale | sam_vs_asam | linear_regression] [--out DIR]

sam_x6             SAM on f(x) = x⁶ + x⁵ + 5x³ − 30x² + 3x over [−3, 3]: a 30-frame GIF (curve,
                   current point with x and f(x), grid)                       → sam_x6.gif
beale              SAM next to gradient descent on the Beale function: SAM stalls near the saddle
                   point (0, 1) (Fig. 5; Kim et al., arXiv:2301.06308, 2023) → beale.png
sam_vs_asam        SAM and ASAM trajectories on a scale-asymmetric 2-D problem (Fig. 7)
                                                                              → sam_vs_asam.png
linear_regression  MSE and R² per epoch of SGD, SAM, SSAM-F and FriendlySAM, and the final values
                   (Figs. 3–4)                                                → linear_regression.png

Each takes a few seconds on a CPU; every setting is written in the figure's title or legend.
"""
from __future__ import annotations

import argparse
import io
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .optim import ASAM, SAM, SSAMF, FriendlySAM
from .sharpness.plots import new_figure, publish, save_png


def x6(x):
    """f(x) = x⁶ + x⁵ + 5x³ − 30x² + 3x."""
    return x ** 6 + x ** 5 + 5 * x ** 3 - 30 * x ** 2 + 3 * x


def beale(w):
    """Beale's function; global minimum f(3, 0.5) = 0, saddle point at (0, 1)."""
    x, y = w[0], w[1]
    return (1.5 - x + x * y) ** 2 + (2.25 - x + x * y ** 2) ** 2 + (2.625 - x + x * y ** 3) ** 2


def scale_asymmetric(w):
    """L(w) = (1 − w₁w₂)²: the two-layer linear model w₂·(w₁·x) fitted to y = x.

    Every point of the hyperbola w₁w₂ = 1 is a minimum, and (w₁, w₂) → (αw₁, w₂/α) leaves the
    function unchanged: the sharpness SAM sees depends on this arbitrary scale, ASAM's does not.
    """
    return (1 - w[0] * w[1]) ** 2


def trajectory(make_opt: Callable, f: Callable, start, steps: int) -> np.ndarray:
    """Points visited by an optimizer minimising f from ``start`` (float64, one closure per step)."""
    w = torch.tensor(start, dtype=torch.float64, requires_grad=True)
    opt = make_opt([w])
    path = [w.detach().clone()]
    for _ in range(steps):
        def closure():
            opt.zero_grad()
            loss = f(w)
            loss.backward()
            return loss
        opt.step(closure)
        path.append(w.detach().clone())
    return torch.stack(path).numpy()


def sgd(**kw):
    return lambda params: torch.optim.SGD(params, **kw)


def sam(**kw):
    return lambda params: SAM(params, base_optimizer=torch.optim.SGD, **kw)


def asam(**kw):
    return lambda params: ASAM(params, base_optimizer=torch.optim.SGD, **kw)


# ------------------------------------------------------------------------------- x⁶ GIF
def fig_sam_x6(out: Path, frames: int = 30, start: float = 2.5, rho: float = 0.1, lr: float = 2e-3) -> Path:
    from PIL import Image
    path = trajectory(sam(rho=rho, lr=lr), x6, start, frames - 1)
    xs = np.linspace(-3, 3, 600)
    fig = new_figure(6, 4)
    ax = fig.add_subplot()
    ax.plot(xs, x6(xs), color="C0", lw=1.5, label="f(x) = x⁶ + x⁵ + 5x³ − 30x² + 3x")
    (trail,) = ax.plot([], [], color="C3", lw=0.8, alpha=0.4)
    (point,) = ax.plot([], [], "o", color="C3", ms=8, label="SAM")
    note = ax.annotate("", (0, 0), textcoords="offset points", xytext=(10, 12), fontsize=9)
    ax.set(xlim=(-3, 3), ylim=(-170, 300), xlabel="x", ylabel="f(x)", title="SAM")
    ax.grid(alpha=0.4)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()  # with a title in place, so the per-frame titles fit
    images = []
    for i, x in enumerate(path):  # one figure, its artists updated per frame
        trail.set_data(path[:i + 1], x6(path[:i + 1]))
        point.set_data([x], [x6(x)])
        note.xy = (x, x6(x))
        note.set_position((-85, -30) if x > 1.5 else (10, 12))  # keep the label inside the axes
        note.set_text(f"x = {x:.3f}\nf(x) = {x6(x):.2f}")
        ax.set_title(f"SAM (ρ={rho}, lr={lr}, from x₀={start}): step {i}/{len(path) - 1}")
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=80)
        buf.seek(0)
        images.append(Image.open(buf).convert("P", palette=Image.ADAPTIVE))
    target = out / "sam_x6.gif"
    fd, tmp = tempfile.mkstemp(dir=out, prefix=".sam_x6.", suffix=".gif")
    os.close(fd)
    try:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=250, loop=0)
        publish(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


# ------------------------------------------------------------------------------ Beale
def fig_beale(out: Path, start=(0.5, 1.4), rho: float = 0.3, lr: float = 0.01, steps: int = 2000) -> Path:
    paths = {"gradient descent": trajectory(sgd(lr=lr), beale, start, steps),
             f"SAM (ρ={rho})": trajectory(sam(rho=rho, lr=lr), beale, start, steps)}
    g = np.linspace(-1.5, 4, 300), np.linspace(-1.5, 2, 300)
    X, Y = np.meshgrid(*g)
    Z = beale(np.stack([X, Y]))
    fig = new_figure(6.4, 4.8)
    ax = fig.add_subplot()
    ax.contour(X, Y, np.log10(Z + 1e-3), levels=30, cmap="viridis", linewidths=0.7)
    for i, (label, p) in enumerate(paths.items()):
        ax.plot(p[:, 0], p[:, 1], color=f"C{i + 1}", lw=2, label=f"{label}: ends at ({p[-1, 0]:.2f}, {p[-1, 1]:.2f}), "
                                                            f"f = {beale(p[-1]):.3g}")
    ax.plot(*start, "P", color="black", ms=11, label=f"start {tuple(start)}")
    ax.plot(3, 0.5, "*", color="gold", mec="black", ms=16, label="global minimum (3, 0.5)")
    ax.plot(0, 1, "X", color="red", ms=9, label="saddle point (0, 1)")
    ax.set(xlabel="x", ylabel="y", title=f"Beale function, lr={lr}, {steps} steps (log-spaced contours)")
    ax.legend(fontsize=7.5, loc="lower left")
    fig.tight_layout()
    return save_png(fig, out / "beale.png")


# ------------------------------------------------------------------------ SAM vs ASAM
def fig_sam_vs_asam(out: Path, start=(0.25, 2.2), lr: float = 0.02, steps: int = 3000,
                    rho_sam: float = 0.1, rho_asam: float = 0.1) -> Path:
    """On the valley w₁w₂ = 1 the Hessian's top eigenvalue is w₁² + w₂² (up to a factor 2), smallest
    at w₁ = w₂ = 1, while the adaptive sharpness (T = |w|) is the same everywhere on it. SAM
    drifts along the valley towards (1, 1); ASAM, like SGD, stays near where it arrived."""
    paths = {"SGD": trajectory(sgd(lr=lr), scale_asymmetric, start, steps),
             f"SAM (ρ={rho_sam})": trajectory(sam(rho=rho_sam, lr=lr), scale_asymmetric, start, steps),
             f"ASAM (ρ={rho_asam}, η=0.01)": trajectory(asam(rho=rho_asam, lr=lr), scale_asymmetric, start, steps)}
    X, Y = np.meshgrid(np.linspace(0, 2.5, 300), np.linspace(0, 2.5, 300))
    Z = scale_asymmetric(np.stack([X, Y]))
    fig = new_figure(6.2, 5.4)
    ax = fig.add_subplot()
    cs = ax.contourf(X, Y, np.log10(Z + 1e-4), levels=30, cmap="Greys_r", alpha=0.8)
    fig.colorbar(cs, ax=ax, shrink=0.8, label="log10 loss")
    hyper = np.linspace(0.4, 2.5, 100)
    ax.plot(hyper, 1 / hyper, ls="--", color="white", lw=1, label="minima w₁w₂ = 1")
    for i, (label, p) in enumerate(paths.items()):
        ax.plot(p[:, 0], p[:, 1], "-", color=f"C{i}", lw=1.2, alpha=0.8)
        ax.plot(p[-1, 0], p[-1, 1], "o", color=f"C{i}", mec="black", ms=9 - 2 * i,
                label=f"{label} → ({p[-1, 0]:.2f}, {p[-1, 1]:.2f})")
    ax.plot(*start, "P", color="black", ms=10, label=f"start {tuple(start)}")
    ax.set(xlim=(0, 2.5), ylim=(0, 2.5), xlabel="w₁", ylabel="w₂", aspect="equal",
           title=f"L = (1 − w₁w₂)², lr={lr}, {steps} steps")
    ax.legend(fontsize=7.5, loc="upper right")
    fig.tight_layout()
    return save_png(fig, out / "sam_vs_asam.png")


# --------------------------------------------------------------------- linear regression
def regression_data(n: int = 512, d: int = 20, noise: float = 0.5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * torch.linspace(0.2, 2.0, d)
    beta = torch.randn(d, generator=g)
    y = x @ beta + noise * torch.randn(n, generator=g)
    return x, y


def r2_score(pred: torch.Tensor, y: torch.Tensor) -> float:
    return float(1 - ((y - pred) ** 2).sum() / ((y - y.mean()) ** 2).sum())


def train_regression(name: str, x, y, epochs: int, batch: int, lr: float, rho: float, seed: int = 0):
    """Per-epoch training MSE and R² of a linear model y ≈ wᵀx + b trained with ``name``."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(x.shape[1], 1)
    params = list(model.parameters())
    base = dict(base_optimizer=torch.optim.SGD, lr=lr, momentum=0.9)
    opt = {"SGD": lambda: torch.optim.SGD(params, lr=lr, momentum=0.9),
           "SAM": lambda: SAM(params, rho=rho, **base),
           "SSAM-F": lambda: SSAMF(params, rho=rho, sparsity=0.5, update_interval=5, num_samples=128, **base),
           "FriendlySAM": lambda: FriendlySAM(params, rho=rho, sigma=1.0, lmbda=0.95, **base)}[name]()
    mse = torch.nn.functional.mse_loss
    order = torch.Generator().manual_seed(seed)
    history = {"mse": [], "r2": []}

    def record():
        with torch.no_grad():
            pred = model(x).squeeze(1)
        history["mse"].append(float(mse(pred, y)))
        history["r2"].append(r2_score(pred, y))
    record()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=order)
        for i in range(0, len(y), batch):
            idx = perm[i:i + batch]
            xb, yb = x[idx], y[idx]

            def closure():
                opt.zero_grad()
                loss = mse(model(xb).squeeze(1), yb)
                loss.backward()
                return loss
            if name == "SSAM-F":
                fisher_idx = iter(torch.randperm(len(y), generator=order).split(32))

                def fisher_closure():  # mean Gaussian NLL (= MSE/2 + const) of 32 samples
                    idx_f = next(fisher_idx)
                    opt.zero_grad()
                    (0.5 * mse(model(x[idx_f]).squeeze(1), y[idx_f])).backward()
                    return len(idx_f)
                opt.step(closure, fisher_closure=fisher_closure)
            else:
                opt.step(closure)
        record()
    return history


def fig_linear_regression(out: Path, epochs: int = 30, batch: int = 32, lr: float = 0.005, rho: float = 0.05) -> Path:
    x, y = regression_data()
    names = ("SGD", "SAM", "SSAM-F", "FriendlySAM")
    hist = {n: train_regression(n, x, y, epochs, batch, lr, rho) for n in names}
    fig = new_figure(13, 3.8)
    ax_m, ax_r, ax_b = (fig.add_subplot(1, 3, i) for i in (1, 2, 3))
    for i, n in enumerate(names):
        ax_m.plot(hist[n]["mse"], color=f"C{i}", label=n)
        ax_r.plot(hist[n]["r2"], color=f"C{i}", label=n)
    ax_m.set(yscale="log", xlabel="epoch", ylabel="training MSE", title="MSE per epoch")
    ax_r.set(xlabel="epoch", ylabel="R² (training set)", title="R² per epoch", ylim=(0, 1.02))
    for ax in (ax_m, ax_r):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    pos = np.arange(len(names))
    final_mse = [hist[n]["mse"][-1] for n in names]
    final_r2 = [hist[n]["r2"][-1] for n in names]
    ax_b.bar(pos - 0.2, final_mse, 0.4, color="tab:red", label="final MSE")
    ax_b2 = ax_b.twinx()
    ax_b2.bar(pos + 0.2, final_r2, 0.4, color="tab:green", label="final R²")
    for p, m, r in zip(pos, final_mse, final_r2):
        ax_b.annotate(f"{m:.3f}", (p - 0.2, m), ha="center", va="bottom", fontsize=7)
        ax_b2.annotate(f"{r:.4f}", (p + 0.2, r), ha="center", va="bottom", fontsize=7)
    ax_b.set_xticks(pos, names)
    ax_b.set(ylabel="final MSE", title=f"after epoch {epochs}")
    ax_b2.set(ylabel="final R²", ylim=(min(final_r2) - 0.01, 1.0))
    fig.suptitle(f"Linear regression, 512 samples × 20 features, noise σ=0.5; batch {batch}, lr {lr}, "
                 f"momentum 0.9, ρ={rho} (SSAM-F: s=0.5, K=5; FriendlySAM: σ=1, λ=0.95)", fontsize=9)
    fig.tight_layout()
    return save_png(fig, out / "linear_regression.png")


FIGURES = {"sam_x6": fig_sam_x6, "beale": fig_beale, "sam_vs_asam": fig_sam_vs_asam,
           "linear_regression": fig_linear_regression}


def make(names, out) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return [FIGURES[n](out) for n in names]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sharpbench.figures", description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", default=["all"], help=f"all or any of: {', '.join(FIGURES)}")
    parser.add_argument("--out", default="outputs/figures", help="output folder (default: outputs/figures)")
    args = parser.parse_args(argv)
    names = list(FIGURES) if "all" in args.names or not args.names else args.names
    unknown = [n for n in names if n not in FIGURES]
    if unknown:
        print(f"error: unknown figure {', '.join(unknown)}; choose all or any of {', '.join(FIGURES)}",
              file=sys.stderr)
        return 2
    for path in make(names, args.out):
        print(f"[sharpbench] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The toy figures of Feldman 2025 ("Ландшафт функции потерь нейронных сетей: SAM и его
модификации"), made with sharpbench's own optimizer classes:

    python -m sharpbench.figures [all | sam_x6 | beale | sam_vs_asam | linear_regression] [--out DIR]

sam_x6             gradient descent and SAM from one start with one lr on f(x) = x⁶ + x⁵ + 5x³
                   − 30x² + 3x over [−3, 3]: a 30-frame GIF (both points, SAM's ascent point)
                   and both whole paths; prints where they go and how often, over a grid of
                   starts, lr and ρ, SAM and gradient descent end in which minimum
                                                              → sam_x6.gif, sam_x6.png
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
X6_SHARP, X6_MAX, X6_WIDE = -2.2404, 0.0506, 1.4008  # the minima and the local maximum of x6
X6_START, X6_LR, X6_RHO = -1.0, 0.002, 0.4


def x6_grad(x):
    """f'(x) = 6x⁵ + 5x⁴ + 15x² − 60x + 3."""
    return 6 * x ** 5 + 5 * x ** 4 + 15 * x ** 2 - 60 * x + 3


def x6_paths(start: float = X6_START, lr: float = X6_LR, rho: float = X6_RHO, steps: int = 29
             ) -> dict[str, np.ndarray]:
    """Gradient descent and SAM from the same start with the same lr (the project's SAM class)."""
    return {"gradient descent": trajectory(sgd(lr=lr), x6, start, steps),
            "SAM": trajectory(sam(rho=rho, lr=lr), x6, start, steps)}


def x6_step(x, lr, rho):
    """One SAM step on x6 in one dimension, elementwise: x − lr·f'(x + ρ·sign f'(x)) (SAM's
    ascent step ρ·g/‖g‖ is ρ·sign g here); ρ = 0 is a gradient-descent step."""
    return x - lr * x6_grad(x + rho * np.sign(x6_grad(x)))


def x6_sweep(starts, lrs, rhos, steps: int) -> dict[str, np.ndarray]:
    """Where GD and SAM go on x6 for every (start, lr, rho), all at once (float64 NumPy,
    ``x6_step``, which ``tests/test_figures.py`` checks against the SAM class). Returns the
    grids and each method's outcome per setting (``x6_outcome``, over the last 100 steps)."""
    x0, lr, rho = (a.ravel() for a in np.meshgrid(np.asarray(starts, float), np.asarray(lrs, float),
                                                   np.asarray(rhos, float), indexing="ij"))
    out = {"start": x0, "lr": lr, "rho": rho}
    for name, r in (("gd", np.zeros_like(rho)), ("sam", rho)):
        x, tail = x0.copy(), []
        with np.errstate(all="ignore"):
            for t in range(steps):
                x = x6_step(x, lr, r)
                x = np.where(np.abs(x) > 10, np.nan, x)  # diverged
                if t >= steps - 100:
                    tail.append(x)
        out[name] = x6_outcome(np.stack(tail, axis=1))
    return out


def x6_outcome(tail: np.ndarray) -> np.ndarray:
    """Per row of the last points: 'sharp' (settled within 0.3 of −2.24), 'bouncing' (in the
    sharp minimum's basin, not settled), 'wide' (within 0.4 of 1.40), 'maximum' (within 0.3 of
    the local maximum 0.05), 'diverged' or 'other'."""
    out = np.full(len(tail), "other", dtype=object)
    bad = ~np.isfinite(tail).all(axis=1)
    left = (tail < X6_MAX).all(axis=1)
    out[left] = "bouncing"
    out[left & (np.abs(tail - X6_SHARP) < 0.3).all(axis=1)] = "sharp"
    out[(np.abs(tail - X6_WIDE) < 0.4).all(axis=1)] = "wide"
    out[~left & (np.abs(tail - X6_MAX) < 0.3).all(axis=1)] = "maximum"
    out[bad] = "diverged"
    return out


X6_GRID = {"starts": np.round(np.arange(-2.9, 2.91, 0.1), 2), "lrs": (0.001, 0.0015, 0.002, 0.0025, 0.003,
                                                                       0.0035, 0.004, 0.0045),
           "rhos": np.round(np.arange(0.05, 1.001, 0.05), 2), "steps": 1000}


def x6_summary(grid: dict | None = None) -> str:
    """The counts behind the README's caption of sam_x6: (GD outcome, SAM outcome) over a grid."""
    grid = grid or X6_GRID
    r = x6_sweep(grid["starts"], grid["lrs"], grid["rhos"], grid["steps"])
    from collections import Counter
    counts = Counter(zip(r["gd"], r["sam"]))
    lines = [f"x6: {len(r['gd'])} settings (starts {grid['starts'][0]}..{grid['starts'][-1]}, "
             f"lr {min(grid['lrs'])}..{max(grid['lrs'])}, rho {grid['rhos'][0]}..{grid['rhos'][-1]}), "
             f"{grid['steps']} steps; GD outcome -> SAM outcome: count"]
    lines += [f"  GD {g:<8} SAM {s:<8} {n}" for (g, s), n in sorted(counts.items(), key=lambda kv: -kv[1])]
    return "\n".join(lines)


def fig_sam_x6(out: Path, frames: int = 30, start: float = X6_START, rho: float = X6_RHO,
               lr: float = X6_LR) -> Path:
    """sam_x6.gif (one step per frame) and sam_x6.png (the whole paths): gradient descent and
    SAM from the same start with the same lr."""
    from PIL import Image
    from .colors import method_color
    paths = x6_paths(start, lr, rho, frames - 1)
    styles = {"gradient descent": (method_color("sgd"), "s", f"gradient descent (lr={lr})"),
              "SAM": (method_color("sam"), "o", f"SAM (ρ={rho}, lr={lr})")}
    xs = np.linspace(-3, 3, 600)
    title = f"f(x) = x⁶ + x⁵ + 5x³ − 30x² + 3x, both from x₀ = {start}"
    fig = new_figure(6.4, 4.4)
    ax = fig.add_subplot()
    ax.plot(xs, x6(xs), color="black", lw=1.2)
    ax.annotate(f"sharp minimum\nx = {X6_SHARP:.2f}, f″ ≈ 404", (X6_SHARP, x6(X6_SHARP)), xytext=(-2.9, 40),
                fontsize=8, arrowprops=dict(arrowstyle="->", lw=0.6))
    ax.annotate(f"wide minimum\nx = {X6_WIDE:.2f}, f″ ≈ 153", (X6_WIDE, x6(X6_WIDE)), xytext=(1.3, 110),
                fontsize=8, arrowprops=dict(arrowstyle="->", lw=0.6))
    artists = {}
    for name, (color, marker, label) in styles.items():
        (trail,) = ax.plot([], [], color=color, lw=0.9, alpha=0.5)
        (point,) = ax.plot([], [], marker, color=color, mec="black", ms=9, label=label)
        artists[name] = (trail, point)
    (ascent,) = ax.plot([], [], "o", mfc="none", mec=method_color("sam"), ms=8, mew=1.2,
                        label="SAM's ascent point x + ρ·sign f′(x), where it takes the gradient")
    (link,) = ax.plot([], [], ":", color=method_color("sam"), lw=1)
    note = ax.text(0.02, 0.97, "", transform=ax.transAxes, va="top", fontsize=8.5, family="monospace",
                   bbox=dict(boxstyle="round", fc="white", ec="0.7"))
    ax.set(xlim=(-3, 3), ylim=(-170, 300), xlabel="x", ylabel="f(x)", title=title)
    ax.grid(alpha=0.4)
    ax.legend(loc="lower right", fontsize=7.5)
    fig.tight_layout()
    images = []
    for i in range(frames):  # one figure, its artists updated per frame
        text = [f"step {i}/{frames - 1}"]
        for name, (trail, point) in artists.items():
            p = paths[name]
            trail.set_data(p[:i + 1], x6(p[:i + 1]))
            point.set_data([p[i]], [x6(p[i])])
            text.append(f"{'GD' if name != 'SAM' else 'SAM'}: x = {p[i]:+.3f}")
        x = paths["SAM"][i]
        up = x + rho * np.sign(x6_grad(x))
        ascent.set_data([up], [x6(up)])
        link.set_data([x, up], [x6(x), x6(up)])
        note.set_text("\n".join(text))
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=80)
        buf.seek(0)
        images.append(Image.open(buf).convert("P", palette=Image.ADAPTIVE))
    target = out / "sam_x6.gif"
    fd, tmp = tempfile.mkstemp(dir=out, prefix=".sam_x6.", suffix=".gif")
    os.close(fd)
    try:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=300, loop=0)
        publish(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _x6_static(paths, styles, out / "sam_x6.png", title)
    return target


def _x6_static(paths, styles, path: Path, title: str) -> Path:
    """Both whole paths: on the curve (left) and x against the step (right)."""
    fig = new_figure(11, 4.2)
    ax_f, ax_x = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    xs = np.linspace(-3, 3, 600)
    ax_f.plot(xs, x6(xs), color="black", lw=1.2)
    for name, p in paths.items():
        color, marker, label = styles[name]
        ax_f.plot(p, x6(p), marker + "-", color=color, mec="black", mew=0.4, ms=5, lw=0.7, alpha=0.8,
                  label=f"{label}: ends at x = {p[-1]:.3f}")
        ax_x.plot(np.arange(len(p)), p, marker + "-", color=color, mec="black", mew=0.4, ms=4, lw=1,
                  label=label)
    for x, text in ((X6_SHARP, "sharp minimum"), (X6_MAX, "local maximum"), (X6_WIDE, "wide minimum")):
        ax_x.axhline(x, color="grey", lw=0.7, ls="--")
        below = x == X6_SHARP  # under its line, left: where no path runs
        ax_x.annotate(f"{text} {x:.2f}", (0, x), xytext=(2, -3 if below else 3), textcoords="offset points",
                      ha="left", va="top" if below else "bottom", fontsize=8, color="0.3")
    ax_f.set(xlim=(-3, 3), ylim=(-170, 300), xlabel="x", ylabel="f(x)", title=title)
    ax_x.set(xlabel="step", ylabel="x", ylim=(-3, 2), title="x after each step")
    for ax in (ax_f, ax_x):
        ax.grid(alpha=0.3)
    ax_f.legend(fontsize=8, loc="upper center")
    fig.tight_layout()
    return save_png(fig, path)


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
    from .colors import method_color
    for method, (label, p) in zip(("sgd", "sam"), paths.items()):
        ax.plot(p[:, 0], p[:, 1], color=method_color(method), lw=2,
                label=f"{label}: ends at ({p[-1, 0]:.2f}, {p[-1, 1]:.2f}), f = {beale(p[-1]):.3g}")
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
    from .colors import method_color
    for i, (method, (label, p)) in enumerate(zip(("sgd", "sam", "asam"), paths.items())):
        ax.plot(p[:, 0], p[:, 1], "-", color=method_color(method), lw=1.2, alpha=0.8)
        ax.plot(p[-1, 0], p[-1, 1], "o", color=method_color(method), mec="black", ms=9 - 2 * i,
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
    return save_png(linear_regression_figure(hist, epochs, batch, lr, rho), out / "linear_regression.png")


def linear_regression_figure(hist: dict[str, dict[str, list[float]]], epochs: int, batch: int, lr: float,
                             rho: float):
    """MSE and R² per epoch (one line per method, in its colour) and the final values (bars)."""
    names = tuple(hist)
    fig = new_figure(13, 3.8)
    ax_m, ax_r, ax_b = (fig.add_subplot(1, 3, i) for i in (1, 2, 3))
    from matplotlib.patches import Patch
    from .colors import method_color
    colors = [method_color(n) for n in names]
    for n, color in zip(names, colors):
        ax_m.plot(hist[n]["mse"], color=color, label=n)
        ax_r.plot(hist[n]["r2"], color=color, label=n)
    ax_m.set(yscale="log", xlabel="epoch", ylabel="training MSE", title="MSE per epoch")
    ax_r.set(xlabel="epoch", ylabel="R² (training set)", title="R² per epoch", ylim=(0, 1.02))
    for ax in (ax_m, ax_r):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    pos = np.arange(len(names))
    final_mse = [hist[n]["mse"][-1] for n in names]
    final_r2 = [hist[n]["r2"][-1] for n in names]
    # each method's two bars in its colour: MSE filled (left axis), R² hatched (right axis)
    ax_b.bar(pos - 0.2, final_mse, 0.4, color=colors, edgecolor="black", lw=0.5)
    ax_b2 = ax_b.twinx()
    ax_b2.bar(pos + 0.2, final_r2, 0.4, color="white", edgecolor=colors, hatch="///", lw=1.2)
    for p, m, r in zip(pos, final_mse, final_r2):
        ax_b.annotate(f"{m:.3f}", (p - 0.2, m), ha="center", va="bottom", fontsize=7)
        ax_b2.annotate(f"{r:.4f}", (p + 0.2, r), ha="center", va="bottom", fontsize=7)
    ax_b.set_xticks(pos, names, fontsize=8)
    ax_b.set(ylabel="final MSE (filled bars)", title=f"after epoch {epochs}",
             ylim=(0, max(final_mse) * 1.25))
    ax_b2.legend(handles=[Patch(facecolor="0.6", edgecolor="black", lw=0.5, label="final MSE (left axis)"),
                         Patch(facecolor="white", edgecolor="0.3", hatch="///", label="final R² (right axis)")],
                fontsize=7.5, loc="upper left")
    ax_b2.set(ylabel="final R² (hatched bars)", ylim=(min(final_r2) - 0.01, 1.0))
    fig.suptitle(f"Linear regression, 512 samples × 20 features, noise σ=0.5; batch {batch}, lr {lr}, "
                 f"momentum 0.9, ρ={rho} (SSAM-F: s=0.5, K=5; FriendlySAM: σ=1, λ=0.95)", fontsize=9)
    fig.tight_layout()
    return fig


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
    if "sam_x6" in names:  # the numbers of the README's caption
        paths = x6_paths()
        for name, p in paths.items():
            print(f"[sharpbench] sam_x6: {name} from x0={X6_START} (lr={X6_LR}, rho={X6_RHO}): "
                  f"x after each step {np.array2string(p, precision=3, max_line_width=10_000)}")
        second = lambda x: 30 * x ** 4 + 20 * x ** 3 + 30 * x - 60  # noqa: E731 - f''
        print(f"[sharpbench] sam_x6: f'' = {second(X6_SHARP):.1f} at x = {X6_SHARP} (sharp), "
              f"{second(X6_WIDE):.1f} at x = {X6_WIDE} (wide)")
        print(x6_summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())

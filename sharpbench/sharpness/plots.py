"""Figures of the sharpness diagnostics (matplotlib, Agg canvas, PNGs written atomically).

    contour / 3-D surface   loss on the 2-D filter-normalised plane; the centre (trained weights) marked
    surfaces side by side   several runs with ONE logarithmic colour scale and the same levels
    line                    loss (and accuracy) along a 1-D interpolation
    density                 log-density of the Hessian spectrum (stochastic Lanczos quadrature)
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..fileio import atomic_file, publish
from .landscape import Line, Surface

__all__ = ["publish"]  # (figures.py writes its GIF through it)


def new_figure(width: float, height: float, layout: str | None = None):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), layout=layout)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, path, dpi: int = 110) -> Path:
    path = Path(path)
    with atomic_file(path) as f:
        fig.savefig(f, format="png", dpi=dpi)
    return path


def shared_log_norm(surfaces: Sequence[Surface]):
    """One LogNorm over the losses of all surfaces (losses are > 0 for cross-entropy)."""
    from matplotlib.colors import LogNorm
    lo = min(float(np.min(s.loss)) for s in surfaces)
    hi = max(float(np.max(s.loss)) for s in surfaces)
    lo = max(lo, 1e-8)
    hi = max(hi, lo * 1.0001)
    return LogNorm(vmin=lo, vmax=hi)


def _levels(norm, n: int = 25) -> np.ndarray:
    return np.geomspace(norm.vmin, norm.vmax, n)


def _contour(ax, s: Surface, norm, title: str):
    A, B = np.meshgrid(s.alphas, s.betas)
    cs = ax.contourf(A, B, np.clip(s.loss, norm.vmin, norm.vmax), levels=_levels(norm), norm=norm,
                     cmap="viridis")
    ax.contour(A, B, np.clip(s.loss, norm.vmin, norm.vmax), levels=_levels(norm, 13), norm=norm,
               colors="white", linewidths=0.4, alpha=0.6)
    ax.plot([0], [0], marker="*", color="red", ms=9, label="trained weights")
    ax.set(title=title, xlabel="α (direction 1)", ylabel="β (direction 2)", aspect="equal")
    return cs


def _colorbar(fig, cs, axes, norm):
    cb = fig.colorbar(cs, ax=axes, shrink=0.85, label="loss (log scale)")
    ticks = np.geomspace(norm.vmin, norm.vmax, 6)
    cb.set_ticks(ticks, labels=[f"{t:.3g}" for t in ticks])
    cb.minorticks_off()
    return cb


def plot_surface_contour(surface: Surface, path, title: str = "loss surface") -> Path:
    fig = new_figure(5.4, 4.4, layout="constrained")
    ax = fig.add_subplot()
    norm = shared_log_norm([surface])
    cs = _contour(ax, surface, norm, title)
    _colorbar(fig, cs, ax, norm)
    return save_png(fig, path)


def _surface3d(ax, s: Surface, norm, title: str):
    A, B = np.meshgrid(s.alphas, s.betas)
    z = np.log10(np.clip(s.loss, norm.vmin, norm.vmax))
    ax.plot_surface(A, B, z, cmap="viridis", norm=_log10_norm(norm), rstride=1, cstride=1,
                    linewidth=0, antialiased=True)
    ax.set(title=title, xlabel="α", ylabel="β", zlabel="log10 loss",
           zlim=(np.log10(norm.vmin), np.log10(norm.vmax)))
    ax.view_init(elev=30, azim=-60)
    ax.set_box_aspect(None, zoom=0.85)  # room for the z label


def _log10_norm(norm):
    from matplotlib.colors import Normalize
    return Normalize(vmin=np.log10(norm.vmin), vmax=np.log10(norm.vmax))


def plot_surface_3d(surface: Surface, path, title: str = "loss surface") -> Path:
    fig = new_figure(5.6, 4.6)
    ax = fig.add_subplot(projection="3d")
    _surface3d(ax, surface, shared_log_norm([surface]), title)
    return save_png(fig, path)


def plot_surfaces(items: Sequence[tuple[str, Surface]], path, kind: str = "contour",
                  suptitle: str = "") -> Path:
    """Several runs side by side, one shared logarithmic colour scale (and z range for 3-D)."""
    if kind not in ("contour", "3d"):
        raise ValueError(f"kind must be 'contour' or '3d', got {kind!r}")
    if not items:
        raise ValueError("no surfaces to plot")
    n = len(items)
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig = new_figure(4.2 * cols + (1.0 if kind == "contour" else 0), 3.9 * rows + 0.4,
                     layout="constrained" if kind == "contour" else None)
    norm = shared_log_norm([s for _, s in items])
    axes, cs = [], None
    for i, (label, s) in enumerate(items):
        if kind == "contour":
            ax = fig.add_subplot(rows, cols, i + 1)
            cs = _contour(ax, s, norm, label)
        else:
            ax = fig.add_subplot(rows, cols, i + 1, projection="3d")
            _surface3d(ax, s, norm, label)
        axes.append(ax)
    if suptitle:
        fig.suptitle(suptitle)
    if kind == "contour":
        _colorbar(fig, cs, axes, norm)
    else:
        fig.tight_layout()
    return save_png(fig, path)


def plot_lines(items: Sequence[tuple[str, Line]], path, title: str = "loss along a line",
               xlabel: str = "t  (0 = start, 1 = end)") -> Path:
    fig = new_figure(9, 3.6)
    ax_l, ax_a = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for i, (label, line) in enumerate(items):
        ax_l.plot(line.t, line.loss, color=f"C{i}", lw=1.6, label=label)
        ax_a.plot(line.t, line.acc, color=f"C{i}", lw=1.6, label=label)
    for ax, ylabel in ((ax_l, "loss"), (ax_a, "accuracy (%)")):
        for x in (0, 1):
            ax.axvline(x, color="grey", lw=0.7, ls=":")
        ax.set(xlabel=xlabel, ylabel=ylabel)
        ax.grid(alpha=0.3)
    lo = min(float(np.min(line.loss)) for _, line in items)
    hi = max(float(np.max(line.loss)) for _, line in items)
    if lo > 0 and hi / lo > 20:  # a log axis only where the loss spans orders of magnitude
        ax_l.set_yscale("log")
    ax_l.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return save_png(fig, path)


def plot_density(grid, density, path, title: str = "Hessian eigenvalue density",
                 eigenvalues: Sequence[float] = ()) -> Path:
    fig = new_figure(6, 3.8)
    ax = fig.add_subplot()
    grid, density = np.asarray(grid), np.asarray(density)
    floor = max(float(density.max()) * 1e-12, 1e-300)
    ax.semilogy(grid, np.maximum(density, floor), color="C0", lw=1.3)
    for i, lam in enumerate(eigenvalues):
        ax.axvline(lam, color="C3", lw=0.8, ls="--", label="top eigenvalues (Lanczos)" if i == 0 else None)
    ax.set(title=title, xlabel="eigenvalue", ylabel="density (log scale)",
           ylim=(max(floor, float(density.max()) * 1e-8), float(density.max()) * 3))
    ax.grid(alpha=0.3)
    if len(eigenvalues):
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, path)


def plot_lambda_history(series: Sequence[tuple[str, Sequence[int], Sequence[float]]], path,
                        title: str = "top Hessian eigenvalue during training") -> Path:
    fig = new_figure(6, 3.8)
    ax = fig.add_subplot()
    for i, (label, epochs, values) in enumerate(series):
        ax.plot(epochs, values, marker="o", ms=3, color=f"C{i}", label=label)
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(title=title, xlabel="epoch", ylabel="λ_max")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, path)

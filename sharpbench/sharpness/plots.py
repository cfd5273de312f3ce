"""Figures of the sharpness diagnostics (matplotlib, Agg canvas, PNGs written atomically).

    contour / 3-D surface   loss on the 2-D filter-normalised plane; the centre (trained weights) marked
    surfaces side by side   several runs with ONE logarithmic colour scale and the same levels
    line                    loss (and accuracy) along a 1-D interpolation
    density                 log-density of the Hessian spectrum (stochastic Lanczos quadrature)
    λ_max history           top Hessian eigenvalue per epoch, several runs

Every method has one colour in all figures (``sharpbench.colors.method_color``): the curves of a
sweep's report, the λ_max history, the line and density of a run, and the panel titles of the
side-by-side surfaces. Functions drawing several runs take ``methods``, one per item.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..colors import method_color
from ..fileio import atomic_file, publish
from .landscape import Line, Surface

__all__ = ["publish"]  # (figures.py writes its GIF through it)
LINESTYLES = ("-", "--", "-.", ":")


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


def wrap_title(text: str, width_in: float, fontsize: float = 12.0) -> str:
    """``text`` broken into lines that fit ``width_in`` inches at ``fontsize`` points (an average
    character is taken as 0.55 em wide): a long suptitle is wrapped, not clipped at the edges."""
    import textwrap
    chars = max(20, int(width_in * 72 / (0.55 * fontsize)))
    return "\n".join(textwrap.fill(line, chars) for line in text.split("\n"))


def _title(ax, title: str, color: str | None = None):
    ax.set_title(title, color=color or "black", fontsize=10,
                 fontweight="bold" if color else "normal")


def _contour(ax, s: Surface, norm, title: str, color: str | None = None):
    A, B = np.meshgrid(s.alphas, s.betas)
    cs = ax.contourf(A, B, np.clip(s.loss, norm.vmin, norm.vmax), levels=_levels(norm), norm=norm,
                     cmap="viridis")
    ax.contour(A, B, np.clip(s.loss, norm.vmin, norm.vmax), levels=_levels(norm, 13), norm=norm,
               colors="white", linewidths=0.4, alpha=0.6)
    ax.plot([0], [0], marker="*", color="red", ms=9, label="trained weights")
    ax.set(xlabel="α (direction 1)", ylabel="β (direction 2)", aspect="equal")
    _title(ax, title, color)
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


def _surface3d(ax, s: Surface, norm, title: str, color: str | None = None):
    from matplotlib.ticker import MaxNLocator
    A, B = np.meshgrid(s.alphas, s.betas)
    z = np.log10(np.clip(s.loss, norm.vmin, norm.vmax))
    ax.plot_surface(A, B, z, cmap="viridis", norm=_log10_norm(norm), rstride=1, cstride=1,
                    linewidth=0, antialiased=True)
    ax.set(xlabel="α", ylabel="β", zlabel="log10 loss",
           zlim=(np.log10(norm.vmin), np.log10(norm.vmax)))
    _title(ax, title, color)
    # few, short tick labels: matplotlib's default 3-D ticks ran into each other along α and β
    for axis in (ax.xaxis, ax.yaxis, ax.zaxis):
        axis.set_major_locator(MaxNLocator(nbins=4))
    ax.tick_params(labelsize=7, pad=0)
    for axis in (ax.xaxis, ax.yaxis, ax.zaxis):
        axis.labelpad = 2
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
                  suptitle: str = "", methods: Sequence[str] | None = None) -> Path:
    """Several runs side by side, one shared logarithmic colour scale (and z range for 3-D);
    each panel's title in the colour of its method (``methods``, one per item)."""
    if kind not in ("contour", "3d"):
        raise ValueError(f"kind must be 'contour' or '3d', got {kind!r}")
    if not items:
        raise ValueError("no surfaces to plot")
    n = len(items)
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    width = 4.2 * cols + (1.0 if kind == "contour" else 0)
    # constrained layout for the contour panels; the 3-D panels are placed by hand (the layout
    # engines put their titles at the figure's edge)
    fig = new_figure(width, 3.9 * rows + 0.4, layout="constrained" if kind == "contour" else None)
    norm = shared_log_norm([s for _, s in items])
    colors = [method_color(m) for m in methods] if methods else [None] * n
    axes, cs = [], None
    for i, ((label, s), color) in enumerate(zip(items, colors)):
        if kind == "contour":
            ax = fig.add_subplot(rows, cols, i + 1)
            cs = _contour(ax, s, norm, label, color)
        else:
            ax = fig.add_subplot(rows, cols, i + 1, projection="3d")
            _surface3d(ax, s, norm, label, color)
        axes.append(ax)
    title_lines = 0
    if suptitle:
        text = wrap_title(suptitle, width - 0.3)
        fig.suptitle(text)
        title_lines = text.count("\n") + 1
    if kind == "contour":
        _colorbar(fig, cs, axes, norm)
    else:  # room above each panel for its title (0.45 in) and the suptitle's lines (0.25 in each)
        top = 1 - (0.45 + 0.25 * title_lines) / fig.get_figheight()
        fig.subplots_adjust(left=0.01, right=0.96, bottom=0.03, top=top, wspace=0.12, hspace=0.25)
    return save_png(fig, path)


def plot_lines(items: Sequence[tuple[str, Line]], path, title: str = "loss along a line",
               xlabel: str = "t  (0 = start, 1 = end)", methods: Sequence[str] | None = None) -> Path:
    fig = new_figure(9, 3.6)
    ax_l, ax_a = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    colors = [method_color(m) for m in methods] if methods else [f"C{i}" for i in range(len(items))]
    for i, ((label, line), color) in enumerate(zip(items, colors)):
        ax_l.plot(line.t, line.loss, color=color, lw=1.6, label=label)
        ax_a.plot(line.t, line.acc, color=color, lw=1.6, label=label)
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
    fig.suptitle(wrap_title(title, 8.8))
    fig.tight_layout()
    return save_png(fig, path)


def plot_density(grid, density, path, title: str = "Hessian eigenvalue density",
                 eigenvalues: Sequence[float] = (), method: str | None = None) -> Path:
    """``title`` names the run (e.g. ``run_label``); the curve is in its method's colour."""
    fig = new_figure(6, 3.8)
    ax = fig.add_subplot()
    grid, density = np.asarray(grid), np.asarray(density)
    floor = max(float(density.max()) * 1e-12, 1e-300)
    color = method_color(method) if method else "C0"
    ax.semilogy(grid, np.maximum(density, floor), color=color, lw=1.3)
    for i, lam in enumerate(eigenvalues):
        ax.axvline(lam, color="black", lw=0.8, ls="--", label="top eigenvalues (Lanczos)" if i == 0 else None)
    ax.set_title(wrap_title(title, 5.6, 10), fontsize=10)
    ax.set(xlabel="eigenvalue", ylabel="density (log scale)",
           ylim=(max(floor, float(density.max()) * 1e-8), float(density.max()) * 3))
    ax.grid(alpha=0.3)
    if len(eigenvalues):
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, path)


def plot_lambda_history(series: Sequence[tuple[str, Sequence[int], Sequence[float]]], path,
                        title: str = "top Hessian eigenvalue during training",
                        methods: Sequence[str] | None = None) -> Path:
    """One line per run: its method's colour, the runs (seeds) of one method told apart by the
    line style (``methods``, one per series; without it each label is taken as a method)."""
    fig = new_figure(6, 3.8)
    ax = fig.add_subplot()
    methods = list(methods) if methods else [label for label, *_ in series]
    seen: dict[str, int] = {}
    for (label, epochs, values), method in zip(series, methods):
        k = seen[method] = seen.get(method, -1) + 1
        ax.plot(epochs, values, marker="o", ms=3, color=method_color(method),
                ls=LINESTYLES[k % len(LINESTYLES)], label=label)
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(title=title, xlabel="epoch", ylabel=r"$\lambda_{\max}$")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, path)

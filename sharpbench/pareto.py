"""Final test accuracy against training cost, one point per method (and setting) of a sweep, with
the Pareto front marked: what each method's accuracy costs.

Per dataset, one figure with two panels that share the accuracy axis:

- x = cost per step in SGD-step equivalents (FLOP-priced: passes, Hessian graphs and
  Hessian-vector products, refresh steps included; metrics.json's ``cost_per_step``), which does
  not depend on the machine or its load;
- x = training time (``wall_time_s``: training only, evaluation apart), which does.

y = final-epoch test accuracy, the mean over seeds, with error bars of one standard deviation
(none for a single seed). A point is on the Pareto front if no other point is at most as costly
and at least as accurate, one of them strictly; the front is drawn as a staircase through those
points (one point alone: its label is bold), and their labels are bold. Rows timed on an overloaded machine are hollow in the time
panel.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import pandas as pd

from .colors import method_color
from .curves import save


def pareto_front(costs: list[float], values: list[float]) -> list[int]:
    """Indices of the points that no other point dominates (cost at most, value at least, one
    strictly), in order of increasing cost. Points with a missing cost or value are left out."""
    pts = [(c, v, i) for i, (c, v) in enumerate(zip(costs, values))
           if not (math.isnan(c) or math.isnan(v))]
    front, best = [], -math.inf
    for c, v, i in sorted(pts, key=lambda p: (p[0], -p[1])):
        if v > best:
            front.append(i)
            best = v
    return front


def write_pareto(table: pd.DataFrame, out: Path, label: Callable[[str, str], str]) -> dict[str, Path]:
    """``accuracy_vs_cost_<dataset>.png/.pdf`` for each dataset of ``table`` (the report's
    per-(dataset, method, setting) table) that has two or more points with a cost."""
    paths: dict[str, Path] = {}
    for dataset, rows in table.groupby("dataset", sort=False):
        rows = rows[rows["n"] > 0]
        if rows["test_acc_mean"].notna().sum() < 2:
            continue
        paths.update(_figure(dataset, rows.reset_index(drop=True), out, label))
    return paths


def _figure(dataset: str, rows: pd.DataFrame, out: Path, label) -> dict[str, Path]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(10.0, 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    acc = rows["test_acc_mean"].astype(float).tolist()
    err = [0.0 if math.isnan(s) else s for s in rows["test_acc_std"].astype(float)]
    names = [label(r.method, r.setting) for r in rows.itertuples()]
    panels = (("cost_per_step", "cost per step (SGD steps, FLOP-priced)"),
              ("wall_time_s", "training time (s, evaluation excluded)"))
    for ax, (column, xlabel) in zip(axes, panels):
        x = [float(v) for v in rows[column]] if column in rows else [math.nan] * len(rows)
        front = pareto_front(x, acc)
        for i, r in enumerate(rows.itertuples()):
            if math.isnan(x[i]) or math.isnan(acc[i]):
                continue
            color = method_color(r.method)
            hollow = column == "wall_time_s" and bool(r.overloaded)
            ax.errorbar(x[i], acc[i], yerr=err[i] or None, fmt="o", ms=7, capsize=3,
                        color=color, mfc="white" if hollow else color, mec=color, zorder=3)
            ax.annotate(names[i], (x[i], acc[i]), xytext=(5, 4), textcoords="offset points",
                        fontsize=8, fontweight="bold" if i in front else "normal", color=color)
        if len(front) > 1:
            fx = [x[i] for i in front]
            fy = [acc[i] for i in front]
            ax.step(fx, fy, where="post", color="0.35", lw=1.0, ls="--", zorder=2,
                    label="Pareto front")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.margins(x=0.15, y=0.08)                       # room for the labels right of the points
        if column == "cost_per_step":
            ax.set_xlim(left=0, right=max([v for v in x if not math.isnan(v)] or [1]) * 1.25)
        if len(front) > 1:
            ax.legend(loc="lower right", fontsize=8, frameon=False)
    axes[0].set_ylabel("final test accuracy (%), mean ± std over seeds")
    seeds = sorted(set(int(n) for n in rows["n"]))
    fig.suptitle(f"{dataset}: final test accuracy against training cost "
                 f"({'/'.join(map(str, seeds))} seed{'s' if seeds != [1] else ''} per point; "
                 "bold: on the Pareto front)", fontsize=10)
    if any(bool(o) for o in rows["overloaded"]):
        axes[1].set_title("hollow: timed on an overloaded machine", fontsize=8)
    return save(fig, out / f"accuracy_vs_cost_{dataset}")

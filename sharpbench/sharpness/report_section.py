"""The sharpness part of the sweep report (``sharpbench.report`` calls it with the runs it counts
and its method labels).

For every (dataset, method, setting) whose completed runs were analysed
(``python -m sharpbench.analyze <sweep dir>``), the mean ± sample std (ddof=1) over seeds of

    λ_max (top Hessian eigenvalue), tr H (Hutchinson), and each m-sharpness measure in sharpness.json,

written as ``sharpness.csv`` (unrounded) and ``sharpness.md``, plus ``landscapes.png``: one
loss-surface panel per method (the lowest seed that has one), all on one colour scale.
Nothing is written when no run has a sharpness.json.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from ..fileio import atomic_write_text
from .landscape import load_surface
from .plots import plot_surfaces

RESULT_FILE = "sharpness.json"
DASH = "—"  # an empty cell (the report's tables use it too)
Label = Callable[[str, str], str]  # (method, setting) -> its name in a table


def run_measures(run_dir: str | Path) -> dict[str, float]:
    """Flat numbers of one run's sharpness.json: lambda_max, trace, sharp_<name>."""
    path = Path(run_dir) / RESULT_FILE
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, TypeError):
        return {}
    out = {}
    if "eigen" in data:
        out["lambda_max"] = data["eigen"].get("lambda_max")
    if "trace" in data:
        out["trace"] = data["trace"].get("trace")
    for name, value in (data.get("sharpness") or {}).items():
        if isinstance(value, dict) and "value" in value:
            out[f"sharp_{name}"] = value["value"]
    return out


def sharpness_frame(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per run (of the counted completed ``runs``) that has sharpness results."""
    rows = []
    for run in runs.itertuples():
        measures = run_measures(run.run_dir)
        if measures:
            rows.append({"dataset": run.dataset, "method": run.method, "setting": run.setting,
                         "seed": run.seed, "run_dir": run.run_dir, **measures})
    return pd.DataFrame(rows)


def sharpness_table(runs: pd.DataFrame) -> pd.DataFrame:
    measures = [c for c in runs.columns if c == "lambda_max" or c == "trace" or c.startswith("sharp_")]
    rows = []
    for (dataset, method, setting), group in runs.groupby(["dataset", "method", "setting"], sort=False):
        row = {"dataset": dataset, "method": method, "setting": setting, "n": len(group)}
        for m in measures:
            values = pd.to_numeric(group[m], errors="coerce").dropna()
            row[f"{m}_mean"] = values.mean() if len(values) else math.nan
            row[f"{m}_std"] = values.std(ddof=1) if len(values) > 1 else math.nan
            row[f"{m}_n"] = len(values)
        rows.append(row)
    return pd.DataFrame(rows)


def to_markdown(table: pd.DataFrame, method_label: Label) -> str:
    measures = [c[:-5] for c in table.columns if c.endswith("_mean")]
    header = ["dataset", "method", "n"] + [m.replace("sharp_", "m-sharpness ") if m.startswith("sharp_")
                                           else {"lambda_max": "λ_max", "trace": "tr H"}.get(m, m) for m in measures]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def cell(r, m):
        mean, std, n = r[f"{m}_mean"], r[f"{m}_std"], r[f"{m}_n"]
        if not n or pd.isna(mean):
            return DASH
        return f"{mean:.4g} ± {std:.2g}" if n > 1 else f"{mean:.4g} ± {DASH}"
    for _, r in table.iterrows():
        lines.append("| " + " | ".join([str(r["dataset"]), method_label(r["method"], r["setting"] or ""),
                                        str(int(r["n"]))] + [cell(r, m) for m in measures]) + " |")
    return "\n".join(lines) + "\n"


def landscape_panels(runs: pd.DataFrame, method_label: Label,
                     methods: list[str] | None = None) -> list[tuple[str, Any]]:
    """One (label, surface) per (dataset, method, setting); ``methods``, when given, receives
    each panel's method (its colour)."""
    items = []
    for (dataset, method, setting), group in runs.groupby(["dataset", "method", "setting"], sort=False):
        for run in group.sort_values("seed").itertuples():
            npz = Path(run.run_dir) / "sharpness" / "landscape.npz"
            if npz.exists():
                items.append((f"{method_label(method, setting or '')} · {dataset} · seed {int(run.seed)}",
                              load_surface(npz)))
                if methods is not None:
                    methods.append(str(method))
                break
    return items


def write_sharpness_outputs(counted: pd.DataFrame, out: Path, method_label: Label,
                            figures: bool = True) -> dict[str, Path]:
    """sharpness.csv, sharpness.md and landscapes.png into ``out`` from the ``counted`` completed
    runs of the report; {} when no run was analysed."""
    if counted.empty or "run_dir" not in counted.columns:
        return {}
    runs = sharpness_frame(counted)
    paths: dict[str, Path] = {}
    if not runs.empty:
        table = sharpness_table(runs)
        atomic_write_text(out / "sharpness.csv", table.to_csv(index=False))
        atomic_write_text(out / "sharpness.md", to_markdown(table, method_label))
        paths.update(sharpness_csv=out / "sharpness.csv", sharpness_md=out / "sharpness.md")
    if figures:
        done = counted[["dataset", "method", "setting", "seed", "run_dir"]]
        methods: list[str] = []
        items = landscape_panels(done, method_label, methods)
        if items:
            paths["landscapes"] = plot_surfaces(items, out / "landscapes.png", "contour",
                                                "loss surfaces (filter-normalised directions, same seed), one colour scale",
                                                methods=methods)
    return paths

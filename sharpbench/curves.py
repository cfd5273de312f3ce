"""Training curves of a sweep, from each run's ``csv/metrics.csv`` and ``metrics.json``.

Per dataset, as PNG (screen) and PDF (vector, for LaTeX):

- ``curves_train_loss_<dataset>``: training loss per logged batch against epochs, against training
  time (evaluation excluded) and against forward/backward passes (1, 2 or 3 per step depending on
  the method: methods compared at equal cost);
- ``curves_test_acc_<dataset>``: test top-1 after each epoch against epochs and training time;
- ``curves_batch_loss_first<E>_<dataset>`` (option ``first_epochs``): the raw per-batch loss over
  the first E epochs, as in Feldman 2025, Fig. 9a/c/e.

Each curve is the mean over seeds (line) with the min-max over seeds as a light band with a dashed
outline. A run's loss is smoothed by a centred moving average over ``len // 50`` logged points
only when it has more than 100 (the axis label says so when it is). Runs whose log lacks a
column are drawn without it; a run with no log is left out.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from .fileio import atomic_file

SMOOTH_POINTS = 50      # a smoothed curve keeps about this many independent points
FEW_POINTS = 40         # at most this many points: draw markers
DATASET_LABELS = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "synthetic": "synthetic data"}
MODEL_LABELS = {"resnet18": "ResNet-18", "preact_resnet18": "PreAct ResNet-18",
                "wrn28_10": "WRN-28-10", "tiny_cnn": "tiny CNN"}
LINESTYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


# ----------------------------------------------------------------------------- one run's log
def run_curves(run_dir: str | os.PathLike, record: dict[str, Any] | None = None
               ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per logged step: step, epoch, time_s, passes, loss; per epoch: epoch, time_s, acc).

    ``epoch`` is fractional for steps (epochs done at the end of that batch); ``time_s`` is the
    training time at that point (logged ``train/time_s``, else interpolated from the epoch times
    in metrics.json); ``passes`` the forward/backward passes so far (logged ``train/passes``, else
    step × passes_per_step). Missing columns give empty frames, never an error."""
    record = record or {}
    path = Path(run_dir) / "csv" / "metrics.csv"
    log = pd.read_csv(path) if path.exists() else pd.DataFrame()
    return step_frame(log, record), epoch_frame(log, record)


def _column(log: pd.DataFrame, name: str) -> pd.Series:
    """``name`` per step (the last value logged at each step); empty if never logged."""
    if name not in log or "step" not in log:
        return pd.Series(dtype=float)
    rows = log.dropna(subset=[name])
    return pd.Series(rows[name].to_numpy(float), index=rows["step"].to_numpy(int)).groupby(level=0).last()


def steps_per_epoch(record: dict[str, Any], log: pd.DataFrame) -> float | None:
    spe = record.get("steps_per_epoch")
    if spe:
        return float(spe)
    steps, epochs = record.get("steps"), record.get("epochs_completed")
    if steps and epochs:
        return float(steps) / float(epochs)
    if "epoch" in log and "step" in log and len(log.dropna(subset=["step"])):
        counts = log.dropna(subset=["epoch"]).groupby("epoch")["step"].max()
        return float(counts.iloc[0] + 1) if len(counts) else None
    return None


def step_frame(log: pd.DataFrame, record: dict[str, Any]) -> pd.DataFrame:
    """Per logged step; the loss at the unperturbed weights, or, for a run whose steps mostly
    return only the loss at ``w + e`` (MSAM, A²SAM's one-pass steps), that one, with
    ``frame.attrs["perturbed"] = True`` (the legend says so)."""
    loss = _column(log, "train/loss_step")
    at_w_plus_e = _column(log, "train/loss_perturbed_step")
    perturbed = len(at_w_plus_e) > len(loss)
    if perturbed:
        loss = at_w_plus_e
    cols = ["step", "epoch", "time_s", "passes", "loss"]
    if loss.empty:
        return pd.DataFrame(columns=cols)
    steps = loss.index.to_numpy()
    done = steps + 1  # steps finished at the end of this batch
    spe = steps_per_epoch(record, log)
    epoch = done / spe if spe else np.full(len(steps), np.nan)
    time_s = _column(log, "train/time_s").reindex(steps)
    if time_s.isna().any() and spe and record.get("epoch_times_s"):
        bounds = np.concatenate([[0.0], np.cumsum(record["epoch_times_s"])])
        guess = np.interp(done / spe, np.arange(len(bounds)), bounds, right=np.nan)
        time_s = time_s.fillna(pd.Series(guess, index=steps))
    passes = _column(log, "train/passes").reindex(steps)
    if passes.isna().any() and record.get("passes_per_step"):
        passes = passes.fillna(pd.Series(done * float(record["passes_per_step"]), index=steps))
    frame = pd.DataFrame({"step": steps, "epoch": epoch, "time_s": time_s.to_numpy(float),
                          "passes": passes.to_numpy(float), "loss": loss.to_numpy(float)})
    frame.attrs["perturbed"] = perturbed
    return frame


def loss_name(label: str, frames: list[pd.DataFrame], n: int) -> str:
    """A loss curve's legend entry; ``at w + e`` when its runs log only that loss."""
    where = ", loss at w + e" if any(f.attrs.get("perturbed") for f in frames) else ""
    return f"{label} (n={n}{where})"


def epoch_frame(log: pd.DataFrame, record: dict[str, Any]) -> pd.DataFrame:
    """Test accuracy after each training epoch (epoch e logged during training -> x = e + 1); the
    row of the final ``trainer.test`` repeats the last one and is used only when alone."""
    cols = ["epoch", "time_s", "acc"]
    if "test/acc" not in log or "epoch" not in log:
        return pd.DataFrame(columns=cols)
    rows = log.dropna(subset=["test/acc"])
    trained = record.get("epochs_completed")
    if not trained:  # the epochs with training rows (the final test row comes after them)
        train_cols = [c for c in log if str(c).startswith("train/")]
        train_rows = log.dropna(subset=train_cols, how="all") if train_cols else log.iloc[0:0]
        trained = int(train_rows["epoch"].max()) + 1 if len(train_rows) else 0
    during = rows[rows["epoch"] < trained].drop_duplicates("epoch", keep="last")
    if during.empty:
        during = rows.tail(1)
    epoch = during["epoch"].to_numpy(int) + 1
    bounds = np.concatenate([[0.0], np.cumsum(record.get("epoch_times_s") or [])])
    time_s = np.array([bounds[e] if e < len(bounds) else np.nan for e in epoch])
    return pd.DataFrame({"epoch": epoch, "time_s": time_s, "acc": during["test/acc"].to_numpy(float)})


def smooth(values: pd.Series) -> tuple[pd.Series, int]:
    """Centred moving average over ``len // 50`` points (none at or below 100 points)."""
    window = len(values) // SMOOTH_POINTS if len(values) > 2 * SMOOTH_POINTS else 1
    if window <= 1:
        return values, 1
    return values.rolling(window, center=True, min_periods=1).mean(), window


# ------------------------------------------------------------------------- seeds → one curve
def mean_over_seeds(frames: list[pd.DataFrame], key: str, value: str) -> pd.DataFrame:
    """Per ``key`` (step or epoch) shared by the runs: mean of every column, min/max of ``value``."""
    tall = pd.concat([f.assign(run=i) for i, f in enumerate(frames)], ignore_index=True)
    grouped = tall.groupby(key)
    out = grouped.mean(numeric_only=True).drop(columns="run")
    out["lo"], out["hi"], out["n"] = grouped[value].min(), grouped[value].max(), grouped["run"].nunique()
    return out.reset_index()


# -------------------------------------------------------------------------------- figures
def write_curves(runs: pd.DataFrame, out: Path, labels: Callable[[Any], str],
                 records: dict[str, dict], first_epochs: tuple[int, ...] = ()) -> dict[str, Path]:
    """The figures of the module docstring for the completed runs of ``runs`` (one row per run,
    duplicates already removed); ``labels(row)`` names a row's curve (the table's label)."""
    groups: dict[str, dict[str, list[tuple[pd.DataFrame, pd.DataFrame]]]] = {}
    meta: dict[str, list[dict]] = {}
    methods: dict[str, str] = {}  # curve label -> method (its colour)
    for row in runs.itertuples():
        record = records.get(row.run_dir, {})
        steps, epochs = run_curves(row.run_dir, record)
        groups.setdefault(row.dataset, {}).setdefault(labels(row), []).append((steps, epochs))
        methods.setdefault(labels(row), str(getattr(row, "method", labels(row))))
        meta.setdefault(row.dataset, []).append(record | {"seed": row.seed, "model": row.model})
    paths: dict[str, Path] = {}
    styles = curve_styles(methods)
    for dataset, by_label in groups.items():
        title = figure_title(dataset, meta[dataset])
        losses = {k: [s for s, _ in v if len(s)] for k, v in by_label.items()}
        losses = {k: v for k, v in losses.items() if v}
        if losses:
            paths.update(_loss_figure(losses, out / f"curves_train_loss_{dataset}", title, styles))
            for e in first_epochs:
                early = {k: [s[s["epoch"] <= e + 1e-9] for s in v] for k, v in losses.items()}
                early = {k: [s for s in v if len(s)] for k, v in early.items()}
                if any(early.values()):
                    paths.update(_batch_loss_figure({k: v for k, v in early.items() if v},
                                                    out / f"curves_batch_loss_first{e}_{dataset}",
                                                    title, e, styles))
        accs = {k: [a for _, a in v if len(a)] for k, v in by_label.items()}
        accs = {k: v for k, v in accs.items() if v}
        if accs:
            paths.update(_acc_figure(accs, out / f"curves_test_acc_{dataset}", title, styles))
    return paths


def figure_title(dataset: str, metas: list[dict]) -> str:
    models = sorted({MODEL_LABELS.get(str(m.get("model")), str(m.get("model"))) for m in metas})
    epochs = sorted({int(m["epochs"]) for m in metas if m.get("epochs") is not None})
    seeds = sorted({m.get("seed") for m in metas if m.get("seed") is not None})
    parts = [f"{' / '.join(models)} on {DATASET_LABELS.get(dataset, dataset)}"]
    if epochs:
        parts.append(f"{'–'.join(map(str, (epochs[0], epochs[-1]) if len(epochs) > 1 else epochs))} epochs")
    parts.append(f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''}")
    return ", ".join(parts)


def curve_styles(methods: dict[str, str]) -> dict[str, tuple[str, int]]:
    """Curve label -> (its method's colour, the how-manieth setting of that method it is): one
    colour per method in every figure (``sharpbench.colors``); settings of one method differ in
    line style."""
    from .colors import method_color
    seen: dict[str, int] = {}
    styles = {}
    for label, method in methods.items():
        styles[label] = (method_color(method), seen.get(method, 0))
        seen[method] = seen.get(method, 0) + 1
    return styles


def _style(i: int, points: int, styles: dict[str, tuple[str, int]] | None = None,
           label: str | None = None) -> dict:
    color, k = (styles or {}).get(label, (f"C{i % 10}", i))
    return {"color": color, "ls": LINESTYLES[k % len(LINESTYLES)], "lw": 1.6,
            "marker": MARKERS[i % len(MARKERS)] if points <= FEW_POINTS else None, "ms": 4}


def _draw(ax, x, mean, lo, hi, n_runs, style, label) -> None:
    ax.plot(x, mean, label=label, **style)
    if n_runs > 1:
        ax.fill_between(x, lo, hi, color=style["color"], alpha=0.12, lw=0)
        for edge in (lo, hi):
            ax.plot(x, edge, color=style["color"], lw=0.6, ls=(0, (2, 2)), alpha=0.7)


def _figure(ncols: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(max(6.4, 4.2 * ncols), 3.9 if ncols > 1 else 4.3), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols, sharey=True, squeeze=False)[0]


def _finish(fig, axes, title: str, path_stem: Path) -> dict[str, Path]:
    from matplotlib.ticker import MaxNLocator
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.set_xlim(left=0)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.suptitle(title)
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 4), fontsize=8,
               frameon=False)
    for ax in axes:
        if ax.get_xlabel() == "epoch":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return save(fig, path_stem)


def _loss_figure(curves: dict[str, list[pd.DataFrame]], stem: Path, title: str,
                 styles: dict[str, tuple[str, int]] | None = None) -> dict[str, Path]:
    fig, axes = _figure(3)
    windows = []
    for i, (label, frames) in enumerate(curves.items()):
        smoothed = []
        for f in frames:
            values, window = smooth(f["loss"].reset_index(drop=True))
            windows.append(window)
            smoothed.append(f.assign(loss=values.to_numpy()))
        agg = mean_over_seeds(smoothed, "step", "loss")
        style = _style(i, len(agg), styles, label)
        name = loss_name(label, frames, int(agg["n"].max()))
        for ax, x in zip(axes, ("epoch", "time_s", "passes")):
            _draw(ax, agg[x], agg["loss"], agg["lo"], agg["hi"], agg["n"].max(), style, name)
    window = max(windows)
    ylabel = "training loss per batch"
    if window > 1:
        ylabel += f"\n(centred moving average, {window} points)"
    axes[0].set(xlabel="epoch", ylabel=ylabel)
    axes[1].set(xlabel="training time (s)")
    axes[2].set(xlabel="forward/backward passes")
    return _finish(fig, axes, f"Training loss: {title}", stem)


def _batch_loss_figure(curves: dict[str, list[pd.DataFrame]], stem: Path, title: str,
                       epochs: int, styles: dict[str, tuple[str, int]] | None = None) -> dict[str, Path]:
    fig, axes = _figure(1)
    ax = axes[0]
    for i, (label, frames) in enumerate(curves.items()):
        agg = mean_over_seeds(frames, "step", "loss")
        _draw(ax, agg["step"] + 1, agg["loss"], agg["lo"], agg["hi"], agg["n"].max(),
              _style(i, len(agg), styles, label), loss_name(label, frames, int(agg["n"].max())))
    ax.set(xlabel="batch (optimizer step)", ylabel="training loss per batch (not smoothed)")
    first = "the first epoch" if epochs == 1 else f"the first {epochs} epochs"
    return _finish(fig, axes, f"Batch loss over {first}\n{title}", stem)


def _acc_figure(curves: dict[str, list[pd.DataFrame]], stem: Path, title: str,
                styles: dict[str, tuple[str, int]] | None = None) -> dict[str, Path]:
    fig, axes = _figure(2)
    for i, (label, frames) in enumerate(curves.items()):
        agg = mean_over_seeds(frames, "epoch", "acc")
        style = _style(i, len(agg), styles, label)
        name = f"{label} (n={int(agg['n'].max())})"
        for ax, x in zip(axes, ("epoch", "time_s")):
            _draw(ax, agg[x], agg["acc"], agg["lo"], agg["hi"], agg["n"].max(), style, name)
    axes[0].set(xlabel="epoch", ylabel="test top-1 (%) after the epoch")
    axes[1].set(xlabel="training time (s)")
    return _finish(fig, axes, f"Test accuracy: {title}", stem)


def save(fig, stem: Path) -> dict[str, Path]:
    """``<stem>.png`` (150 dpi) and ``<stem>.pdf``, each written atomically."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = {}
    for fmt, kwargs in (("png", {"dpi": 150}), ("pdf", {})):
        path = stem.with_suffix(f".{fmt}")
        with atomic_file(path) as f:
            fig.savefig(f, format=fmt, **kwargs)
        paths[f"{stem.name}_{fmt}"] = path
    return paths

"""The sweep report: every run below some folders → ``runs.csv``, the results table and curves.

    python -m sharpbench.report [DIR ...] [--out DIR] [--name NAME] [--no-curves]
                                [--first-epochs 10 20]

Without DIR: the most recent sweep below ``outputs/sweeps/``.

collect_runs  every ``metrics.json`` below the folders, plus job folders that never wrote one
table1        completed runs per (dataset, method, setting): mean ± std over distinct seeds,
              beside Feldman 2025 where the runs used its recipe
write_outputs runs.csv, <name>.csv/.md/.tex and the curves (``sharpbench.curves``), each written
              atomically; <name> is the sweep folder's name unless given

Conventions (docs/sweeps.md repeats them):

- top-1 is the *final-epoch* test accuracy (%), mean ± sample std (ddof=1) over the distinct
  seeds of the row's completed runs; with one seed the std is "—" (NaN in <name>.csv);
- a seed run twice with the same setting (the same run logged again, to another logger, in
  another folder) counts once: the latest finished run is kept, the others are listed as
  duplicates (``duplicate_of`` in runs.csv, ``duplicates`` in the table), never averaged;
- loss is the mean validation loss when every completed run of the row has one
  (``dataset.val_split`` > 0), else the mean test loss; the header and ``loss_split`` say which;
- time is the mean training time per run (sum of its epochs' training time; evaluation is
  timed apart, ``eval_time_s``) ± its sample std over the row's seeds; a time marked ``*`` (and
  a vs SAM cell whose either row is) comes from runs of which at least one ran on an overloaded
  machine (``overloaded`` in metrics.json: the 1-minute load average above 1.5 × the CPU count
  at some point of training), so it measures the machine as much as the method; time vs SAM is 100 × that / the training time of SAM with the
  same other settings (same dataset, model, data and trainer settings, schedule; where several
  SAM rows qualify, the one with the same setting label, rho or lr); without such a SAM row there is no value, and a
  table without SAM has no such column;
- Feldman 2025 (Table 1) is shown beside a row only when all its runs used the paper's recipe
  (``sharpbench.reference``); other rows of methods the paper has read "other recipe";
- setting: the config keys (other than the seed and where the data lives) whose values differ
  between the runs of one method on one dataset, short names first (``rho=0.1, lr=0.05``);
  runs with different settings are never averaged together.

Extra per-run metrics (e.g. sharpness diagnostics a module writes into metrics.json) become
columns with ``register_metric(key, header)``: mean over the row's seeds, shown where present.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
import yaml

from . import reference
from .curves import DATASET_LABELS, write_curves
from .fileio import atomic_write_text, remove_stale_temporaries
from .pareto import write_pareto
from .optim import registry
from .record import METRICS_FILE, read_metrics
from .run_identity import defines_run
from .sharpness.report_section import DASH, write_sharpness_outputs

DATASET_ORDER = ("cifar10", "cifar100")
SWEEPS_DIR = Path("outputs") / "sweeps"

COMPLETED = "completed"
OTHER_RECIPE = "other recipe"
OVERLOADED_MARK = "*"  # a time measured on an overloaded machine
STALE_TMP_AGE_S = 600  # a report's temporary file this old was left by a killed report


def is_setting(key: str) -> bool:
    """A flattened config key that tells runs of one method apart: anything that defines a run
    (``run_identity.defines_run``: where the data lives or how a run is shown does not), except
    the seed, over which a row averages."""
    return key != "seed" and defines_run(key)


# Setting labels: these keys first, then the rest alphabetically; shorter names for a few.
SETTING_FIRST = ("optimizer.rho", "optimizer.lr")
SHORT_NAMES = {"trainer.max_epochs": "epochs", "dataset.batch_size": "batch"}
FRONT_COLUMNS = ("status", "dataset", "method", "setting", "seed", "model", "test_acc", "test_loss",
                 "val_acc", "val_loss", "train_loss", "train_acc", "wall_time_s", "eval_time_s",
                 "cpu_time_s", "load_avg_max", "overloaded", "epoch_time_s", "images_per_s", "passes_per_step", "hvps_per_step",
                 "cost_per_step", "peak_mem_mb", "epochs", "epochs_completed", "steps", "batch_size", "lr", "rho",
                 "base_optimizer", "device", "precision", "paper_recipe", "duplicate_of",
                 "error", "overrides", "run_dir")
NUMERIC_COLUMNS = ("seed", "test_acc", "test_loss", "val_acc", "val_loss", "train_loss",
                   "train_acc", "wall_time_s", "eval_time_s", "cpu_time_s", "load_avg_max",
                   "epoch_time_s", "images_per_s",
                   "passes_per_step", "hvps_per_step", "cost_per_step", "peak_mem_mb", "epochs",
                   "epochs_completed", "steps", "batch_size", "lr", "rho")
INTEGER_COLUMNS = ("seed", "epochs", "epochs_completed", "steps", "batch_size")


@dataclass(frozen=True)
class Metric:
    """An extra column: the mean of metrics.json's ``key`` over a row's seeds."""
    key: str
    header: str
    spec: str = ".3g"


EXTRA_METRICS: list[Metric] = []


def register_metric(key: str, header: str, spec: str = ".3g") -> None:
    """Add a per-run metric of metrics.json as a table column (kept once per key)."""
    if all(m.key != key for m in EXTRA_METRICS):
        EXTRA_METRICS.append(Metric(key, header, spec))


# the averages of the weights (monitor.weight_average; sharpbench/averaging.py)
register_metric("test_acc_swa", "top-1 SWA (%)", ".2f")
register_metric("test_acc_ema", "top-1 EMA (%)", ".2f")


# ----------------------------------------------------------------------------- collecting runs
def collect_runs(dirs: Iterable[str | os.PathLike]) -> pd.DataFrame:
    """One row per run found below ``dirs`` (any status; job folders without a metrics.json
    appear with status ``no_record``)."""
    return runs_frame([load_run(d) for d in find_run_dirs(dirs)])


def find_run_dirs(dirs: Iterable[str | os.PathLike]) -> list[Path]:
    """Folders holding a metrics.json, or a Hydra job record (``.hydra/overrides.yaml``)."""
    found: set[Path] = set()
    for root in dirs:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: no such folder")
        found.update(p.parent.resolve() for p in root.rglob(METRICS_FILE))
        found.update(p.parent.parent.resolve() for p in root.rglob("overrides.yaml")
                     if p.parent.name == ".hydra")
    return sorted(found)


def latest_sweep(root: Path = SWEEPS_DIR) -> Path:
    """The most recently modified folder below ``outputs/sweeps`` (what ``make report`` reads)."""
    sweeps = [p for p in root.glob("*") if p.is_dir()] if root.is_dir() else []
    if not sweeps:
        raise FileNotFoundError(f"no sweep below {root}/: run one (e.g. make table1-smoke) or "
                                "name the folder (python -m sharpbench.report DIR)")
    return max(sweeps, key=lambda p: p.stat().st_mtime)


def load_run(run_dir: Path) -> dict[str, Any]:
    """A run's metrics.json, completed from its Hydra job record where fields are missing."""
    record = read_metrics(run_dir)
    if record is None:
        exists = (run_dir / METRICS_FILE).exists()
        record = {"status": "unreadable" if exists else "no_record",
                  "error": f"{METRICS_FILE} is not valid JSON" if exists else
                  f"no {METRICS_FILE}: the job is still running, or was killed before writing it"}
    record = dict(record)
    job = hydra_job_record(run_dir)
    for key, value in job.items():
        if record.get(key) is None:
            record[key] = value
    record["run_dir"] = str(run_dir)
    return record


def hydra_job_record(run_dir: Path) -> dict[str, Any]:
    """method, dataset, model, seed and overrides from ``.hydra/`` (unresolved YAML)."""
    out: dict[str, Any] = {}
    try:
        cfg = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text()) or {}
        out = {"method": (cfg.get("optimizer") or {}).get("name"),
               "dataset": (cfg.get("dataset") or {}).get("name"),
               "model": (cfg.get("model") or {}).get("name"), "seed": cfg.get("seed")}
    except (OSError, yaml.YAMLError, AttributeError):
        pass
    try:
        out["overrides"] = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
    except (OSError, yaml.YAMLError):
        pass
    return {k: v for k, v in out.items() if v is not None}


def runs_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """The runs table from metrics.json-like dicts (used directly by the tests)."""
    rows = [flat_row(r) for r in records]
    flats = [flatten(r["config"]) if isinstance(r.get("config"), dict) else None for r in records]
    for row, flat, setting in zip(rows, flats, setting_labels(records)):
        row["setting"] = setting
        row["context"] = context_id(flat)
        row["paper_recipe"] = "; ".join(reference.recipe_differences(flat)) or "yes"
    df = pd.DataFrame(rows)
    for col in FRONT_COLUMNS + ("finished_at",):
        if col not in df:
            df[col] = None
    for col in NUMERIC_COLUMNS + tuple(m.key for m in EXTRA_METRICS):
        if col not in df:
            df[col] = None
        df[col] = pd.to_numeric(df[col], errors="coerce")
        if col in INTEGER_COLUMNS and (df[col].dropna() % 1 == 0).all():
            df[col] = df[col].astype("Int64")
    for col in ("status", "dataset", "method", "setting", "context"):
        df[col] = df[col].fillna("" if col in ("setting", "context") else "unknown").astype(str)
    df["duplicate_of"] = duplicates_of(df)
    df = df[list(FRONT_COLUMNS) + sorted(c for c in df if c not in FRONT_COLUMNS)]
    return sort_rows(df).reset_index(drop=True)


def flat_row(record: dict[str, Any]) -> dict[str, Any]:
    """Scalars as they are; hardware → gpu/hostname; overrides → one string; no nested config."""
    row = {}
    for key, value in record.items():
        if key in ("config", "epoch_times_s", "eval_times_s"):
            continue
        if key == "hardware" and isinstance(value, dict):
            row.update({f"hw_{k}": value.get(k) for k in ("gpu", "cpu", "hostname")})
        elif key == "overrides" and isinstance(value, list):
            row[key] = " ".join(map(str, value))
        elif isinstance(value, (list, dict)):
            row[key] = json.dumps(value, default=str)
        else:
            row[key] = value
    return row


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} → {"a.b": 1}; null values are left out (null and absent mean the same)."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    if tree is None:
        return {}
    return {prefix[:-1]: json.dumps(tree) if isinstance(tree, list) else tree}


def context_id(flat: dict[str, Any] | None) -> str:
    """What a run shares with the SAM run it is timed against: every setting outside the
    optimizer group (seed and data location excluded); "" for a run without a config."""
    if flat is None:
        return ""
    keep = {k: v for k, v in flat.items()
            if is_setting(k) and not k.startswith("optimizer.")}
    return hashlib.sha1(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:12]


def setting_labels(records: list[dict[str, Any]]) -> list[str]:
    """Per run, ``name=value`` for each config key that varies among the runs of its
    (dataset, method), e.g. ``rho=0.1, lr=0.05``; keys a run does not have are left out of its
    label (never ``gamma=unset``); "" when nothing varies or the run has no resolved config."""
    flats = [({k: v for k, v in flatten(r["config"]).items() if is_setting(k)}
              if isinstance(r.get("config"), dict) else None) for r in records]
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault((r.get("dataset"), r.get("method")), []).append(i)
    varying: dict[tuple, list[str]] = {}
    for key, members in groups.items():
        configs = [flats[i] for i in members if flats[i] is not None]
        keys = {k for c in configs for k in c}
        varying[key] = sorted((k for k in keys if len({repr(c.get(k)) for c in configs}) > 1),
                              key=lambda k: (SETTING_FIRST.index(k) if k in SETTING_FIRST
                                             else len(SETTING_FIRST), k))
    names = short_names({k for ks in varying.values() for k in ks})
    labels = [""] * len(records)
    for key, members in groups.items():
        for i in members:
            if flats[i] is not None:
                labels[i] = ", ".join(f"{names[k]}={show(flats[i][k])}"
                                      for k in varying[key] if k in flats[i])
        # two different settings must never share a label: name the missing keys then
        seen: dict[str, set] = {}
        for i in members:
            if flats[i] is not None:
                seen.setdefault(labels[i], set()).add(tuple(repr(flats[i].get(k)) for k in varying[key]))
        for i in members:
            if flats[i] is not None and len(seen[labels[i]]) > 1:
                labels[i] = ", ".join(f"{names[k]}={show(flats[i].get(k))}" for k in varying[key])
    return labels


def short_names(keys: set[str]) -> dict[str, str]:
    """The last part of each dotted key (``optimizer.rho`` → ``rho``; ``schedule.name`` →
    ``schedule``), the full key where two would share a name."""
    def short(key: str) -> str:
        parts = key.split(".")
        return SHORT_NAMES.get(key, parts[-2] if parts[-1] == "name" and len(parts) > 1 else parts[-1])
    last = {k: short(k) for k in keys}
    clash = {n for n in last.values() if list(last.values()).count(n) > 1}
    return {k: (k if n in clash else n) for k, n in last.items()}


def show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def duplicates_of(df: pd.DataFrame) -> list[str]:
    """For each completed run, "" if it counts, else the run_dir of the run of the same
    (dataset, method, setting, seed) that does (the latest finished)."""
    out = [""] * len(df)
    done = df[(df["status"] == COMPLETED) & df["seed"].notna()]
    for _, runs in done.groupby(["dataset", "method", "setting", "seed"], sort=False):
        if len(runs) < 2:
            continue
        order = runs.assign(_f=runs["finished_at"].fillna("").astype(str)).sort_values(
            ["_f", "run_dir"], kind="stable")
        kept = order.index[-1]
        for i in order.index[:-1]:
            out[df.index.get_loc(i)] = str(df.at[kept, "run_dir"])
    return out


def order_key(value: str, order: tuple[str, ...]) -> tuple[int, str]:
    return (order.index(value), "") if value in order else (len(order), value)


def sort_rows(df: pd.DataFrame) -> pd.DataFrame:
    keys = [order_key(d, DATASET_ORDER) + order_key(m, tuple(registry.names())) + (s,)
            for d, m, s in zip(df["dataset"], df["method"], df["setting"])]
    seeds = df["seed"] if "seed" in df else pd.Series([0] * len(df))
    index = sorted(range(len(df)), key=lambda i: (keys[i], nan_last(seeds.iloc[i])))
    return df.iloc[index]


def nan_last(x: Any) -> float:
    return math.inf if pd.isna(x) else float(x)


def failed_runs(df: pd.DataFrame) -> pd.DataFrame:
    """The runs that did not complete, with their status and error."""
    cols = ["status", "dataset", "method", "setting", "seed", "error", "run_dir"]
    return df.loc[df["status"] != COMPLETED, cols]


def counted_runs(df: pd.DataFrame) -> pd.DataFrame:
    """Completed runs, one per (dataset, method, setting, seed)."""
    return df[(df["status"] == COMPLETED) & (df["duplicate_of"] == "")]


# ----------------------------------------------------------------------------- the table
TABLE_COLUMNS = ["dataset", "method", "setting", "n", "failed", "duplicates", "statuses",
                 "test_acc_mean", "test_acc_std", "loss_mean", "loss_split", "wall_time_s",
                 "wall_time_std", "overloaded", "eval_time_s", "passes_per_step", "cost_per_step", "images_per_s", "peak_mem_mb",
                 "lr", "rho", "paper_recipe", "paper_top1", "paper_loss", "paper_time_vs_sam_pct", "context"]


def table1(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, method, setting), numbers unrounded; see the module docstring."""
    rows = []
    for (dataset, method, setting), runs in df.groupby(["dataset", "method", "setting"], sort=False):
        done = counted_runs(runs)
        has_val = len(done) > 0 and done["val_loss"].notna().all()
        not_done = runs.loc[runs["status"] != COMPLETED, "status"].value_counts()
        recipe = len(done) > 0 and bool((done["paper_recipe"] == "yes").all())
        # The paper's numbers stand beside a row only when its runs used the paper's recipe (in
        # every output: the CSV as the Markdown and LaTeX tables).
        paper = reference.paper_row(dataset, method) if recipe else None
        row = {
            "dataset": dataset, "method": method, "setting": setting,
            "n": int(done["seed"].nunique()), "failed": int(not_done.sum()),
            "duplicates": int(((runs["status"] == COMPLETED) & (runs["duplicate_of"] != "")).sum()),
            "statuses": "; ".join(f"{s}={c}" for s, c in sorted(not_done.items())),
            "test_acc_mean": done["test_acc"].mean(),
            "test_acc_std": done["test_acc"].std(ddof=1) if done["test_acc"].count() > 1 else math.nan,
            "loss_mean": done["val_loss" if has_val else "test_loss"].mean(),
            "loss_split": "val" if has_val else "test",
            "wall_time_s": done["wall_time_s"].mean(),
            "wall_time_std": (done["wall_time_s"].std(ddof=1) if done["wall_time_s"].count() > 1
                              else math.nan),
            # runs timed on an overloaded machine (older records, which did not measure it: 0)
            "overloaded": int((done["overloaded"] == True).sum()),  # noqa: E712 (None/NaN too)
            "eval_time_s": done["eval_time_s"].mean(),
            "passes_per_step": done["passes_per_step"].mean(),
            "cost_per_step": (done["cost_per_step"].mean() if "cost_per_step" in done
                              else math.nan),
            "images_per_s": done["images_per_s"].mean(),
            "peak_mem_mb": done["peak_mem_mb"].mean(),
            "lr": done["lr"].mean(), "rho": done["rho"].mean(),
            "paper_recipe": recipe,
            "paper_top1": paper.top1 if paper and paper.top1 is not None else math.nan,
            "paper_loss": paper.loss if paper and paper.loss is not None else math.nan,
            "paper_time_vs_sam_pct": (paper.time_vs_sam_pct if paper and paper.time_vs_sam_pct
                                      is not None else math.nan),
            "context": runs["context"].iloc[0],
        }
        for metric in EXTRA_METRICS:
            row[f"{metric.key}_mean"] = done[metric.key].mean() if metric.key in done else math.nan
        rows.append(row)
    columns = TABLE_COLUMNS + [f"{m.key}_mean" for m in EXTRA_METRICS]
    table = pd.DataFrame(rows, columns=columns)
    refs = [sam_reference(table, r) for r in table.itertuples()]
    table["time_vs_sam_pct"] = [100.0 * r.wall_time_s / table.at[j, "wall_time_s"] if j is not None
                                else math.nan for r, j in zip(table.itertuples(), refs)]
    table["time_vs_sam_of"] = [method_label("sam", table.at[j, "setting"]) if j is not None else ""
                               for j in refs]
    table["time_vs_sam_overloaded"] = [bool(r.overloaded) or (j is not None and
                                                              bool(table.at[j, "overloaded"]))
                                       for r, j in zip(table.itertuples(), refs)]
    return sort_rows(table).reset_index(drop=True)


def sam_reference(table: pd.DataFrame, row) -> int | None:
    """Index of the SAM row ``row`` is timed against: same dataset and same settings outside the
    optimizer; among several, the one with the same setting label, then rho, then lr. None if
    no single row qualifies."""
    sam = table[(table["dataset"] == row.dataset) & (table["method"] == "sam")
                & (table["context"] == row.context) & (table["wall_time_s"] > 0)]
    for key in ("setting", "rho", "lr"):
        if len(sam) > 1 and not pd.isna(getattr(row, key)):
            same = sam[sam[key] == getattr(row, key)]
            sam = same if len(same) else sam
    return sam.index[0] if len(sam) == 1 else None


def method_label(method: str, setting: str = "") -> str:
    label = registry.label(method)
    return f"{label} ({setting})" if setting else label


def mean_std(mean: float, std: float, n: int) -> str:
    """"92.01 ± 0.12"; the std is "—" for a single run."""
    if n == 0 or pd.isna(mean):
        return DASH
    return f"{mean:.2f} ± {fmt(std, '.2f')}"


def fmt(value: Any, spec: str) -> str:
    return DASH if value is None or pd.isna(value) else format(value, spec)


def seconds(value: float) -> str:
    return fmt(value, ".0f" if not pd.isna(value) and value >= 100 else ".1f")


def time_cell(row) -> str:
    """"23.6 ± 9.9" (the spread over seeds), "*" when a run of the row ran on an overloaded machine."""
    if pd.isna(row.wall_time_s):
        return DASH
    text = seconds(row.wall_time_s)
    if not pd.isna(row.wall_time_std):
        text += f" ± {seconds(row.wall_time_std)}"
    return text + (OVERLOADED_MARK if row.overloaded else "")


def time_vs_sam_cell(row) -> str:
    text = fmt(row.time_vs_sam_pct, ".0f")
    return text + (OVERLOADED_MARK if text != DASH and row.time_vs_sam_overloaded else "")


def paper_cell(row, field: str, spec: str) -> str:
    """The paper's number; "other recipe" where the paper has one but the runs are not its
    recipe; a dash where the paper has none."""
    if not row.paper_recipe:
        method = row["method"] if "method" in row.index else row.name[0]  # (method, setting) index
        paper = reference.paper_row(row["dataset"], method)
        has = paper is not None and getattr(paper, field.removeprefix("paper_"), None) is not None
        return OTHER_RECIPE if has else DASH
    value = getattr(row, field)
    return DASH if pd.isna(value) else format(value, spec)


def display_table(table: pd.DataFrame) -> pd.DataFrame:
    """The table for people: rows are methods (with their setting), a block of columns per
    dataset, text cells. Columns without a value in a dataset's block are left out."""
    datasets = list(dict.fromkeys(table["dataset"]))
    rows = list(dict.fromkeys(zip(table["method"], table["setting"])))
    columns: dict[tuple[str, str], list[str]] = {}
    for dataset in datasets:
        part = table[table["dataset"] == dataset].set_index(["method", "setting"])
        for name, cell in block_columns(part):
            columns[(DATASET_LABELS.get(dataset, dataset), name)] = [
                cell(part.loc[key]) if key in part.index else DASH for key in rows]
    out = pd.DataFrame(columns, index=[method_label(m, s) for m, s in rows])
    out.index.name = "method"
    return out


def block_columns(part: pd.DataFrame) -> list[tuple[str, Any]]:
    """(header, cell function) of the columns one dataset's rows have values for."""
    split = "/".join(sorted(set(part["loss_split"][part["n"] > 0]) or {"test"}))
    recipe = bool(part["paper_recipe"].any())
    cols = [("top-1 (%)", lambda r: mean_std(r.test_acc_mean, r.test_acc_std, r.n))]
    if recipe and part["paper_top1"].notna().any():
        cols.append((reference.CITATION, lambda r: paper_cell(r, "paper_top1", ".1f")))
    cols.append((f"{split} loss", lambda r: fmt(r.loss_mean, ".4f")))
    if recipe and part["paper_loss"].notna().any():
        cols.append((f"{reference.CITATION} loss", lambda r: paper_cell(r, "paper_loss", ".4f")))
    cols.append(("time (s)", time_cell))
    if part["time_vs_sam_pct"].notna().any():
        cols.append(("vs SAM (%)", time_vs_sam_cell))
    if recipe and part["paper_time_vs_sam_pct"].notna().any():
        cols.append((f"{reference.CITATION} vs SAM",
                     lambda r: paper_cell(r, "paper_time_vs_sam_pct", ".0f")))
    if part["cost_per_step"].notna().any():
        # passes plus Hessian-vector products at their FLOP price (A2SAM, X-SAM)
        cols.append(("cost", lambda r: fmt(r.cost_per_step, ".2f")))
    else:
        cols.append(("passes", lambda r: fmt(r.passes_per_step, ".2f")))
    for metric in EXTRA_METRICS:
        key = f"{metric.key}_mean"
        if key in part and part[key].notna().any():
            cols.append((metric.header, lambda r, key=key, spec=metric.spec: fmt(r[key], spec)))
    cols.append(("n", lambda r: str(int(r.n))))
    if part["failed"].any():
        cols.append(("failed", lambda r: str(int(r.failed))))
    if part["duplicates"].any():
        cols.append(("dup.", lambda r: str(int(r.duplicates))))
    return cols


def notes(table: pd.DataFrame) -> list[str]:
    """What the headers mean, for the lines under the markdown tables."""
    lines = ["top-1: final-epoch test accuracy, mean ± sample std over n distinct seeds "
             "(— with one seed). loss: mean cross-entropy of the final model. time: training "
             "time per run in seconds, evaluation excluded, mean ± sample std over the seeds. "
             "passes: forward/backward passes per optimizer step, counted."]
    if table["overloaded"].any():
        lines.append(f"{OVERLOADED_MARK}: at least one run of the row (or of the SAM row it is "
                     "timed against) ran on an overloaded machine (its 1-minute load average rose "
                     "above 1.5 × the CPU count during training; load_avg_max and cpu_time_s in "
                     "runs.csv): the time measures the machine as much as the method. Re-time on "
                     "a quiet machine before comparing.")
    if table["cost_per_step"].notna().any():
        lines.append("cost: forward/backward passes per optimizer step with each Hessian-vector "
                     "product priced at its FLOPs (measured, about 2 passes on ResNet-18), so "
                     "A²SAM's and X-SAM's curvature work is counted; equal to passes for the others.")
    if table["time_vs_sam_pct"].notna().any():
        lines.append("vs SAM: 100 × time / the training time of SAM with the same other settings "
                     "(dataset, model, data, schedule, trainer; where several SAM rows qualify, the "
                     "one with the same setting, rho or lr); — where there is no single such row.")
    if table["paper_recipe"].any() and table["paper_top1"].notna().any():
        lines.append(f"{reference.CITATION}: top-1 (%) of {reference.CITATION_FULL}, shown only beside runs of "
                     f"its recipe (ResNet-18, 80 epochs, full training set, batch 128, label "
                     f"smoothing 0.1, lr 0.1 ×0.1 at epochs 50 and 75, rho 0.05); "
                     f"\"{OTHER_RECIPE}\" elsewhere.")
    if table["duplicates"].any():
        lines.append("dup.: completed runs of a seed already counted (listed in runs.csv, "
                     "duplicate_of), not averaged.")
    return lines


def to_markdown(display: pd.DataFrame, title: str = "", note_lines: Iterable[str] = ()) -> str:
    """One aligned table per dataset (readable in a terminal), then the notes."""
    out = [f"# {title}", ""] if title else []
    for block in dict.fromkeys(d for d, _ in display.columns):
        names = [m for d, m in display.columns if d == block]
        cells = display[block]
        keep = [label for label, row in cells.iterrows() if any(v != DASH for v in row)]
        out += [f"## {block}", "", *aligned_table([display.index.name or "method"] + names,
                                                  [[label] + [str(v) for v in cells.loc[label]]
                                                   for label in keep]), ""]
    for line in note_lines:
        out += textwrap.wrap(line, width=100, initial_indent="- ", subsequent_indent="  ")
    return "\n".join(out).rstrip() + "\n"


def aligned_table(header: list[str], rows: list[list[str]]) -> list[str]:
    cells = [[c.replace("|", "\\|") for c in r] for r in [header] + rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(r):
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(r, widths))) + " |"
    rule = "|" + "|".join(("-" * (w + 2)) if i == 0 else ("-" * (w + 1) + ":")
                          for i, w in enumerate(widths)) + "|"
    return [line(cells[0]), rule] + [line(r) for r in cells[1:]]


def to_latex(display: pd.DataFrame) -> str:
    """A booktabs ``tabular`` (needs ``\\usepackage{booktabs}``): one column block per dataset."""
    blocks = list(dict.fromkeys(d for d, _ in display.columns))
    widths = [sum(1 for d, _ in display.columns if d == b) for b in blocks]
    starts = [2 + sum(widths[:i]) for i in range(len(widths))]
    lines = [r"\begin{tabular}{l" + "r" * sum(widths) + "}", r"\toprule",
             " & ".join([""] + [rf"\multicolumn{{{w}}}{{c}}{{{tex(b)}}}"
                                for b, w in zip(blocks, widths)]) + r" \\",
             " ".join(rf"\cmidrule(lr){{{a}-{a + w - 1}}}" for a, w in zip(starts, widths)),
             " & ".join(["method"] + [tex(m) for _, m in display.columns]) + r" \\", r"\midrule"]
    for label, row in display.iterrows():
        lines.append(" & ".join([tex(str(label))] + [tex(str(v)) for v in row]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


TEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
               "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
               "^": r"\textasciicircum{}", "±": r"$\pm$", DASH: "---", "²": r"\textsuperscript{2}"}


def tex(text: str) -> str:
    return "".join(TEX_ESCAPES.get(c, c) for c in text)


# ------------------------------------------------------------------------------------ writing
def report_name(out: Path) -> str:
    """The report's file stem: the sweep folder's name, made safe for a file name."""
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in out.resolve().name)
    return name.strip("._") or "report"


def write_report(dirs: Iterable[str | os.PathLike], out: str | os.PathLike | None = None,
                 curves: bool = True, name: str | None = None,
                 first_epochs: tuple[int, ...] = ()) -> dict[str, Path]:
    """Collect the runs below ``dirs`` and write the report into ``out`` (default: the first dir)."""
    dirs = list(dirs)
    return write_outputs(collect_runs(dirs), Path(out if out is not None else dirs[0]), curves,
                         name=name, first_epochs=first_epochs)


def write_outputs(df: pd.DataFrame, out: Path, curves: bool = True, name: str | None = None,
                  first_epochs: tuple[int, ...] = ()) -> dict[str, Path]:
    """runs.csv, <name>.csv/.md/.tex and (``curves``) the figures; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out, min_age_s=STALE_TMP_AGE_S)  # of a report killed while writing
    name = name or report_name(out)
    table = table1(df)
    display = display_table(table)
    title = f"{name}: final-epoch results"
    texts = {"runs": ("runs.csv", df.drop(columns=["context"]).to_csv(index=False)),
             "table_csv": (f"{name}.csv", table.drop(columns=["context"]).to_csv(index=False)),
             "table_md": (f"{name}.md", to_markdown(display, title, notes(table))),
             "table_tex": (f"{name}.tex", to_latex(display))}
    paths = {}
    for key, (filename, text) in texts.items():
        atomic_write_text(out / filename, text)
        paths[key] = out / filename
    runs = counted_runs(df) if not df.empty else df
    if curves:
        records = {d: read_metrics(d) or {} for d in runs["run_dir"]}
        paths.update(write_curves(runs, out, lambda r: method_label(r.method, r.setting),
                                  records, first_epochs))
        paths.update(write_pareto(table, out, method_label))   # accuracy against cost
    # λ_max, trace, m-sharpness, landscapes
    paths.update(write_sharpness_outputs(runs, out, method_label, figures=curves))
    return paths


def summary_text(df: pd.DataFrame, paths: dict[str, Path]) -> str:
    """The markdown table, then one line per run that did not complete or was not counted."""
    counts = df["status"].value_counts()
    lines = [Path(paths["table_md"]).read_text(),
             f"{len(df)} runs: " + ", ".join(f"{c} {s}" for s, c in counts.items())]
    for run in failed_runs(df).itertuples():
        error = str(run.error).strip().splitlines()[-1][:200] if isinstance(run.error, str) else ""
        lines.append(f"  {run.status}: {method_label(run.method, run.setting)} on {run.dataset} "
                     f"seed {fmt(run.seed, '.0f')}: {error} [{run.run_dir}]")
    for run in df[df["duplicate_of"] != ""].itertuples():
        lines.append(f"  duplicate (not counted): {method_label(run.method, run.setting)} on "
                     f"{run.dataset} seed {fmt(run.seed, '.0f')} [{run.run_dir}], counted: "
                     f"{run.duplicate_of}")
    lines.append(f"written: {', '.join(str(p) for p in paths.values())}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sharpbench.report",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("dirs", nargs="*", help="folders to search for metrics.json "
                        "(recursively); default: the most recent folder below outputs/sweeps/")
    parser.add_argument("--out", help="where to write the report (default: the first folder)")
    parser.add_argument("--name", help="file stem of the tables (default: the folder's name)")
    parser.add_argument("--no-curves", action="store_true", help="skip the figures")
    parser.add_argument("--first-epochs", type=int, nargs="*", default=[], metavar="E",
                        help="also draw the raw batch loss over the first E epochs (e.g. 10 20)")
    args = parser.parse_args(argv)
    try:
        dirs = args.dirs or [latest_sweep()]
        if not args.dirs:
            print(f"report on the most recent sweep: {dirs[0]}")
        df = collect_runs(dirs)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if df.empty:
        print(f"error: no runs (metrics.json) below {', '.join(map(str, dirs))}", file=sys.stderr)
        return 1
    paths = write_outputs(df, Path(args.out or dirs[0]), curves=not args.no_curves,
                          name=args.name, first_epochs=tuple(args.first_epochs))
    print(summary_text(df, paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())

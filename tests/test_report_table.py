"""The results table compares like with like: the paper only beside its recipe, a seed counted
once, readable setting labels, time vs SAM under the same other settings, 120-column markdown,
files named after the sweep. Hand-made records, no training."""
import copy
import json
import math

import pandas as pd
import pytest

from sharpbench import report
from sharpbench.report import display_table, runs_frame, table1, to_markdown

RECIPE = {"label_smoothing": 0.1, "model": {"name": "resnet18"},
          "optimizer": {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "rho": 0.05},
          "dataset": {"batch_size": 128, "val_split": 0, "train_subset": None},
          "schedule": {"name": "multistep", "milestones": [50, 75], "gamma": 0.1},
          "trainer": {"max_epochs": 80}}
TINY = {"model.name": "tiny_cnn", "trainer.max_epochs": 2, "dataset.train_subset": 5000}


def config(method, seed, dataset="cifar10", **changes):
    """The paper's recipe for ``method``, with dotted-key ``changes`` (None removes a key)."""
    cfg = copy.deepcopy(RECIPE)
    cfg.update(seed=seed)
    cfg["optimizer"]["name"], cfg["dataset"]["name"] = method, dataset
    for key, value in changes.items():
        *path, leaf = key.split(".")
        node = cfg
        for part in path:
            node = node.setdefault(part, {})
        if value is None:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return cfg


def run(method, seed, acc, dataset="cifar10", wall=100.0, finished="2026-01-01T00:00:00", **changes):
    cfg = config(method, seed, dataset, **changes)
    return {"method": method, "dataset": dataset, "seed": seed, "status": "completed",
            "test_acc": acc, "test_loss": 1.0, "wall_time_s": wall, "passes_per_step": 2.0,
            "model": cfg["model"]["name"], "lr": cfg["optimizer"].get("lr"),
            "rho": cfg["optimizer"].get("rho"), "config": cfg, "finished_at": finished,
            "run_dir": f"/runs/{method}-{dataset}-{seed}-{finished}-{sorted(changes.items())}"}


def test_paper_values_only_beside_runs_of_its_recipe():
    records = [run("sam", 0, 93.0), run("sam", 1, 93.4),
               run("friendly_sam", 0, 60.0, **TINY), run("friendly_sam", 1, 61.0, **TINY),
               run("sam", 0, 40.0, dataset="cifar100", **TINY)]
    runs = runs_frame(records).set_index("method")
    assert runs.loc["friendly_sam", "paper_recipe"].str.contains("model.name=tiny_cnn").all()
    no_augment = runs_frame([run("sam", 0, 93.0, **{"dataset.augment": False})])
    assert no_augment["paper_recipe"].iloc[0] == "dataset.augment=False"
    table = table1(runs_frame(records))
    by = table.set_index(["dataset", "method"])
    # the CSV (this frame) follows the same rule as the Markdown: no paper number beside a run
    # that is not the paper's recipe (was paper_recipe=False, paper_top1=92.0)
    assert by.loc[("cifar10", "sam"), "paper_top1"] == 92.0
    assert math.isnan(by.loc[("cifar10", "friendly_sam"), "paper_top1"])
    assert math.isnan(by.loc[("cifar100", "sam"), "paper_top1"])
    shown = display_table(table)
    assert shown.loc["SAM", ("CIFAR-10", "Feldman 2025")] == "92.0"
    assert shown.loc["FriendlySAM", ("CIFAR-10", "Feldman 2025")] == "other recipe"
    # CIFAR-100 has only a tiny run: no paper column there at all (was "26.14 ± 0.00 | 71.0")
    assert not [c for c in shown.columns if c[0] == "CIFAR-100" and "Feldman" in c[1]]
    md = to_markdown(shown, "t", report.notes(table))
    assert "seed 0" not in md.lower() and "Feldman 2025" in md


def test_a_seed_run_twice_counts_once_and_is_reported():
    records = [run("sam", 0, 90.0, finished="2026-01-01T00:00:00"),
               run("sam", 0, 94.0, finished="2026-01-02T00:00:00"),  # the same run, logged again
               run("sam", 1, 92.0)]
    df = runs_frame(records)
    table = table1(df).iloc[0]
    assert table["n"] == 2 and table["duplicates"] == 1
    assert table["test_acc_mean"] == pytest.approx(93.0)  # 94 (latest of seed 0) and 92
    assert table["test_acc_std"] == pytest.approx(pd.Series([94.0, 92.0]).std())
    dup = df[df["duplicate_of"] != ""]
    assert list(dup["test_acc"]) == [90.0] and dup["duplicate_of"].iloc[0].endswith("02T00:00:00-[]")
    shown = display_table(table1(df))
    assert shown.loc["SAM", ("CIFAR-10", "n")] == "2" and shown.loc["SAM", ("CIFAR-10", "dup.")] == "1"


def test_setting_labels_are_short_and_name_only_what_varies():
    records = [run("sam", 0, 90.0, **{"optimizer.rho": rho, "optimizer.lr": lr})
               for rho in (0.05, 0.1) for lr in (0.05, 0.1)]
    records += [run("sgd", 0, 88.0, **{"schedule.name": "cosine", "schedule.gamma": None,
                                        "schedule.milestones": None, "optimizer.rho": None}),
                run("sgd", 0, 89.0, **{"optimizer.rho": None})]
    labels = set(runs_frame(records)["setting"])
    assert "rho=0.1, lr=0.05" in labels and "rho=0.05, lr=0.1" in labels
    assert "schedule=cosine" in labels and "gamma=0.1, milestones=[50, 75], schedule=multistep" in labels
    assert not [label for label in labels if "unset" in label or "optimizer." in label]
    shown = display_table(table1(runs_frame(records)))
    assert "SAM (rho=0.1, lr=0.05)" in shown.index  # the same label as the figures' legends
    assert report.method_label("sam", "rho=0.1, lr=0.05") == "SAM (rho=0.1, lr=0.05)"


def test_time_vs_sam_is_under_the_same_other_settings():
    records = [run("sam", 0, 90.0, wall=200.0, **{"model.width": 8}),
               run("sam", 0, 90.0, wall=400.0, **{"model.width": 16}),
               run("sgd", 0, 90.0, wall=100.0, **{"model.width": 8, "optimizer.rho": None}),
               run("sgd", 0, 90.0, wall=300.0, **{"model.width": 16, "optimizer.rho": None}),
               run("asam", 0, 90.0, wall=500.0, **{"model.width": 16})]
    table = table1(runs_frame(records)).set_index(["method", "setting"])
    assert table.loc[("sgd", "width=8"), "time_vs_sam_pct"] == pytest.approx(50.0)
    assert table.loc[("sgd", "width=16"), "time_vs_sam_pct"] == pytest.approx(75.0)
    assert table.loc[("asam", ""), "time_vs_sam_pct"] == pytest.approx(125.0)
    assert table.loc[("asam", ""), "time_vs_sam_of"] == "SAM (width=16)"
    rho_sweep = [run("sam", 0, 90.0, wall=100.0 * (1 + i), **{"optimizer.rho": r})
                 for i, r in enumerate((0.05, 0.1))] + [run("asam", 0, 90.0, wall=300.0, **{"optimizer.rho": 0.1})]
    table = table1(runs_frame(rho_sweep)).set_index("method")
    assert table.loc["asam", "time_vs_sam_pct"] == pytest.approx(150.0)  # SAM at rho 0.1


def test_a_table_without_sam_has_no_time_vs_sam_column():
    records = [run("sgd", 0, 90.0, **{"optimizer.rho": None}), run("asam", 0, 91.0)]
    table = table1(runs_frame(records))
    assert table["time_vs_sam_pct"].isna().all()
    assert not [c for c in display_table(table).columns if "SAM" in c[1]]
    assert not [line for line in report.notes(table) if line.startswith("vs SAM")]


def test_markdown_fits_a_120_column_terminal():
    from sharpbench.optim import registry
    methods = [m for m, info in registry.methods().items() if info.bench]
    records = [run(m, s, 90.0 + s, dataset=d, wall=100.0 + s, **{"optimizer.rho": rho})
               for m in methods for d in ("cifar10", "cifar100") for s in (0, 1)
               for rho in (0.05, 0.1)]
    records = [dict(r, cost_per_step=2.0) for r in records]  # every real run records its cost
    records.append(dict(run("sam", 2, 0.0), status="failed", test_acc=None))
    table = table1(runs_frame(records))
    md = to_markdown(display_table(table), "table1_full: final-epoch results", report.notes(table))
    assert md.count("## CIFAR-10\n") == 1 and md.count("## CIFAR-100\n") == 1  # one table per dataset
    too_wide = [line for line in md.splitlines() if len(line) > 120]
    assert not too_wide, too_wide


def test_report_is_named_after_the_sweep_and_found_without_arguments(tmp_path, monkeypatch, capsys):
    sweep = tmp_path / "outputs" / "sweeps" / "table1_smoke"
    for i, rec in enumerate([run("sam", 0, 90.0), run("sgd", 0, 89.0, **{"optimizer.rho": None})]):
        (sweep / f"job{i}").mkdir(parents=True)
        (sweep / f"job{i}" / "metrics.json").write_text(json.dumps(dict(rec, run_dir=None)))
    (tmp_path / "outputs" / "sweeps" / "older").mkdir()
    import os
    os.utime(tmp_path / "outputs" / "sweeps" / "older", (1, 1))
    monkeypatch.chdir(tmp_path)
    assert report.main(["--no-curves"]) == 0  # `make report` after `make table1-smoke`
    assert (sweep / "table1_smoke.md").exists() and (sweep / "table1_smoke.tex").exists()
    assert (sweep / "table1_smoke.csv").exists() and (sweep / "runs.csv").exists()
    assert "most recent sweep" in capsys.readouterr().out
    mask = os.umask(0)
    os.umask(mask)
    for written in ("table1_smoke.md", "runs.csv"):  # as open() would create them (was 0600)
        assert (sweep / written).stat().st_mode & 0o777 == 0o666 & ~mask
    monkeypatch.chdir(tmp_path / "outputs")
    assert report.main([]) == 2  # no outputs/sweeps here: a clear error, not a traceback
    assert "make table1-smoke" in capsys.readouterr().err


def test_extra_metric_columns_can_be_registered(monkeypatch):
    monkeypatch.setattr(report, "EXTRA_METRICS", [])
    report.register_metric("lambda_max", "λ_max", ".1f")
    records = [dict(run("sam", s, 90.0), lambda_max=10.0 + s) for s in (0, 1)]
    table = table1(runs_frame(records))
    assert table["lambda_max_mean"].iloc[0] == pytest.approx(10.5)
    assert display_table(table).loc["SAM", ("CIFAR-10", "λ_max")] == "10.5"
    assert not math.isnan(table["lambda_max_mean"].iloc[0])


def test_cost_per_step_column_prices_hessian_products():
    records = [dict(run("sam", s, 90.0), cost_per_step=2.0) for s in (0, 1)]
    records += [dict(run("a2sam", s, 90.0), passes_per_step=1.03, cost_per_step=c)
                for s, c in ((0, 1.40), (1, 1.46))]
    shown = display_table(table1(runs_frame(records)))
    assert shown.loc["SAM", ("CIFAR-10", "cost")] == "2.00"
    assert shown.loc["A²SAM", ("CIFAR-10", "cost")] == "1.43"
    assert ("CIFAR-10", "passes") not in shown.columns  # cost replaces passes when recorded
    old = display_table(table1(runs_frame([run("sam", 0, 90.0)])))  # records without a cost
    assert old.loc["SAM", ("CIFAR-10", "passes")] == "2.00"


def test_time_spread_over_seeds_and_overloaded_rows_are_shown():
    """A time measured on an overloaded machine is marked, in its row and in the vs SAM cell
    of rows timed against it; the spread over seeds stands beside the mean."""
    records = [dict(run("sam", 0, 90.0, wall=20.0), overloaded=False),
               dict(run("sam", 1, 90.0, wall=30.0), overloaded=True),
               dict(run("sgd", 0, 90.0, wall=10.0, **{"optimizer.rho": None}), overloaded=False),
               run("asam", 0, 90.0, wall=50.0)]  # an older record: load not measured
    table = table1(runs_frame(records))
    display = display_table(table)
    cells = display["CIFAR-10"]
    assert cells.loc["SAM", "time (s)"] == "25.0 ± 7.1*"
    assert cells.loc["SGD", "time (s)"] == "10.0"
    assert cells.loc["SGD", "vs SAM (%)"] == "40*"  # timed against the overloaded SAM row
    assert cells.loc["ASAM", "time (s)"] == "50.0"
    notes = report.notes(table)
    assert any(line.startswith("*: at least one run") for line in notes)
    quiet = table1(runs_frame([dict(r, overloaded=False) for r in records]))
    assert not any(line.startswith("*:") for line in report.notes(quiet))
    assert "*" not in "".join(display_table(quiet)["CIFAR-10"]["time (s)"])

"""The report's figures: drawn from what a run logged (never a KeyError), against epochs,
training time and passes, legends off the axes, smoothing named only when applied, PNG + PDF."""
import json

import numpy as np
import pandas as pd
import pytest

from sharpbench import curves, report


def write_run(run_dir, method, seed, steps_per_epoch=8, epochs=2, passes=2, every=1,
              timed=True, step_rows=True):
    """A run folder as train.py leaves it: metrics.json and csv/metrics.csv."""
    rows = []
    for step in range(0, steps_per_epoch * epochs, every) if step_rows else []:
        row = {"epoch": step // steps_per_epoch, "step": step,
               "train/loss_step": 2.3 * np.exp(-step / 20) + 0.01 * seed}
        if timed:
            row.update({"train/time_s": 0.5 * (step + 1) * passes, "train/passes": passes * (step + 1)})
        rows.append(row)
    for epoch in range(epochs):
        rows.append({"epoch": epoch, "step": (epoch + 1) * steps_per_epoch - 1,
                     "train/loss_epoch": 1.0, "test/acc": 40.0 + 10 * epoch + seed, "test/loss": 1.5})
    rows.append({"epoch": epochs, "step": epochs * steps_per_epoch, "test/acc": 40.0 + 10 * (epochs - 1) + seed})
    (run_dir / "csv").mkdir(parents=True)
    pd.DataFrame(rows).to_csv(run_dir / "csv" / "metrics.csv", index=False)
    record = {"method": method, "dataset": "synthetic", "model": "tiny_cnn", "seed": seed,
              "status": "completed", "epochs": epochs, "epochs_completed": epochs,
              "steps": steps_per_epoch * epochs, "steps_per_epoch": steps_per_epoch,
              "epoch_times_s": [4.0 * passes] * epochs, "passes_per_step": float(passes),
              "test_acc": 50.0 + seed, "test_loss": 1.5, "wall_time_s": 8.0 * passes,
              "config": {"seed": seed, "optimizer": {"name": method}}}
    (run_dir / "metrics.json").write_text(json.dumps(record))


@pytest.fixture
def figures(monkeypatch):
    """Capture each figure the report saves (and still write it)."""
    saved = {}
    real_save = curves.save

    def save(fig, stem):
        saved[stem.name] = fig
        return real_save(fig, stem)
    monkeypatch.setattr(curves, "save", save)
    return saved


def test_a_run_without_step_rows_draws_what_exists(tmp_path, figures):
    """A completed run shorter than log_every_n_steps logged no `train/loss_step` (was KeyError)."""
    write_run(tmp_path / "a", "sam", 0, step_rows=False)
    paths = report.write_report([tmp_path])
    assert "curves_test_acc_synthetic_png" in paths and "curves_train_loss_synthetic" not in figures
    steps, epochs = curves.run_curves(tmp_path / "a")
    assert steps.empty and list(epochs["epoch"]) == [1, 2]


def test_loss_against_epochs_time_and_passes_with_legend_off_the_axes(tmp_path, figures):
    for method, passes in (("sgd", 1), ("sam", 2)):
        for seed in (0, 1):
            write_run(tmp_path / f"{method}{seed}", method, seed, passes=passes)
    paths = report.write_report([tmp_path])
    fig = figures["curves_train_loss_synthetic"]
    axes = fig.axes
    assert [ax.get_xlabel() for ax in axes] == ["epoch", "training time (s)", "forward/backward passes"]
    assert "moving average" not in axes[0].get_ylabel()  # 16 points: not smoothed
    assert all(ax.get_legend() is None for ax in axes) and fig.legends  # legend outside the axes
    assert fig.legends[0].get_texts()[0].get_text() == "SGD (n=2)"
    title = fig.get_suptitle()
    assert "tiny CNN" in title and "2 epochs" in title and "2 seeds" in title
    sam_line = [line for line in axes[2].get_lines() if line.get_label() == "SAM (n=2)"][0]
    assert sam_line.get_xdata()[-1] == pytest.approx(32)  # 16 steps × 2 passes: equal-cost axis
    assert sam_line.get_marker() != "None"  # few points: marked
    ticks = [t for t in axes[0].get_xticks() if axes[0].get_xlim()[0] <= t <= axes[0].get_xlim()[1]]
    assert all(float(t).is_integer() for t in ticks)
    acc = figures["curves_test_acc_synthetic"]
    assert [ax.get_xlabel() for ax in acc.axes] == ["epoch", "training time (s)"]
    assert paths["curves_train_loss_synthetic_pdf"].read_bytes()[:5] == b"%PDF-"
    assert paths["curves_train_loss_synthetic_png"].read_bytes()[:4] == b"\x89PNG"


def test_smoothing_is_named_only_when_applied(tmp_path, figures):
    write_run(tmp_path / "long", "sam", 0, steps_per_epoch=200)  # 400 points: smoothed
    report.write_report([tmp_path], first_epochs=(1,))
    assert "centred moving average, 8 points" in figures["curves_train_loss_synthetic"].axes[0].get_ylabel()
    early = figures["curves_batch_loss_first1_synthetic"].axes[0]  # Fig. 9-style: raw, 1 epoch
    assert "not smoothed" in early.get_ylabel()
    assert max(early.get_lines()[0].get_xdata()) == 200


def test_old_logs_get_time_and_passes_from_metrics_json(tmp_path):
    write_run(tmp_path / "old", "sam", 0, timed=False)
    record = json.loads((tmp_path / "old" / "metrics.json").read_text())
    steps, _ = curves.run_curves(tmp_path / "old", record)
    assert steps["passes"].iloc[-1] == 32 and steps["time_s"].iloc[-1] == pytest.approx(16.0)
    assert steps["time_s"].iloc[7] == pytest.approx(8.0)  # end of epoch 1 = its epoch time


def test_a_run_that_logs_only_the_loss_at_w_plus_e_is_drawn_and_says_so(tmp_path, figures):
    """MSAM's steps (and A²SAM's one-pass steps) log their loss as train/loss_perturbed_step."""
    write_run(tmp_path / "sgd", "sgd", 0, passes=1)
    write_run(tmp_path / "msam", "msam", 0, passes=1)
    log = pd.read_csv(tmp_path / "msam" / "csv" / "metrics.csv")
    log["train/loss_perturbed_step"] = log.pop("train/loss_step")
    log.to_csv(tmp_path / "msam" / "csv" / "metrics.csv", index=False)
    report.write_report([tmp_path], first_epochs=(1,))
    for name in ("curves_train_loss_synthetic", "curves_batch_loss_first1_synthetic"):
        labels = [t.get_text() for t in figures[name].legends[0].get_texts()]
        assert "MSAM (n=1, loss at w + e)" in labels and "SGD (n=1)" in labels, labels

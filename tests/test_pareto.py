"""The report's accuracy-against-cost figure: the Pareto front, error bars over seeds, both panels."""
import json
import math

import pytest

from sharpbench import pareto, report
from test_report_curves import write_run


def test_pareto_front_keeps_the_points_nothing_beats():
    costs = [1.0, 2.0, 2.0, 3.0, 1.2, math.nan]
    accs = [90.0, 92.0, 91.0, 91.5, 89.0, 99.0]
    assert pareto.pareto_front(costs, accs) == [0, 1]          # (2, 91), (3, 91.5), (1.2, 89) beaten
    assert pareto.pareto_front([1.0, 1.0], [90.0, 90.0]) == [0]   # a tie: one of them
    assert pareto.pareto_front([2.0, 1.0, 3.0], [80.0, 70.0, 90.0]) == [1, 0, 2]


@pytest.fixture
def saved(monkeypatch):
    figs = {}
    real = pareto.save

    def save(fig, stem):
        figs[stem.name] = fig
        return real(fig, stem)
    monkeypatch.setattr(pareto, "save", save)
    return figs


SWEEP = {  # method: (cost per step, test accuracy of seed 0, training time)
    "sgd": (1.0, 90.0, 10.0), "sam": (2.0, 92.0, 20.0), "looksam": (1.2, 91.0, 12.5),
    "msam": (1.0, 89.0, 10.5), "a2sam": (1.3, 90.5, 14.0)}


def test_a_synthetic_sweep_gets_the_figure_with_the_front_and_error_bars(tmp_path, saved):
    for method, (cost, acc, time_s) in SWEEP.items():
        for seed in range(3):
            run = tmp_path / f"{method}_{seed}"
            write_run(run, method, seed)
            record = json.loads((run / "metrics.json").read_text())
            record.update(cost_per_step=cost, test_acc=acc + 0.5 * seed, wall_time_s=time_s + seed)
            (run / "metrics.json").write_text(json.dumps(record))
    paths = report.write_report([tmp_path])
    assert paths["accuracy_vs_cost_synthetic_png"].exists()
    assert paths["accuracy_vs_cost_synthetic_pdf"].exists()
    fig = saved["accuracy_vs_cost_synthetic"]
    cost_ax, time_ax = fig.axes[:2]
    front = [line for line in cost_ax.get_lines() if line.get_label() == "Pareto front"]
    assert len(front) == 1
    # means over seeds: sgd 90.5 @1.0, looksam 91.5 @1.2, sam 92.5 @2.0 (msam 89.5 @1.0 and
    # a2sam 91.0 @1.3 are beaten)
    assert list(front[0].get_xdata()) == [1.0, 1.2, 2.0]
    assert list(front[0].get_ydata()) == pytest.approx([90.5, 91.5, 92.5])
    bold = {t.get_text() for t in cost_ax.texts if t.get_fontweight() == "bold"}
    assert bold == {"SGD", "LookSAM", "SAM"}
    assert "std over seeds" in cost_ax.get_ylabel() and "training time" in time_ax.get_xlabel()
    # error bars: one std over the three seeds (0.5)
    caps = [c for c in cost_ax.collections if c.get_segments()]
    spans = sorted({round(abs(s[1][1] - s[0][1]) / 2, 6) for c in caps for s in c.get_segments()})
    assert spans == [0.5]


def test_no_figure_for_a_single_point(tmp_path, saved):
    write_run(tmp_path / "a", "sam", 0)
    paths = report.write_report([tmp_path])
    assert not any(k.startswith("accuracy_vs_cost") for k in paths)

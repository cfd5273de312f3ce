"""What a reader of the report's figures needs: titles inside the figure, tick labels that do not
run into each other, a legend where colours mean something, the run a figure shows named in it,
and one colour per method in every figure (curves, landscapes, λ_max history, density, line)."""
import json

import numpy as np
import pytest
from matplotlib.colors import to_hex

from sharpbench import curves, report
from sharpbench.colors import EXTRA_COLORS, METHOD_COLORS, method_color
from sharpbench.sharpness import plots
from sharpbench.sharpness.landscape import Line, Surface, save_surface

from test_report_curves import write_run


@pytest.fixture
def saved(monkeypatch):
    """Every figure the sharpness plots and the curves save (still written), by file name."""
    figs = {}
    real_png, real_save = plots.save_png, curves.save

    def save_png(fig, path, *a, **k):
        figs[str(path).rsplit("/", 1)[-1]] = fig
        return real_png(fig, path, *a, **k)

    def save(fig, stem):
        figs[stem.name] = fig
        return real_save(fig, stem)
    monkeypatch.setattr(plots, "save_png", save_png)
    monkeypatch.setattr(curves, "save", save)
    return figs


def surface(seed=0, n=21, span=1.0):
    rng = np.random.default_rng(seed)
    a = np.linspace(-span, span, n)
    A, B = np.meshgrid(a, a)
    loss = 0.5 + 3 * A ** 2 + 1.5 * B ** 2 + 0.05 * rng.random((n, n))
    return Surface(a, a.copy(), loss, 100 - 10 * loss)


def inside(fig, artist) -> bool:
    renderer = fig.canvas.get_renderer()
    box = artist.get_window_extent(renderer)
    return box.x0 >= -0.5 and box.y0 >= -0.5 and box.x1 <= fig.bbox.width + 0.5 and box.y1 <= fig.bbox.height + 0.5


def drawn_boxes(fig, texts, monkeypatch) -> dict:
    """Window extents of ``texts`` as drawn into the PNG (``save_png``'s 110 dpi), and the
    canvas size under key "canvas": a 3-D axis places its tick labels inside its own draw, and
    their extents asked for afterwards are not where they were drawn."""
    import io
    from matplotlib.text import Text
    wanted, boxes = set(map(id, texts)), {}
    real_draw = Text.draw

    def draw(self, renderer):
        real_draw(self, renderer)
        boxes["canvas"] = renderer.get_canvas_width_height()
        if id(self) in wanted and self.get_visible() and self.get_text():
            boxes[id(self)] = (self.get_text(), self.get_window_extent(renderer))
    monkeypatch.setattr(Text, "draw", draw)
    fig.savefig(io.BytesIO(), format="png", dpi=110)
    monkeypatch.setattr(Text, "draw", real_draw)
    return boxes


def overlapping(boxes) -> list[tuple[str, str]]:
    items = list(boxes)
    return [(a, b) for i, (a, ba) in enumerate(items) for b, bb in items[i + 1:] if ba.overlaps(bb)]


def test_method_colours_are_one_per_method_and_stable():
    assert method_color("friendly_sam") == method_color("FriendlySAM") == METHOD_COLORS["friendly_sam"]
    assert method_color("ssam_f") == method_color("SSAM-F") and method_color("a2sam") == method_color("A²SAM")
    assert len(set(METHOD_COLORS.values())) == len(METHOD_COLORS)
    one, two = method_color("my_new_sam"), method_color("another_method")
    assert one in EXTRA_COLORS and two in EXTRA_COLORS and one != two
    assert method_color("My-New-SAM") == one  # the same method, the same colour, asked again


def test_landscapes_title_fits_and_panel_titles_in_method_colours(tmp_path, saved):
    """One panel, a long suptitle: it was wider than the figure and clipped at both edges."""
    long = "loss surfaces (filter-normalised directions, same seed), one colour scale"
    plots.plot_surfaces([("SAM · synthetic · seed 0", surface())], tmp_path / "landscapes.png",
                        "contour", long, methods=["sam"])
    fig = saved["landscapes.png"]
    fig.canvas.draw()
    assert inside(fig, fig._suptitle)
    ax = fig.axes[0]
    assert inside(fig, ax.title) and to_hex(ax.title.get_color()) == method_color("sam")


def test_3d_landscape_tick_labels_do_not_overlap(tmp_path, saved, monkeypatch):
    """α and β ran "−1.00−0.75−0.50…" into one unreadable string; the panel titles were cut."""
    methods = ["friendly_sam", "sam", "sam", "sgd"]
    items = [(f"{m} seed {i}", surface(i)) for i, m in enumerate(methods)]
    plots.plot_surfaces(items, tmp_path / "landscapes_3d.png", "3d", methods=methods)
    fig = saved["landscapes_3d.png"]
    axes_labels = [(ax, axis.get_ticklabels()) for ax in fig.axes for axis in (ax.xaxis, ax.yaxis)]
    titles = [ax.title for ax in fig.axes]
    boxes = drawn_boxes(fig, [t for _, labels in axes_labels for t in labels] + titles, monkeypatch)
    for ax, labels in axes_labels:
        drawn = [boxes[id(t)] for t in labels if id(t) in boxes]
        assert len(drawn) >= 2
        assert not overlapping(drawn), overlapping(drawn)
    width, height = boxes["canvas"]
    for title in titles:
        box = boxes[id(title)][1]
        assert box.y1 <= height and box.x0 >= 0 and box.x1 <= width, (title.get_text(), box, height)


def test_lambda_max_history_method_colours_and_mathtext(tmp_path, saved):
    series = [("sam seed 0", [1, 2, 3], [5.0, 6.0, 7.0]), ("sam seed 1", [1, 2, 3], [5.5, 6.5, 7.5]),
              ("sgd seed 0", [1, 2, 3], [9.0, 10.0, 11.0])]
    plots.plot_lambda_history(series, tmp_path / "lambda_max.png", methods=["sam", "sam", "sgd"])
    ax = saved["lambda_max.png"].axes[0]
    colors = [to_hex(line.get_color()) for line in ax.lines]
    assert colors == [method_color("sam"), method_color("sam"), method_color("sgd")]
    assert ax.lines[0].get_linestyle() != ax.lines[1].get_linestyle()  # the seeds told apart
    assert ax.get_ylabel() == r"$\lambda_{\max}$"


def test_density_names_its_run_and_line_uses_the_method_colour(tmp_path, saved):
    grid = np.linspace(-1, 10, 200)
    plots.plot_density(grid, np.exp(-grid ** 2) + 1e-6, tmp_path / "density.png",
                       title="Hessian eigenvalue density of sam seed 0 (tiny_cnn, synthetic)", method="sam")
    ax = saved["density.png"].axes[0]
    assert "sam seed 0" in ax.get_title() and to_hex(ax.lines[0].get_color()) == method_color("sam")
    line = Line(np.linspace(-0.5, 1.5, 5), np.linspace(2, 1, 5), np.linspace(10, 50, 5))
    plots.plot_lines([("SAM seed 0", line)], tmp_path / "line.png", methods=["sam"])
    assert to_hex(saved["line.png"].axes[0].lines[0].get_color()) == method_color("sam")


def test_a_method_has_one_colour_in_every_figure_of_a_report(tmp_path, saved):
    """The curves (two SAM settings: one colour, two line styles) and the landscapes panel."""
    for method, seed, rho in (("sgd", 0, None), ("sam", 0, 0.05), ("sam", 0, 0.1), ("friendly_sam", 0, 0.05)):
        run = tmp_path / f"{method}_{rho}_{seed}"
        write_run(run, method, seed)
        record = json.loads((run / "metrics.json").read_text())
        if rho is not None:
            record["config"]["optimizer"]["rho"] = rho
        (run / "metrics.json").write_text(json.dumps(record))
        (run / "sharpness.json").write_text(json.dumps({"eigen": {"lambda_max": 3.0}}))
        save_surface(run / "sharpness" / "landscape.npz", surface(seed))
    paths = report.write_report([tmp_path])
    assert "landscapes" in paths
    expected = {"SGD": "sgd", "SAM": "sam", "FriendlySAM": "friendly_sam"}

    def method_of(label):
        return expected[label.split(" ")[0]]
    for name in ("curves_train_loss_synthetic", "curves_test_acc_synthetic"):
        fig = saved[name]
        styles = {}
        for line in fig.axes[0].lines:
            if line.get_label().startswith("_"):
                continue
            assert to_hex(line.get_color()) == method_color(method_of(line.get_label())), line.get_label()
            styles.setdefault(method_of(line.get_label()), []).append(line.get_linestyle())
        assert len(styles["sam"]) == 2 and len(set(styles["sam"])) == 2
    panels = saved["landscapes.png"].axes[:-1]  # the last axes is the colour bar
    assert len(panels) == 4
    for ax in panels:
        assert to_hex(ax.title.get_color()) == method_color(method_of(ax.get_title())), ax.get_title()

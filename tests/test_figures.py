"""Each toy figure runs with the project's optimizers and writes its file."""
import numpy as np
import pytest
from PIL import Image, ImageSequence

from sharpbench import figures


def test_x6_gif_and_png_show_gd_and_sam_parting_ways(tmp_path):
    import inspect
    assert inspect.signature(figures.fig_sam_x6).parameters["frames"].default == 30
    path = figures.fig_sam_x6(tmp_path, frames=6)
    frames = list(ImageSequence.Iterator(Image.open(path)))
    assert path.name == "sam_x6.gif" and len(frames) == 6
    assert (tmp_path / "sam_x6.png").stat().st_size > 10_000  # the static figure, both paths
    paths = figures.x6_paths(steps=29)  # the defaults: x0 = -1, lr = 0.002, rho = 0.4
    gd, sam = paths["gradient descent"], paths["SAM"]
    assert abs(gd[-1] - figures.X6_SHARP) < 1e-3 and np.all(np.abs(gd[10:] - figures.X6_SHARP) < 0.01)
    # SAM never settles there: it keeps moving across the last frames (was static from frame 15),
    # and stays in the sharp minimum's basin (the README's caption says both)
    tail = sam[15:]
    assert np.ptp(tail) > 0.5 and np.all(np.abs(np.diff(tail)) > 0.1) and np.all(sam < figures.X6_MAX)
    assert np.abs(sam[-1] - gd[-1]) > 0.1


def test_x6_gif_frames_move_until_the_end(tmp_path):
    im = Image.open(figures.fig_sam_x6(tmp_path, frames=30))
    pixels = []
    for i in (24, 26, 28, 29):
        im.seek(i)
        pixels.append(np.asarray(im.convert("RGB"), dtype=int))
    assert all(np.abs(a - b).sum() > 0 for a, b in zip(pixels, pixels[1:]))


def test_x6_sweep_step_is_the_sam_class(tmp_path):
    """The vectorised sweep behind the caption takes the same steps as sharpbench's SAM."""
    for start, lr, rho in ((-1.0, 0.002, 0.4), (2.5, 0.003, 0.1), (0.3, 0.001, 0.8)):
        path = figures.trajectory(figures.sam(rho=rho, lr=lr), figures.x6, start, 60)
        x, mine = np.array([start]), [start]
        for _ in range(60):
            x = figures.x6_step(x, lr, rho)
            mine.append(x[0])
        assert np.allclose(path, mine, rtol=0, atol=1e-9), (start, lr, rho)
    gd = figures.trajectory(figures.sgd(lr=0.002), figures.x6, -1.0, 30)
    x = np.array([-1.0])
    for _ in range(30):
        x = figures.x6_step(x, 0.002, 0.0)
    assert x[0] == pytest.approx(gd[-1], abs=1e-9)
    r = figures.x6_sweep([-1.0, 2.5], [0.002], [0.05, 0.4], steps=300)
    assert list(r["gd"]) == ["sharp", "sharp", "wide", "wide"]
    assert list(r["sam"][:2]) == ["sharp", "bouncing"]


def test_beale_sam_stalls_near_the_saddle_while_gd_converges(tmp_path):
    assert figures.fig_beale(tmp_path, steps=300).stat().st_size > 10_000
    gd = figures.trajectory(figures.sgd(lr=0.01), figures.beale, (0.5, 1.4), 800)[-1]
    sam = figures.trajectory(figures.sam(rho=0.3, lr=0.01), figures.beale, (0.5, 1.4), 800)[-1]
    assert np.allclose(gd, (3, 0.5), atol=0.05)
    assert np.linalg.norm(sam - np.array([0.0, 1.0])) < 0.1


def test_sam_vs_asam(tmp_path):
    assert figures.fig_sam_vs_asam(tmp_path, steps=300).stat().st_size > 10_000


def test_linear_regression(tmp_path):
    assert figures.fig_linear_regression(tmp_path, epochs=2).stat().st_size > 10_000
    x, y = figures.regression_data(n=128)
    hist = figures.train_regression("SSAM-F", x, y, epochs=3, batch=32, lr=0.005, rho=0.05)
    assert len(hist["mse"]) == 4 and hist["mse"][-1] < hist["mse"][0] and hist["r2"][-1] > 0.5


def test_cli_rejects_unknown_names(tmp_path, capsys):
    assert figures.main(["nope", "--out", str(tmp_path)]) == 2
    assert "unknown figure nope" in capsys.readouterr().err


def test_linear_regression_colours_are_the_methods_and_the_bars_have_a_legend():
    """Each method in its own colour in all three panels; the bar panel says which bar is which
    (it had no legend, and its red/green bars looked like SSAM-F's and FriendlySAM's lines)."""
    from matplotlib.colors import to_hex
    from sharpbench.colors import method_color
    hist = {n: {"mse": [1.0, 0.5, 0.3], "r2": [0.5, 0.9, 0.98]} for n in ("SGD", "SAM", "SSAM-F", "FriendlySAM")}
    fig = figures.linear_regression_figure(hist, epochs=2, batch=32, lr=0.005, rho=0.05)
    ax_m, ax_r, ax_b, ax_b2 = fig.axes
    for ax in (ax_m, ax_r):
        assert {line.get_label(): to_hex(line.get_color()) for line in ax.lines} == \
            {n: method_color(n) for n in hist}
    assert [to_hex(p.get_facecolor()) for p in ax_b.patches] == [method_color(n) for n in hist]
    assert [to_hex(p.get_edgecolor()) for p in ax_b2.patches] == [method_color(n) for n in hist]
    legend = ax_b2.get_legend() or ax_b.get_legend()
    assert legend is not None
    assert [t.get_text() for t in legend.get_texts()] == ["final MSE (left axis)", "final R² (right axis)"]

"""Each toy figure runs with the project's optimizers and writes its file."""
import numpy as np
import pytest
from PIL import Image, ImageSequence

from sharpbench import figures


def test_x6_gif_frames_and_sam_descends(tmp_path):
    import inspect
    assert inspect.signature(figures.fig_sam_x6).parameters["frames"].default == 30
    path = figures.fig_sam_x6(tmp_path, frames=6)
    frames = list(ImageSequence.Iterator(Image.open(path)))
    assert path.name == "sam_x6.gif" and len(frames) == 6
    xs = figures.trajectory(figures.sam(rho=0.1, lr=2e-3), figures.x6, 2.5, 29)
    assert figures.x6(xs[-1]) < figures.x6(xs[0])
    assert abs(xs[-1] - 1.40) < 0.05  # the flatter local minimum of f


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

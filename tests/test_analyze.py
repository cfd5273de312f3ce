"""analyze on a real smoke run (and a sweep of two), the λ_max monitor, the report section."""
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from sharpbench import analyze as an
from sharpbench.report import write_report
from sharpbench.train import identity, train

CONF = str(Path(__file__).resolve().parents[1] / "sharpbench" / "conf")
TINY = ["subset.size=64", "subset.batch_size=32", "eigen.num_iters=4", "trace.n_samples=2",
        "density.num_iters=4", "density.num_runs=1", "sharpness.steps=1", "sharpness.m=32",
        "sharpness.n_samples=2", "landscape.grid=3", "line.points=3", "progress=false"]


def analyze_cfg(run_dir, *overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="analyze", overrides=[f"run_dir={run_dir}", *TINY, *overrides])


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One tiny SAM run with the λ_max monitor on; the model's state when the module was built."""
    import sharpbench.train as train_mod
    run_dir = tmp_path_factory.mktemp("run")
    captured = {}
    real = train_mod.SharpnessModule

    def capture(model, *args, **kwargs):
        captured["init"] = {k: v.clone() for k, v in model.state_dict().items()}
        return real(model, *args, **kwargs)
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            "experiment=smoke", "optimizer=sam", "trainer.enable_progress_bar=false", "trainer.max_epochs=2",
            "dataset.train_subset=128", "dataset.test_subset=64", "dataset.batch_size=32",
            "monitor.lambda_max_every_n_epochs=1", "monitor.lambda_max_subset=32", "monitor.lambda_max_iters=3"])
    train_mod.SharpnessModule = capture
    try:
        record = train(cfg, run_dir)
    finally:
        train_mod.SharpnessModule = real
    assert record["status"] == "completed"
    return run_dir, captured["init"], cfg


def test_analyze_writes_results_and_figures(smoke_run, monkeypatch):
    run_dir, _, _ = smoke_run
    ckpt = (run_dir / "checkpoints" / "last.ckpt").read_bytes()
    drawn = {}
    real_density = an.plots.plot_density

    def plot_density(*args, **kwargs):
        drawn.update(kwargs)
        return real_density(*args, **kwargs)
    monkeypatch.setattr(an.plots, "plot_density", plot_density)
    an.analyze(analyze_cfg(run_dir, "what=[eigen,trace,density,sharpness,landscape,line]"))
    # the density says which run it shows, in its method's colour (it named neither)
    assert "sam seed 0 (tiny_cnn" in drawn["title"] and drawn["method"] == "sam"
    result = json.loads((run_dir / "sharpness.json").read_text())
    assert len(result["eigen"]["eigenvalues"]) == 3 and result["eigen"]["lambda_max"] == result["eigen"]["eigenvalues"][0]
    assert 0 <= result["eigen"]["grad_eigvec_angle_deg"] <= 90
    assert math.isfinite(result["trace"]["trace"]) and result["trace"]["trace_stderr"] >= 0
    assert set(result["sharpness"]) >= {"worst_l2", "worst_adaptive_l2", "worst_adaptive_linf", "average_adaptive"}
    assert result["sharpness"]["worst_l2"]["value"] >= 0 and result["sharpness"]["worst_l2"]["m"] == 32
    assert result["conventions"]["subset_size"] == 64 and result["conventions"]["mode"] == "eval"
    for name in ("density.png", "landscape.npz", "landscape_contour.png", "landscape_3d.png", "line.npz", "line.png"):
        assert (run_dir / "sharpness" / name).stat().st_size > 1000, name
    surface = an.load_surface(run_dir / "sharpness" / "landscape.npz")
    assert surface.loss.shape == (3, 3) and surface.loss[1, 1] == pytest.approx(result["landscape"]["center_loss"])
    assert (run_dir / "checkpoints" / "last.ckpt").read_bytes() == ckpt
    # a later partial analysis keeps the earlier results
    an.analyze(analyze_cfg(run_dir, "what=[trace]", "trace.n_samples=3"))
    again = json.loads((run_dir / "sharpness.json").read_text())
    assert again["trace"]["n_samples"] == 3 and again["eigen"] == result["eigen"]


def test_line_starts_at_the_runs_initialisation(smoke_run):
    run_dir, init, _ = smoke_run
    cfg = an.run_config(run_dir)
    rebuilt = an.initial_state(cfg, num_classes=10)
    assert rebuilt.keys() == init.keys()
    for k in init:
        assert torch.equal(rebuilt[k], init[k]), k


def test_lambda_max_monitor_records_every_epoch_and_not_the_hash(smoke_run, compose_cfg):
    run_dir, _, cfg = smoke_run
    history = json.loads((run_dir / "lambda_max.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(math.isfinite(h["lambda_max"]) for h in history)
    assert "monitor" not in identity(cfg)
    assert "train/lambda_max" in (run_dir / "csv" / "metrics.csv").read_text().splitlines()[0]


def test_sweep_dir_comparison_and_report(smoke_run, tmp_path):
    run_dir, _, _ = smoke_run
    sweep = tmp_path / "sweep"
    for method, seed in (("sgd", 0), ("sam", 0), ("sam", 1)):
        dst = sweep / f"optimizer={method},seed={seed}"
        shutil.copytree(run_dir, dst, ignore=shutil.ignore_patterns("sharpness*"))
        record = json.loads((dst / "metrics.json").read_text())
        record.update(method=method, seed=seed)
        record["config"]["optimizer"]["name"] = method
        record["config"]["seed"] = seed
        (dst / "metrics.json").write_text(json.dumps(record))
    runs = an.analyze(analyze_cfg(sweep, "what=[eigen,sharpness,landscape]", "eigen.angle=false"))
    assert len(runs) == 3
    for name in ("landscapes_contour.png", "landscapes_3d.png", "lambda_max.png"):
        assert (sweep / "sharpness" / name).stat().st_size > 1000
    paths = write_report([sweep])
    table = (sweep / "sharpness.md").read_text()
    assert "λ_max" in table and "m-sharpness worst_l2" in table
    sam_row = next(line for line in table.splitlines() if "| SAM |" in line)
    assert " ± —" not in sam_row.split("|")[4]  # two seeds: a std
    assert paths["landscapes"].stat().st_size > 1000


def test_argv_and_bad_input(tmp_path):
    assert an.hydra_argv(["runs/x", "what=eigen,trace", "eigen.k=2"]) == ["run_dir='runs/x'", "what=[eigen,trace]", "eigen.k=2"]
    job = tmp_path / "optimizer=sam,seed=0"  # a sweep job folder
    job.mkdir()
    argv = an.hydra_argv([str(job), "what=eigen"])
    assert argv[0] == f"run_dir='{job}'"
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        assert compose(config_name="analyze", overrides=argv).run_dir == str(job)
    with pytest.raises(an.AnalyzeError, match="choose from"):
        an.parse_what("eigen,hessian")
    with pytest.raises(an.AnalyzeError, match="no such folder"):
        an.analyze(analyze_cfg(tmp_path / "missing"))
    with pytest.raises(an.AnalyzeError, match="no completed run"):
        an.analyze(analyze_cfg(tmp_path))

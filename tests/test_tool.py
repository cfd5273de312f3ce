"""sharpbench as a tool: the command, eval, reusable checkpoints and model.pt, file modes, sweep
folder names, statuses, fractional milestones, and a quiet console."""
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from sharpbench import checks, cli, console
from sharpbench.data import DatasetUnavailableError
from sharpbench.data.cache import write_cache
from sharpbench.eval import evaluate
from sharpbench.export import load_model
from sharpbench.models import build_model
from sharpbench.module import SharpnessModule
from sharpbench.fileio import atomic_write_text
from sharpbench.schedule import ScheduleConfigError, check_schedule, lr_multiplier
from sharpbench.sweep_dirs import job_dir_name, register_resolver

pytestmark = pytest.mark.e2e  # runs sharpbench end to end (make test-quick leaves it out)

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "sharpbench" / "conf")
ENV = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="offline", PYTHONPATH=str(ROOT))
TINY = ["experiment=smoke", "optimizer=sam", "trainer.max_epochs=1", "dataset.train_subset=256",
        "dataset.test_subset=128", "dataset.val_split=64", "dataset.batch_size=32"]


def sharpbench(*args, cwd, umask=0o022, timeout=300):
    """``python -m sharpbench.cli ...`` (what the ``sharpbench`` console script runs)."""
    code = f"import os, sys; os.umask({umask}); from sharpbench.cli import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny SAM run through ``sharpbench train``, from a folder outside the repository."""
    cwd = tmp_path_factory.mktemp("elsewhere")
    run_dir = cwd / "run"
    out = sharpbench("train", *TINY, f"hydra.run.dir={run_dir}", cwd=cwd)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return run_dir, out.stdout + out.stderr


# ----------------------------------------------------------------------------- the command
def test_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    for command in ("train", "eval", "report", "analyze", "bench"):
        assert f"\n  {command} " in text


def test_unknown_and_missing_commands_are_clear(capsys, monkeypatch):
    assert cli.main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err
    monkeypatch.setitem(cli.COMMANDS, "bench", ("sharpbench.no_such_module", "x"))
    assert cli.main(["bench"]) == 2
    assert "has no sharpbench.no_such_module module" in capsys.readouterr().err


# --------------------------------------------------------------------- console and train.log
def test_console_has_one_start_line_no_library_noise_and_train_log_holds_the_run(run):
    run_dir, text = run
    assert text.count("[sharpbench] training sam on synthetic/tiny_cnn") == 1
    assert f"-> {run_dir}" in text and "[sharpbench] completed: sam" in text
    for noise in ("Tip:", "GPU available", "weights_only", "deprecated", "LeafSpec", "Traceback"):
        assert noise not in text, noise
    log = (run_dir / "train.log").read_text()
    assert "[sharpbench] training sam" in log and "[sharpbench] completed: sam" in log
    assert "GPU available" in log  # library information is kept, in the log file only


def test_progress_bar_shows_seconds_per_step_and_eta_for_slow_steps():
    from tqdm import tqdm
    assert console.rate_text(0.4) == "2.50s/it" and console.rate_text(12.345) == "12.35it/s"
    # 3 of 10 steps done in 7.5 s: 2.5 s per step, 17.5 s left
    line = tqdm.format_meter(3, 10, 7.5, bar_format=console.BAR_FORMAT, ncols=100)
    assert "2.50s/it" in line and "00:07<00:17" in line
    bar = console.progress_bar()
    bar._trainer = SimpleNamespace(num_sanity_val_steps=0, state=SimpleNamespace(fn="fit"))
    assert bar.init_train_tqdm().bar_format == console.BAR_FORMAT


def test_long_cpu_run_warns_once_with_the_estimate(monkeypatch, caplog):
    cfg = OmegaConf.create({"optimizer": {"name": "sam", "rho": 0.05, "lr": 0.1}, "seed": 0,
                            "dataset": {"name": "cifar10", "batch_size": 128},
                            "model": {"name": "resnet18"}, "trainer": {"max_epochs": 80}})
    splits = SimpleNamespace(test_y=torch.zeros(10_000), has_val=False)
    data = SimpleNamespace(train_y=torch.zeros(50_000), num_classes=10, splits=splits)
    probes = []
    monkeypatch.setattr(console, "seconds_per_image",
                        lambda model, n, probe_batch: probes.append(probe_batch) or 0.01)
    with caplog.at_level("INFO", logger="sharpbench"):
        estimate = console.announce_start(cfg, data, torch.nn.Linear(1, 1), Path("/runs/x"),
                                          on_gpu=False, precision="32")
    # 80 epochs × (50,000 images × 2 passes + 10,000 test images / 3) × 0.01 s
    assert estimate == pytest.approx(80 * (100_000 + 10_000 / 3) * 0.01)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "about 23.0 h" in warnings[0] and "experiment=smoke" in warnings[0]
    assert probes == [128]  # timed at the run's own batch size (a batch of 32 over-estimates)
    assert "batch of 128" in warnings[0] and "2 passes/step" in warnings[0]
    caplog.clear()
    assert console.announce_start(cfg, data, torch.nn.Linear(1, 1), Path("/r"), on_gpu=True,
                                  precision="bf16-mixed") is None
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_cpu_timing_probe_leaves_the_model_and_rng_untouched():
    model = build_model("tiny_cnn", num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    assert console.seconds_per_image(model, 10, probe_batch=4) > 0
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ------------------------------------------------------------- what a run leaves, reusable
def test_files_a_run_writes_are_readable_like_hydras(run):
    run_dir, _ = run
    for path in (run_dir / "metrics.json", run_dir / "model.pt",
                 run_dir / "checkpoints" / "last.ckpt", run_dir / ".hydra" / "config.yaml"):
        assert mode(path) == 0o644, (path, oct(mode(path)))


@pytest.mark.parametrize("umask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writers_respect_the_umask(tmp_path, umask, expected):
    from sharpbench.curves import save
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        write_cache(tmp_path / "cache" / "c.pt", {"k": 1}, {"x": torch.zeros(1), "y": torch.zeros(1),
                                                            "class_names": []})
        fig = plt.figure()
        save(fig, tmp_path / "f")  # f.png and f.pdf
        plt.close(fig)
    finally:
        os.umask(old)
    for name in ("a.json", "cache/c.pt", "f.png", "f.pdf"):
        assert mode(tmp_path / name) == expected, name


def test_model_pt_loads_into_build_model(run):
    run_dir, _ = run
    state = torch.load(run_dir / "model.pt")
    assert not any(k.startswith("model.") for k in state)
    net = build_model("tiny_cnn", num_classes=10, **{k: v for k, v in json.loads(
        (run_dir / "metrics.json").read_text())["config"]["model"].items() if k != "name"})
    net.load_state_dict(state)  # strict: every key, no prefix
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    for k, v in state.items():
        assert torch.equal(v, ckpt["state_dict"][f"model.{k}"])
    again = load_model(run_dir)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in state.items())


def test_checkpoint_rebuilds_the_module(run):
    run_dir, _ = run
    module = SharpnessModule.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt",
                                                  map_location="cpu", weights_only=False)
    state = torch.load(run_dir / "model.pt")
    assert all(torch.equal(v, module.model.state_dict()[k]) for k, v in state.items())
    assert module.hparams.optimizer_cfg["name"] == "sam"
    assert module.hparams.run_config["dataset"]["name"] == "synthetic"


def test_eval_reproduces_the_runs_test_and_val_numbers(run, tmp_path):
    run_dir, _ = run
    record = json.loads((run_dir / "metrics.json").read_text())
    out = sharpbench("eval", f"ckpt={run_dir}", "progress_bar=false", cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "[sharpbench] eval: sam on synthetic/tiny_cnn" in out.stdout
    assert not list(tmp_path.iterdir())  # nothing written where it was called from
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["test_acc"] == pytest.approx(record["test_acc"])
    assert result["test_loss"] == pytest.approx(record["test_loss"])
    assert result["val_acc"] == pytest.approx(record["val_acc"])
    assert result["test_images"] == 128 and result["val_images"] == 64
    assert mode(run_dir / "eval.json") == 0o644
    # a checkpoint path works too, and out= puts the file elsewhere
    again = evaluate(run_dir / "checkpoints" / "last.ckpt", out=tmp_path / "e.json", progress_bar=False)
    assert again["test_acc"] == pytest.approx(record["test_acc"]) and (tmp_path / "e.json").is_file()


def test_eval_takes_a_sweep_job_folder_as_a_positional_argument(run, tmp_path):
    """A sweep job folder's name holds '=' and ',' (Hydra's override grammar refused
    ``ckpt=<it>``); given as a path, it evaluates."""
    import shutil
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from sharpbench.eval import positional_ckpt
    run_dir, _ = run
    job = tmp_path / "sweep" / "optimizer=sam,seed=0,it's"
    shutil.copytree(run_dir, job)
    (override,) = positional_ckpt([str(job)])
    assert OverridesParser.create().parse_override(override).value() == str(job)
    out = sharpbench("eval", str(job), "progress_bar=false", cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    record = json.loads((job / "metrics.json").read_text())
    assert json.loads((job / "eval.json").read_text())["test_acc"] == pytest.approx(record["test_acc"])


def test_eval_of_a_folder_without_checkpoint_is_a_clear_error(tmp_path):
    from sharpbench.eval import EvalInputError
    with pytest.raises(EvalInputError, match="no checkpoint at .*checkpoints/last.ckpt"):
        evaluate(tmp_path)
    with pytest.raises(EvalInputError, match="no such file or folder"):
        evaluate(tmp_path / "missing.ckpt")
    assert issubclass(EvalInputError, checks.config_errors())  # exit 2, no traceback, in main()


# ---------------------------------------------------------------------------------- statuses
def test_missing_data_is_data_unavailable_not_invalid_config(tmp_path):
    out = sharpbench("train", "experiment=smoke", "dataset=cifar10", f"dataset.root={tmp_path}/none",
                     "dataset.download=false", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stdout + out.stderr
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "data_unavailable"
    assert checks.failure_status(DatasetUnavailableError("x")) == "data_unavailable"
    assert checks.failure_status(checks.ConfigError("x")) == "invalid_config"


# ----------------------------------------------------------------------- sweep folder names
def sweep_subdir(overrides):
    register_resolver()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg.hydra.sweep.subdir


def test_sweep_folder_names_leave_out_where_keys():
    name = sweep_subdir(["dataset=cifar10", "dataset.root=/data/sets/cifar", "dataset.download=false",
                         "dataset.format=folder", "optimizer=sam", "seed=1"])
    assert name == "dataset=cifar10,optimizer=sam,seed=1"


def test_long_sweep_folder_names_become_prefix_plus_hash():
    long = ["optimizer=sam", f"schedule.name={'x' * 300}", "seed=3"]  # (run_name names no folder)
    name = sweep_subdir(long)
    assert len(name.encode()) <= 200 and name.startswith("optimizer=sam-")
    assert name == sweep_subdir(long)  # stable: a re-run finds the same folder
    assert name != sweep_subdir(long[:2] + ["seed=4"])
    assert job_dir_name("a=1,b=x/y") == "a=1,b=x_y"
    assert job_dir_name("a=" + "é" * 300).encode()  # cut on a character boundary


# ---------------------------------------------------------------------------------- schedule
def test_milestones_as_fractions_match_the_papers_epochs():
    frac = {"name": "multistep", "milestones": [0.625, 0.9375], "gamma": 0.1}
    epochs_ = {"name": "multistep", "milestones": [50, 75], "gamma": 0.1}
    for step in range(0, 80 * 7):
        assert lr_multiplier(step, 7, 80, frac) == lr_multiplier(step, 7, 80, epochs_)
    check_schedule(frac, 2)  # the default schedule works for a 2-epoch run
    # 2 epochs of 8 steps: ×0.1 from step ceil(1.25·8) = 10, ×0.01 from ceil(1.875·8) = 15
    assert [round(lr_multiplier(s, 8, 2, frac), 6) for s in (9, 10, 14, 15)] == [1, 0.1, 0.1, 0.01]


def test_default_schedule_is_fractional_and_late_milestones_never_suggest_repeats(tmp_path):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["trainer.max_epochs=2"])
    check_schedule(cfg.schedule, 2)
    for epochs in (2, 3, 5):
        with pytest.raises(ScheduleConfigError) as err:
            check_schedule({"name": "multistep", "milestones": [50, 75]}, epochs)
        assert "schedule.milestones=[0.625,0.9375]" in str(err.value)
        assert "[1,1]" not in str(err.value) and "[0,0]" not in str(err.value)

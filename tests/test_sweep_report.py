"""Sweeps and the report: a real multirun through the CLI (skip on re-run, a failing job, DDP),
Table 1 from hand-made records, GPU pinning across processes, and the sweep configs."""
import itertools
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from sharpbench.optim import registry
from omegaconf import OmegaConf

from sharpbench import ddp_launch, gpu_pool
from sharpbench.bench import optimizer_config
from sharpbench.report import (collect_runs, display_table, runs_frame, table1, to_latex,
                               to_markdown, write_report)

pytestmark = pytest.mark.e2e  # runs sharpbench end to end (make test-quick leaves it out)

PAPER_LABEL = "Feldman 2025"
RECIPE = {"seed": 0, "label_smoothing": 0.1, "model": {"name": "resnet18"},
          "optimizer": {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "rho": 0.05},
          "dataset": {"batch_size": 128, "val_split": 0},
          "schedule": {"name": "multistep", "milestones": [50, 75], "gamma": 0.1},
          "trainer": {"max_epochs": 80}}

ROOT = Path(__file__).resolve().parents[1]
# PYTHONPATH: subprocesses started outside the checkout import this checkout's sharpbench
ENV = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="offline",
           PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
TINY = ["experiment=smoke", "trainer.max_epochs=1", "dataset.train_subset=256",
        "dataset.test_subset=128", "trainer.enable_progress_bar=false"]


def sweep(sweep_dir, *overrides, timeout=300, returncode=0):
    cmd = [sys.executable, "-m", "sharpbench.train", "-m", *TINY, *overrides,
           f"hydra.sweep.dir={sweep_dir}",
           "++hydra.callbacks.report._target_=sharpbench.sweep_callback.ReportOnMultirunEnd"]
    started = time.perf_counter()
    out = subprocess.run(cmd, cwd=sweep_dir.parent, env=ENV, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == returncode, out.stderr[-3000:]
    return out.stdout + out.stderr, time.perf_counter() - started


# ------------------------------------------------------------------ a real sweep through the CLI
# 2 methods × 2 seeds × {a working learning rate, one that diverges}: 8 jobs. (A setting the
# config check refuses would refuse the whole sweep before it starts: tests/test_validation.py.)
GRID = ["optimizer=sgd,sam", "seed=0,1", "optimizer.lr=0.05,1e12", "schedule=constant"]
GOOD, BAD = "lr=0.05", "lr=1e+12"


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    sweep_dir = tmp_path_factory.mktemp("sweep") / "grid"
    log, seconds = sweep(sweep_dir, *GRID, returncode=1)  # jobs failed: the multirun says so
    return sweep_dir, log, seconds


def metrics_files(sweep_dir):
    return {p.parent.name: json.loads(p.read_text()) for p in sweep_dir.glob("*/metrics.json")}


def test_sweep_table_matches_the_runs(swept):
    sweep_dir, log, _ = swept
    records = metrics_files(sweep_dir)
    assert len(records) == 8
    done = [r for r in records.values() if r["status"] == "completed"]
    assert len(done) == 4 and all(r["config"]["optimizer"]["lr"] == 0.05 for r in done)
    table = pd.read_csv(sweep_dir / "grid.csv", keep_default_na=False, na_values=[""])
    for method in ("sgd", "sam"):
        accs = [r["test_acc"] for r in done if r["method"] == method]
        times = [r["wall_time_s"] for r in done if r["method"] == method]
        row = table[(table["method"] == method) & (table["setting"] == GOOD)].iloc[0]
        assert row["n"] == 2 and row["failed"] == 0
        assert row["test_acc_mean"] == pytest.approx(sum(accs) / 2)
        assert row["test_acc_std"] == pytest.approx(pd.Series(accs).std(ddof=1))
        assert row["wall_time_s"] == pytest.approx(sum(times) / 2)
        assert row["loss_split"] == "test"
    ok = table[table["setting"] == GOOD].set_index("method")
    assert ok.loc["sgd", "time_vs_sam_pct"] == pytest.approx(
        100 * ok.loc["sgd", "wall_time_s"] / ok.loc["sam", "wall_time_s"])
    assert f"| SAM ({GOOD})" in (sweep_dir / "grid.md").read_text()
    assert (sweep_dir / "grid.tex").read_text().startswith(r"\begin{tabular}")


def test_a_failing_job_is_listed_and_the_others_complete(swept):
    """The lr=1e12 jobs diverge: recorded, listed by the callback, counted as failed in the
    table; the other jobs complete."""
    sweep_dir, log, _ = swept
    runs = pd.read_csv(sweep_dir / "runs.csv")
    assert len(runs) == 8
    failed = runs[runs["status"] != "completed"]
    assert len(failed) == 4 and (runs["status"] == "completed").sum() == 4
    assert failed["status"].eq("diverged").all()
    assert failed["error"].str.contains("diverged").all()
    assert failed["setting"].eq(BAD).all()
    assert log.count("sweep job diverged: ") == 4
    assert "8 jobs: 4 completed, 4 diverged" in log  # and the exit status counts them
    table = pd.read_csv(sweep_dir / "grid.csv", keep_default_na=False, na_values=[""])
    bad = table[table["setting"] == BAD]
    assert list(bad["n"]) == [0, 0] and list(bad["failed"]) == [2, 2]


def test_rerun_skips_completed_jobs(swept):
    sweep_dir, _, first_seconds = swept
    before = {p: p.read_bytes() for p in sweep_dir.glob("*/metrics.json")
              if json.loads(p.read_text())["status"] == "completed"}
    log, seconds = sweep(sweep_dir, *GRID, returncode=1)
    assert log.count("already completed") == 4 and "[sharpbench] completed" not in log
    assert {p: p.read_bytes() for p in before} == before
    print(f"first sweep {first_seconds:.1f} s, re-run {seconds:.1f} s")


def test_curves_and_python_api(swept, tmp_path):
    sweep_dir, _, _ = swept
    for name in ("curves_train_loss_synthetic", "curves_test_acc_synthetic"):
        assert (sweep_dir / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (sweep_dir / f"{name}.pdf").read_bytes()[:5] == b"%PDF-"
    paths = write_report([sweep_dir], out=tmp_path)
    assert {"runs", "table_csv", "table_md", "table_tex"} <= set(paths)
    assert paths["table_md"].name == f"{tmp_path.name}.md"
    assert all(Path(p).exists() for p in paths.values())
    assert len(collect_runs([sweep_dir])) == 8


def test_report_cli(swept, tmp_path):
    sweep_dir, _, _ = swept
    out = subprocess.run([sys.executable, "-m", "sharpbench.report", str(sweep_dir), "--out",
                          str(tmp_path), "--no-curves"], env=ENV, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"| SGD ({GOOD})" in out.stdout and "4 diverged" in out.stdout
    assert not list(tmp_path.glob("*.png"))


# --------------------------------------------------------------- Table 1 from hand-made records
def record(method, seed, acc, dataset="cifar10", wall=100.0, status="completed", val_loss=None,
           test_loss=1.0, passes=2.0, config=None, recipe=False):
    rec = {"method": method, "dataset": dataset, "seed": seed, "status": status,
           "test_acc": acc, "test_loss": test_loss, "val_loss": val_loss, "wall_time_s": wall,
           "passes_per_step": passes, "model": "resnet18"}
    if recipe:
        config = json.loads(json.dumps(RECIPE))
        config["seed"], config["optimizer"]["name"], config["dataset"]["name"] = seed, method, dataset
        if method == "sgd":
            del config["optimizer"]["rho"]
    if config is not None:
        rec["config"] = config
    if status != "completed":
        rec.update(test_acc=None, test_loss=None, wall_time_s=None, error="boom")
    return rec


def test_table1_mean_std_relative_time_and_paper_column():
    records = [record("sam", 0, 90.0, wall=100), record("sam", 1, 92.0, wall=110),
               record("sam", 2, 94.0, wall=120),
               record("sam", 3, None, status="failed"), record("sam", 4, None, status="diverged"),
               record("ssam_f", 0, 91.0, wall=165, passes=2.0),
               record("sgd", 0, 89.0, wall=55, passes=1.0), record("sgd", 1, 88.0, wall=65, passes=1.0),
               record("sam", 0, 70.0, dataset="cifar100", wall=200)]
    records = [dict(r, config=record(r["method"], r["seed"], 0, r["dataset"], recipe=True)["config"])
               for r in records]
    table = table1(runs_frame(records)).set_index(["dataset", "method"])
    sam = table.loc[("cifar10", "sam")]
    assert sam["n"] == 3 and sam["failed"] == 2 and sam["statuses"] == "diverged=1; failed=1"
    assert sam["test_acc_mean"] == pytest.approx(92.0)
    assert sam["test_acc_std"] == pytest.approx(2.0)  # ddof=1
    assert sam["wall_time_s"] == pytest.approx(110) and sam["time_vs_sam_pct"] == pytest.approx(100)
    assert table.loc[("cifar10", "sgd"), "time_vs_sam_pct"] == pytest.approx(100 * 60 / 110)
    assert table.loc[("cifar10", "ssam_f"), "time_vs_sam_pct"] == pytest.approx(150)
    assert math.isnan(table.loc[("cifar10", "ssam_f"), "test_acc_std"])  # n = 1
    assert table.loc[("cifar10", "sam"), "paper_top1"] == 92.0
    assert table.loc[("cifar10", "ssam_f"), "paper_top1"] == 92.1
    assert table.loc[("cifar100", "sam"), "paper_top1"] == 71.0
    assert math.isnan(table.loc[("cifar10", "sgd"), "paper_top1"])
    assert list(table.loc["cifar10"].index) == ["sgd", "sam", "ssam_f"]  # the fixed method order

    shown = display_table(table.reset_index())
    assert shown.loc["SAM", ("CIFAR-10", "top-1 (%)")] == "92.00 ± 2.00"
    assert shown.loc["SSAM-F", ("CIFAR-10", "top-1 (%)")] == "91.00 ± —"
    assert shown.loc["SSAM-F", ("CIFAR-10", PAPER_LABEL)] == "92.1"
    assert shown.loc["SGD", ("CIFAR-10", PAPER_LABEL)] == "—"
    assert shown.loc["SGD", ("CIFAR-100", "top-1 (%)")] == "—"  # no such run
    assert shown.loc["SAM", ("CIFAR-10", "failed")] == "2"
    md = to_markdown(shown)
    assert "## CIFAR-10" in md and PAPER_LABEL in md and "| SAM    | 92.00 ± 2.00 |" in md
    tex = to_latex(shown)
    assert r"92.00 $\pm$ 2.00" in tex and r"\multicolumn" in tex and "91.00 $\\pm$ ---" in tex


def test_loss_column_uses_validation_loss_when_every_run_has_one():
    records = [record("sam", 0, 90.0, val_loss=0.5, test_loss=0.9),
               record("sam", 1, 91.0, val_loss=0.7, test_loss=1.1),
               record("sgd", 0, 89.0, val_loss=None, test_loss=1.3)]
    table = table1(runs_frame(records)).set_index("method")
    assert table.loc["sam", "loss_split"] == "val" and table.loc["sam", "loss_mean"] == pytest.approx(0.6)
    assert table.loc["sgd", "loss_split"] == "test" and table.loc["sgd", "loss_mean"] == pytest.approx(1.3)
    assert ("CIFAR-10", "test/val loss") in display_table(table.reset_index()).columns


def test_runs_that_differ_in_config_are_not_averaged_together():
    cfg = lambda rho, seed: {"optimizer": {"name": "sam", "rho": rho}, "seed": seed,
                             "dataset": {"name": "cifar10", "root": f"/data{seed}"}}
    records = [record("sam", s, 90.0 + s + 10 * rho, config=cfg(rho, s))
               for rho in (0.05, 0.1) for s in (0, 1)]
    records[0]["config"]["rho_by_method"] = {"sgd": None}  # null and absent are the same
    table = table1(runs_frame(records))
    assert list(table["setting"]) == ["rho=0.05", "rho=0.1"]
    assert list(table["n"]) == [2, 2]  # seed and dataset.root do not split rows
    assert table["time_vs_sam_pct"].tolist() == [100.0, 100.0]


def test_collect_runs_lists_jobs_without_a_record(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "metrics.json").write_text(json.dumps(record("sam", 0, 90.0)))
    (tmp_path / "b" / ".hydra").mkdir(parents=True)  # a job killed before writing metrics.json
    (tmp_path / "b" / ".hydra" / "config.yaml").write_text(
        "seed: 3\noptimizer: {name: sgd}\ndataset: {name: cifar100}\nrun_name: ${seed}\n")
    (tmp_path / "b" / ".hydra" / "overrides.yaml").write_text("- optimizer=sgd\n- seed=3\n")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "metrics.json").write_text("{not json")
    runs = collect_runs([tmp_path]).set_index("status")
    assert set(runs.index) == {"completed", "no_record", "unreadable"}
    lost = runs.loc["no_record"]
    assert (lost["method"], lost["dataset"], lost["seed"]) == ("sgd", "cifar100", 3)
    assert lost["overrides"] == "optimizer=sgd seed=3"
    table = table1(collect_runs([tmp_path])).set_index(["dataset", "method"])
    assert table.loc[("cifar100", "sgd"), "failed"] == 1


# ------------------------------------------------------------------------------ GPU pinning
CLAIMER = """
import os, sys, time
from pathlib import Path
from sharpbench import gpu_pool
sweep_dir, n = Path(sys.argv[1]), int(sys.argv[2])
gpu_pool.pin_gpu_for_this_process([0, 1, 2], sweep_dir, jobs_per_gpu=2)
(sweep_dir / f"claimed.{os.getpid()}").touch()
while len(list(sweep_dir.glob("claimed.*"))) < n:  # hold the claim until every worker has one
    time.sleep(0.05)
gpu_pool.pin_gpu_for_this_process([0, 1, 2], sweep_dir, jobs_per_gpu=2)  # a later job: same GPU
print(os.environ["CUDA_VISIBLE_DEVICES"])
"""


def test_workers_spread_over_the_pool(tmp_path):
    """Six fresh processes (like loky's workers) claim at once: two per GPU of [0, 1, 2]."""
    env = {k: v for k, v in ENV.items() if k not in ("CUDA_VISIBLE_DEVICES", "LOCAL_RANK")}
    procs = [subprocess.Popen([sys.executable, "-c", CLAIMER, str(tmp_path), "6"], env=env,
                              stdout=subprocess.PIPE, text=True) for _ in range(6)]
    got = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert sorted(got) == ["0", "0", "1", "1", "2", "2"]
    claims = json.loads((tmp_path / gpu_pool.STATE_FILE).read_text())
    assert sorted(claims.values()) == ["0", "0", "1", "1", "2", "2"]


def test_claims_of_exited_workers_are_reused_and_a_worker_chooses_once(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    gone = "%s:%d" % (gpu_pool.socket.gethostname(), 2**22 + 12345)  # no such pid
    (tmp_path / gpu_pool.STATE_FILE).write_text(json.dumps({gone: "0", "otherhost:1": "1"}))
    gpu_pool.reset_for_tests()
    try:
        assert gpu_pool.pin_gpu_for_this_process([0, 1], tmp_path) == "0"
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"
        os.environ["CUDA_VISIBLE_DEVICES"] = "junk"  # a job changed it: the next job restores it
        assert gpu_pool.pin_gpu_for_this_process([0, 1], tmp_path) == "0"
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"
        claims = json.loads((tmp_path / gpu_pool.STATE_FILE).read_text())
        assert claims == {gpu_pool.worker_id(): "0", "otherhost:1": "1"}
    finally:
        gpu_pool.reset_for_tests()


def test_no_pool_no_pinning(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")
    gpu_pool.reset_for_tests()
    assert gpu_pool.pin_gpu_for_this_process(None, tmp_path) is None
    assert gpu_pool.pin_gpu_for_this_process([], tmp_path) is None
    monkeypatch.setenv("LOCAL_RANK", "1")  # a DDP child keeps its parent's GPUs
    assert gpu_pool.pin_gpu_for_this_process([0, 1], tmp_path) == "7"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "7" and not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------- DDP in a sweep
DRIVER = '''
"""train.py's main() with the proposed edit: train() runs inside ddp_launch.sweep_job_scope()."""
import hydra
import sharpbench.train as t
from sharpbench.ddp_launch import sweep_job_scope

_train = t.train
def train(*args, **kwargs):
    with sweep_job_scope():
        return _train(*args, **kwargs)
t.train = train
main = hydra.main(config_path=%r, config_name="train", version_base="1.3")(t.main.__wrapped__)
main()
'''


def test_ddp_job_children_run_only_their_own_job(tmp_path):
    """Two DDP jobs (2 CPU ranks, gloo) in one process: each starts its own rank 1; the sweep is
    launched once; the second job does not reuse the first one's environment or group."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER % str(ROOT / "sharpbench" / "conf"))
    cmd = [sys.executable, str(driver), "-m", *TINY, "optimizer=sgd", "seed=0,1",
           "trainer.strategy=ddp", "trainer.devices=2", f"hydra.sweep.dir={tmp_path / 'ddp'}"]
    out = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    assert log.count("Launching 2 jobs") == 1
    # Lightning's "Initializing distributed" lines go to the jobs' log files, not the console
    job_logs = "".join(p.read_text() for p in (tmp_path / "ddp").glob("*/*.log"))
    assert job_logs.count("GLOBAL_RANK: 1, MEMBER: 2/2") == 2
    records = metrics_files(tmp_path / "ddp")
    assert sorted(r["seed"] for r in records.values()) == [0, 1]
    assert all(r["status"] == "completed" for r in records.values())
    assert not (tmp_path / "outputs").exists()  # no second sweep folder from a child
    assert all((tmp_path / "ddp" / name / "train_ddp_process_1.log").exists() for name in records)


def test_child_command_is_this_job_in_run_mode(compose_cfg, tmp_path, monkeypatch):
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    cfg = compose_cfg(["experiment=smoke", "optimizer=sam", "seed=1"])
    job_dir = tmp_path / "dataset=x,optimizer=sam,seed=1"
    OmegaConf.set_struct(cfg, False)
    cfg.hydra.runtime.output_dir = str(job_dir)
    cfg.hydra.runtime.cwd = str(tmp_path)
    cfg.hydra.mode = RunMode.MULTIRUN
    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)
    HydraConfig.instance().set_config(cfg)
    monkeypatch.setenv("LOCAL_RANK", "0")
    with ddp_launch.sweep_job_scope():
        from lightning.pytorch.strategies.launchers import subprocess_script as pl_launcher
        cmd, cwd = pl_launcher._hydra_subprocess_cmd(local_rank=1)
        os.environ["WORLD_SIZE"] = "2"
    assert cmd[:3] == [sys.executable, "-m", "sharpbench.train"] and cwd == str(tmp_path)
    assert "-m" not in cmd[3:] and "--multirun" not in cmd
    assert cmd[5:8] == ["experiment=smoke", "optimizer=sam", "seed=1"]  # after --config-name train
    assert "hydra.mode=RUN" in cmd and f"hydra.run.dir='{job_dir}'" in cmd
    assert pl_launcher._hydra_subprocess_cmd is not ddp_launch.job_subprocess_cmd  # restored
    assert os.environ["LOCAL_RANK"] == "0" and "WORLD_SIZE" not in os.environ
    child = compose_cfg(["experiment=table1", "hydra.mode=RUN"])  # a sweep experiment sets MULTIRUN
    assert child.hydra.mode == RunMode.RUN


# ------------------------------------------------------------------------- sweep configs compose
def sweep_jobs(cfg):
    from sharpbench import grid
    return grid.jobs(cfg.hydra.sweeper.params)


def job_cfg(compose_cfg, experiment, job):
    return compose_cfg([f"experiment={experiment}", *(f"{k}={v}" for k, v in job.items())])


# table1_full: every registered method but the plain adaptive baselines, 2 datasets, 4 seeds
FULL = len([m for m in registry.names() if m not in ("adam", "adamw", "rmsprop")]) * 2 * 4


@pytest.mark.parametrize("experiment, n_jobs", [("table1", 32), ("table1_full", FULL),
                                                ("rho_sweep", 30)])
def test_sweep_experiments_apply_the_recipe_to_every_method(compose_cfg, experiment, n_jobs):
    from sharpbench import checks
    cfg = compose_cfg([f"experiment={experiment}"])
    jobs = sweep_jobs(cfg)
    assert len(jobs) == n_jobs and cfg.sweep_name == experiment and cfg.ckpt_path == "last"
    assert cfg.hydra.callbacks.report._target_ == "sharpbench.sweep_callback.ReportOnMultirunEnd"
    for job in jobs:
        if job.get("seed", "0") != "0":
            continue  # seeds change nothing else
        c = job_cfg(compose_cfg, experiment, job)
        checks.check_config(c)
        opt = c.optimizer
        assert (c.model.name, c.dataset.batch_size, c.trainer.max_epochs) == ("resnet18", 128, 80)
        assert list(c.schedule.milestones) == [50, 75] and c.schedule.gamma == 0.1
        assert c.label_smoothing == 0.1
        # table1 and rho_sweep set rho; table1_full keeps each method's own (0.05; ASAM 0.5,
        # MSAM 3)
        own = optimizer_config(opt.name).get("rho")
        expected_rho = float(job.get("optimizer.rho", 0.05 if experiment == "table1" else own or 0))
        if own is None:                 # no radius: SGD, HATAM, SAF, MESA
            assert opt.get("rho") is None
        else:
            assert opt.rho == expected_rho, (job, opt.rho)
        if opt.name == "hatam":
            assert (opt.lr, opt.weight_decay) == (1e-3, 1e-2)
        else:
            assert (opt.lr, opt.momentum, opt.weight_decay, opt.base) == (0.1, 0.9, 5e-4, "sgd")


def test_table1_grid_is_the_papers(compose_cfg):
    jobs = sweep_jobs(compose_cfg(["experiment=table1"]))
    assert {j["optimizer"] for j in jobs} == {"sam", "friendly_sam", "ssam_f", "ssam_d"}
    assert {j["dataset"] for j in jobs} == {"cifar10", "cifar100"}
    assert {j["seed"] for j in jobs} == {"0", "1", "2", "3"}


def test_optuna_example_composes(compose_cfg):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    cfg = compose_cfg(["experiment=optuna_example"])
    assert cfg.hydra.sweeper.direction == "maximize"
    assert set(cfg.hydra.sweeper.params) == {"optimizer.lr", "optimizer.rho"}


@pytest.mark.parametrize("launcher, target", [
    ("sequential", "BasicLauncher"), ("local_parallel", "JoblibLauncher"), ("slurm", "SlurmLauncher")])
def test_launcher_configs_compose(compose_cfg, launcher, target):
    cfg = compose_cfg([f"hydra/launcher={launcher}"])
    assert cfg.hydra.launcher._target_.endswith(target)
    if launcher == "slurm":
        for key in ("partition", "gpus_per_node", "tasks_per_node", "cpus_per_task", "mem_gb",
                    "timeout_min", "array_parallelism", "signal_delay_s", "max_num_timeout"):
            assert key in cfg.hydra.launcher
    if launcher == "local_parallel":
        assert cfg.hydra.launcher.backend == "loky" and cfg.hydra.launcher.n_jobs >= 1

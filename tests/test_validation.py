"""Bad input stops the run at start-up with a message that says what to change, no traceback."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e  # runs sharpbench end to end (make test-quick leaves it out)

ROOT = Path(__file__).resolve().parents[1]


def run_cli(tmp_path, *overrides, timeout=300, **extra_env):
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="offline", **extra_env)
    cmd = [sys.executable, "-m", "sharpbench.train", "experiment=smoke", "trainer.max_epochs=1",
           "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp_path}", *overrides]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return out.returncode, out.stdout + out.stderr


# One case per failure family, through the real command line (tests/test_schema.py runs every
# case in-process): a type the schema refuses, Hydra's unknown key and unknown option, a `+`
# typo, an optimizer's own check, a data-size check, a cross-field rule.
FAMILIES = [
    (["trainer.max_epochs=abc"], "trainer.max_epochs=abc has the wrong type"),
    (["foo=1"], "unknown key foo=1"),
    (["model=nonexistent"], "group model has no option 'nonexistent'"),
    (["+trainer.max_epoch=5"], "did you mean trainer.max_epochs?"),
    (["optimizer=sam", "optimizer.rho=0"], "optimizer.rho=0.0 is out of range"),
    (["dataset.train_subset=100000"], "dataset.train_subset=100000 is larger than the synthetic training set"),
    (["trainer=gpu"] if not __import__("torch").cuda.is_available() else ["optimizer=sgd", "optimizer.base=adam"],
     "no CUDA GPU is visible" if not __import__("torch").cuda.is_available() else "optimizer.base=adam with optimizer=sgd"),
]


@pytest.mark.parametrize("overrides, message", FAMILIES, ids=[c[1][:30] for c in FAMILIES])
def test_bad_config_is_refused_with_a_clear_message(tmp_path, overrides, message):
    code, out = run_cli(tmp_path, *overrides)
    assert code == 2, out[-2000:]
    assert message in out, out[-2000:]
    assert "Traceback" not in out
    if (tmp_path / "metrics.json").exists():  # found once the data was loaded: the run's record
        record = json.loads((tmp_path / "metrics.json").read_text())
        assert record["status"] == "invalid_config" and message in record["error"]
    else:  # the command line itself: refused before Hydra made a run folder, logged beside them
        entry = json.loads((tmp_path.parent / "refused.jsonl").read_text().splitlines()[-1])
        assert entry["status"] == "invalid_config" and message in entry["jobs"][0]["error"]
        assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_a_refused_command_leaves_no_run_folder(tmp_path):
    """A mistyped command (no hydra.run.dir) creates nothing under outputs/runs but the log of
    refusals."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="offline")
    out = subprocess.run([sys.executable, "-m", "sharpbench.train", "experiment=smoke",
                          "optimizer.rhoo=0.1"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert sorted(p.name for p in (tmp_path / "outputs" / "runs").iterdir()) == ["refused.jsonl"]


def test_a_sweep_with_a_bad_job_is_refused_before_any_job_starts(tmp_path):
    """The whole grid is checked first: the sweep is refused, naming the job and the key, and no
    job runs (a sweep that fails half-way through is worth nothing)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="offline")
    cmd = [sys.executable, "-m", "sharpbench.train", "-m", "experiment=smoke",
           "optimizer=nonexistent,sgd", "seed=0,1", "trainer.max_epochs=1",
           "trainer.enable_progress_bar=false", f"hydra.sweep.dir={tmp_path}"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode == 2 and "Traceback" not in text, text[-3000:]
    assert "the sweep was refused before any job started: 2 of 4 jobs" in text
    assert "job optimizer=nonexistent seed=0" in text and "job optimizer=nonexistent seed=1" in text
    assert "group optimizer has no option 'nonexistent'" in text
    assert not list(tmp_path.glob("*/metrics.json")) and not list(tmp_path.glob("*/.hydra"))
    entry = json.loads((tmp_path / "refused.jsonl").read_text().splitlines()[-1])
    assert len(entry["jobs"]) == 2 and "optimizer=nonexistent" in entry["jobs"][0]["overrides"]


def test_a_sweep_of_good_jobs_is_not_refused():
    from sharpbench import preflight
    preflight.check_command(["experiment=table1", "seed=0"], multirun=True)  # 8 jobs, no error


def test_help_is_generated_from_the_schema(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    out = subprocess.run([sys.executable, "-m", "sharpbench.train", "--help"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    from sharpbench import schema
    for group in schema.GROUPS:
        assert f"\n{group}" in out.stdout
    assert schema.TRAINER["max_epochs"].meaning in out.stdout


def test_missing_dataset_without_download_says_where_it_looked(tmp_path):
    root = tmp_path / "nowhere"
    code, out = run_cli(tmp_path / "run", "dataset=cifar10", f"dataset.root={root}",
                        "dataset.download=false")
    assert code == 2 and "Traceback" not in out, out[-2000:]
    assert str(root) in out and "download" in out


def test_download_impossible_offline_is_a_clear_error(tmp_path):
    # A proxy on a port nobody listens on: the download fails at once, as with no network.
    root = tmp_path / "data"
    dead = "http://127.0.0.1:9"
    code, out = run_cli(tmp_path / "run", "dataset=cifar10", f"dataset.root={root}",
                        "dataset.download=true", https_proxy=dead, http_proxy=dead,
                        HTTPS_PROXY=dead, HTTP_PROXY=dead)
    assert code == 2 and "Traceback" not in out, out[-2000:]
    assert "download" in out.lower()


def test_corrupt_archive_is_detected_by_checksum(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (root / "cifar-10-python.tar.gz").write_bytes(b"not really a tarball")
    dead = "http://127.0.0.1:9"
    code, out = run_cli(tmp_path / "run", "dataset=cifar10", f"dataset.root={root}",
                        "dataset.download=true", https_proxy=dead, HTTPS_PROXY=dead)
    assert code == 2 and "Traceback" not in out, out[-2000:]
    assert "corrupt" in out.lower() or "checksum" in out.lower() or "md5" in out.lower()


def test_divergence_stops_the_run_and_names_step_loss_and_lr(tmp_path):
    code, out = run_cli(tmp_path, "optimizer=sgd", "optimizer.lr=1e12", "schedule=constant")
    assert code == 1, out[-2000:]
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record["status"] == "diverged"
    for word in ("diverged", "step", "learning rate"):
        assert word in record["error"], record["error"]
    assert "Traceback" not in out

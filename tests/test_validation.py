"""Bad input stops the run at start-up with a message that says what to change, no traceback."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
    (["optimizer=sam", "optimizer.rho=0"], "optimizer.rho=0 is out of range"),
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
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record["status"] == "invalid_config" and message in record["error"]


@pytest.mark.parametrize("launcher", ["sequential", pytest.param("local_parallel", marks=pytest.mark.slow)])
def test_a_sweep_records_invalid_jobs_and_goes_on(tmp_path, launcher):
    """Hydra refuses optimizer=nonexistent while composing that job: the job is recorded as
    invalid_config in its own folder, and the next job still runs (also in joblib's workers)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="offline")
    workers = ["hydra.launcher.n_jobs=2"] if launcher == "local_parallel" else []
    cmd = [sys.executable, "-m", "sharpbench.train", "-m", f"hydra/launcher={launcher}", *workers,
           "experiment=smoke", "optimizer=nonexistent,sgd",
           "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "dataset.train_subset=128",
           "dataset.test_subset=64", "dataset.batch_size=32", "trainer.limit_train_batches=2",
           f"hydra.sweep.dir={tmp_path}"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr
    assert "Traceback" not in text, text[-3000:]
    records = {p.parent.name: json.loads(p.read_text()) for p in tmp_path.glob("*/metrics.json")}
    bad = [r for name, r in records.items() if "optimizer=nonexistent" in name]
    good = [r for name, r in records.items() if "optimizer=sgd" in name]
    assert len(bad) == 1 and bad[0]["status"] == "invalid_config", (records.keys(), text[-3000:])
    assert "group optimizer has no option 'nonexistent'" in bad[0]["error"]
    assert "optimizer=nonexistent" in bad[0]["overrides"]
    assert len(good) == 1 and good[0]["status"] == "completed", text[-3000:]


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

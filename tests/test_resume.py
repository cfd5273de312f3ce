"""Nothing lost: kill -9 mid-epoch, resume with ckpt_path=last, get the uninterrupted result."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.e2e  # runs sharpbench end to end (make test-quick leaves it out)

ROOT = Path(__file__).resolve().parents[1]
BASE = ["experiment=smoke", "trainer.max_epochs=2", "dataset.train_subset=512",
        "dataset.test_subset=256", "dataset.batch_size=32", "trainer.deterministic=true",
        "trainer.enable_progress_bar=false", "trainer.checkpoint_every_n_steps=3"]


def cli(run_dir, *overrides):
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="offline")
    return [sys.executable, "-m", "sharpbench.train", *BASE, *overrides,
            f"hydra.run.dir={run_dir}"], env


def run_to_end(run_dir, *overrides):
    cmd, env = cli(run_dir, *overrides)
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads((Path(run_dir) / "metrics.json").read_text())


def ckpt_step(path):
    try:
        return torch.load(path, weights_only=False, map_location="cpu")["global_step"]
    except Exception:  # not there yet
        return -1


def final_state(run_dir):
    return torch.load(Path(run_dir) / "checkpoints" / "last.ckpt", weights_only=False)


def start_and_kill(run_dir, kill_after_step, *overrides):
    """Start a run, SIGKILL it once a checkpoint at >= kill_after_step exists (mid-epoch 2).

    Each new checkpoint file is read with the run frozen (SIGSTOP), so a fast machine cannot run
    on to the epoch's end between the check and the kill; a younger checkpoint: SIGCONT."""
    cmd, env = cli(run_dir, *overrides)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = Path(run_dir) / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    seen = None
    while time.time() < deadline and proc.poll() is None:
        stamp = last.stat().st_mtime_ns if last.exists() else None
        if stamp is not None and stamp != seen:
            proc.send_signal(signal.SIGSTOP)
            seen = last.stat().st_mtime_ns
            if ckpt_step(last) >= kill_after_step:
                break
            proc.send_signal(signal.SIGCONT)
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (Path(run_dir) / "metrics.json").exists()
    return ckpt_step(last)


@pytest.mark.parametrize("method", ["sam", pytest.param("friendly_sam", marks=pytest.mark.slow)])
def test_kill_9_mid_epoch_then_resume_equals_uninterrupted(tmp_path, method):
    reference = run_to_end(tmp_path / "ref", f"optimizer={method}")
    killed_at = start_and_kill(tmp_path / "run", 20, f"optimizer={method}")
    assert 16 < killed_at < 32  # 16 steps per epoch: killed inside the second epoch
    resumed = run_to_end(tmp_path / "run", f"optimizer={method}", "ckpt_path=last")
    a, b = final_state(tmp_path / "ref"), final_state(tmp_path / "run")
    assert a["global_step"] == b["global_step"] == 32
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    for key in ("test_acc", "test_loss", "train_loss", "steps", "passes_per_step"):
        assert resumed[key] == reference[key], key
    assert resumed["status"] == "completed"
    # the training curve survives the kill: every step logged once
    import pandas as pd
    steps = pd.read_csv(tmp_path / "run" / "csv" / "metrics.csv")[["step", "train/loss_step"]].dropna()["step"]
    assert sorted(steps.astype(int)) == list(range(32))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2],
                         ids=["SIGTERM", "SIGUSR1", "SIGUSR2"])
def test_signal_checkpoints_and_stops_then_resumes(tmp_path, signum):
    cmd, env = cli(tmp_path, "optimizer=sam", "trainer.max_epochs=3")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last = tmp_path / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while time.time() < deadline and not (last.exists() and ckpt_step(last) >= 4):
        time.sleep(0.2)
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signum, out[-3000:]  # preempted: non-zero, names the signal
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record["status"] == "preempted"
    stopped_at = ckpt_step(last)
    assert 4 <= stopped_at < 3 * 16
    resumed = run_to_end(tmp_path, "optimizer=sam", "trainer.max_epochs=3", "ckpt_path=last")
    assert resumed["status"] == "completed" and resumed["steps"] == 3 * 16

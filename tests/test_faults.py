"""Fault injection: kills and signals at every phase, corrupt checkpoints, a changed config before a
resume, divergence, a second process in the same folder, a full disk.

Every case asserts the weights (against an uninterrupted reference run), the metrics.json fields
and, through the CLI, the exit code. Most cases run in-process: a kill -9 is simulated by an
exception Lightning cannot handle (nothing saved on the way out), a signal is sent to this process
with ``os.kill`` at the chosen phase. One subprocess per family checks the real thing."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir

import sharpbench.train as train_mod
from sharpbench import lifecycle, record, runtime, sweep_status
from sharpbench.checks import ConfigError
from sharpbench.run_identity import CHECKPOINT_KEY, IdentityMismatch
from sharpbench.train import train, write_failure

pytestmark = pytest.mark.e2e  # runs sharpbench end to end (make test-quick leaves it out)

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "sharpbench" / "conf")
ENV = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="offline")
# 8 steps per epoch, 2 epochs; a step checkpoint every 4 steps (so one falls on each epoch's last
# batch, the case where Lightning would resume past the epoch's evaluation).
BASE = ["experiment=smoke", "optimizer=sgd", "+model.width=4", "trainer.max_epochs=2",
        "dataset.train_subset=64", "dataset.test_subset=32", "dataset.batch_size=8",
        "dataset.eval_batch_size=32", "trainer.deterministic=true",
        "trainer.enable_progress_bar=false", "trainer.checkpoint_every_n_steps=4"]
STEPS = 16


def cfg(*overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="train", overrides=BASE + list(overrides))


class Kill(BaseException):
    """Stands for kill -9: Lightning passes it through and nothing is saved on the way out."""


class At(L.Callback):
    """Run ``action`` once at a hook, when ``when(trainer)`` holds."""

    def __init__(self, hook, action, when=lambda trainer: True):
        self.done = False

        def fire(_self, trainer, *args, **kwargs):
            if not self.done and when(trainer):
                self.done = True
                action(trainer)
        setattr(self, hook, fire.__get__(self))


def inject(monkeypatch, *callbacks):
    build = train_mod.build_trainer

    def build_with(*args, **kwargs):
        trainer = build(*args, **kwargs)
        trainer.callbacks.extend(callbacks)
        return trainer
    monkeypatch.setattr(train_mod, "build_trainer", build_with)


def send(signum):
    return lambda *_: os.kill(os.getpid(), signum)


def kill(*_):
    raise Kill()


def metrics(run_dir):
    return json.loads((Path(run_dir) / "metrics.json").read_text())


def ckpt(run_dir, name="last.ckpt"):
    return torch.load(Path(run_dir) / "checkpoints" / name, weights_only=False, map_location="cpu")


def epoch_test_rows(run_dir):
    df = pd.read_csv(Path(run_dir) / "csv" / "metrics.csv")
    return df[["epoch", "test/acc"]].dropna().sort_values("epoch").to_numpy().tolist()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference")
    rec = train(cfg(), run_dir)
    assert rec["status"] == "completed" and rec["steps"] == STEPS
    return run_dir, rec, ckpt(run_dir)


def assert_same_run(run_dir, reference):
    ref_dir, ref, ref_ckpt = reference
    got = metrics(run_dir)
    assert got["status"] == "completed"
    for key, value in ref_ckpt["state_dict"].items():
        assert torch.equal(value, ckpt(run_dir)["state_dict"][key]), key
    for key in ("test_acc", "test_loss", "train_loss", "steps", "epochs_completed", "config_hash",
                "passes_per_step"):
        assert got[key] == ref[key], key
    assert len(got["epoch_times_s"]) == len(ref["epoch_times_s"]) == 2
    assert all(t > 0 for t in got["epoch_times_s"])
    assert epoch_test_rows(run_dir) == epoch_test_rows(ref_dir)  # one per-epoch test row per epoch, same values


# ------------------------------------------------------------------------ kills (simulated -9)
def test_kill_during_validation_resumes_with_right_records(tmp_path, monkeypatch, reference):
    """A step checkpoint falls on the epoch's last batch; the kill comes during that epoch's
    evaluation. The resume must redo the evaluation and the end-of-epoch values."""
    inject(monkeypatch, At("on_validation_batch_start", kill, lambda t: t.current_epoch == 0))
    with pytest.raises(Kill):
        train(cfg(), tmp_path)
    assert not (tmp_path / "metrics.json").exists()
    assert ckpt(tmp_path)["global_step"] == 4  # no step checkpoint on the epoch's last batch
    monkeypatch.undo()
    train(cfg("ckpt_path=last"), tmp_path)
    assert_same_run(tmp_path, reference)


def test_kill_during_a_save_and_a_truncated_checkpoint_fall_back(tmp_path, monkeypatch, reference):
    """Killed between 'last.ckpt -> last.prev.ckpt' and the rename of the new file; the stray
    temporary file of another interrupted save is cleaned up; a truncated last.ckpt is skipped."""
    replace = os.replace

    def replace_then_die(src, dst):
        replace(src, dst)
        if str(dst).endswith("last.prev.ckpt") and torch.load(dst, weights_only=False)["global_step"] == 8:
            raise Kill()  # last.ckpt is gone, last.prev.ckpt is the end of epoch 0
    monkeypatch.setattr(runtime.os, "replace", replace_then_die)
    with pytest.raises(Kill):
        train(cfg(), tmp_path)
    monkeypatch.undo()
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()
    stray = tmp_path / "checkpoints" / ".last.ckpt.x1y2.tmp"
    stray.write_bytes(b"\0" * 4096)
    train(cfg("ckpt_path=last"), tmp_path)
    assert not stray.exists()
    assert_same_run(tmp_path, reference)


def test_unreadable_checkpoints_fall_back_or_stop_with_a_clear_message(tmp_path, reference):
    ref_dir = reference[0]
    for name in ("last.ckpt", "last.prev.ckpt"):
        assert (ref_dir / "checkpoints" / name).exists()
    run = tmp_path / "run"
    shutil.copytree(ref_dir / "checkpoints", run / "checkpoints")
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # power loss mid-write
    path, loaded = runtime.resolve_ckpt_path("last", run)
    assert path.endswith("last.prev.ckpt") and loaded["global_step"] == 12
    prev = run / "checkpoints" / "last.prev.ckpt"
    prev.write_bytes(b"garbage")
    with pytest.raises(runtime.CheckpointUnreadable) as err:
        train(cfg("ckpt_path=last"), run)
    assert str(last) in str(err.value) and "start this run from scratch" in str(err.value)
    assert not (run / "metrics.json").exists()


# ------------------------------------------------------------------------------ signals
PHASES = {  # phase -> (hook, condition): where the signal arrives
    "startup": None,
    "mid_epoch": ("on_train_batch_start", lambda t: t.global_step == 6),  # during step 7
    "validation": ("on_validation_batch_start", lambda t: t.current_epoch == 0),
    "between_fit_and_test": ("on_fit_end", lambda t: True),
    "test": ("on_test_batch_start", lambda t: True),
}
# checkpoint step after the stop: None = no checkpoint
STOPPED_AT = {"startup": None, "mid_epoch": 7, "validation": 8, "between_fit_and_test": STEPS,
              "test": STEPS}


@pytest.mark.parametrize("phase", [pytest.param(p, marks=pytest.mark.slow) if p == "test" else p
                                   for p in PHASES])
def test_signal_at_each_phase_records_and_resumes(tmp_path, monkeypatch, reference, phase):
    signum = signal.SIGINT if phase == "mid_epoch" else signal.SIGTERM
    if phase == "startup":  # while the data is being prepared
        from sharpbench.data import CIFARDataModule
        prepare = CIFARDataModule.prepare_data

        def prepare_and_signal(self):
            os.kill(os.getpid(), signum)
            prepare(self)
        monkeypatch.setattr(CIFARDataModule, "prepare_data", prepare_and_signal)
    else:
        hook, when = PHASES[phase]
        inject(monkeypatch, At(hook, send(signum), when))
    stopped = train(cfg(), tmp_path, ["optimizer=sgd"])
    monkeypatch.undo()
    on_disk = metrics(tmp_path)
    assert on_disk["status"] == stopped["status"] == lifecycle.status_of_signal(signum)
    assert on_disk["resume_command"].endswith(f"ckpt_path=last hydra.run.dir={tmp_path}")
    assert signal.getsignal(signal.SIGTERM) is not lifecycle.LIFETIME._handle  # handler removed
    last = tmp_path / "checkpoints" / "last.ckpt"
    if STOPPED_AT[phase] is None:
        assert not last.exists()
        return
    assert ckpt(tmp_path)["global_step"] == STOPPED_AT[phase]
    assert on_disk["steps"] == STOPPED_AT[phase]
    assert on_disk["epochs_completed"] == STOPPED_AT[phase] // 8
    train(cfg("ckpt_path=last"), tmp_path)
    assert_same_run(tmp_path, reference)


def test_second_signal_while_writing_the_record_is_ignored(tmp_path, monkeypatch):
    write = train_mod.write_record

    def write_under_fire(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGTERM)
        return write(*args, **kwargs)
    monkeypatch.setattr(train_mod, "write_record", write_under_fire)
    rec = train(cfg("trainer.max_epochs=1"), tmp_path)
    assert rec["status"] == metrics(tmp_path)["status"] == "completed"
    assert lifecycle.LIFETIME.signum is None or not lifecycle.LIFETIME.installed


def test_ctrl_c_then_sigterm_through_the_cli(tmp_path):
    """Real signals, real process: Ctrl-C mid-training checkpoints, records `interrupted`,
    prints the resume command and exits 130; a SIGTERM 0.2 s later changes none of it."""
    cmd = [sys.executable, "-m", "sharpbench.train", *BASE, "trainer.max_epochs=50",
           f"hydra.run.dir={tmp_path}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    last = tmp_path / "checkpoints" / "last.ckpt"
    deadline = time.time() + 120
    while time.time() < deadline and not last.exists():
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-3000:]
    rec = metrics(tmp_path)
    assert rec["status"] == "interrupted" and rec["steps"] == ckpt(tmp_path)["global_step"] > 0
    assert f"ckpt_path=last hydra.run.dir={tmp_path}" in out
    assert "Traceback" not in out


def test_a_signal_while_the_folder_is_claimed_records_the_resume_command(tmp_path, monkeypatch):
    acquire = lifecycle.RunFolderLock.acquire

    def acquire_under_fire(self):
        os.kill(os.getpid(), signal.SIGTERM)
        return acquire(self)
    monkeypatch.setattr(lifecycle.RunFolderLock, "acquire", acquire_under_fire)
    from sharpbench.data import CIFARDataModule
    monkeypatch.setattr(CIFARDataModule, "prepare_data", kill)  # the stop comes before the data
    rec = train(cfg(), tmp_path, ["optimizer=sgd"])
    assert rec["status"] == metrics(tmp_path)["status"] == "preempted"
    assert metrics(tmp_path)["resume_command"].endswith(f"ckpt_path=last hydra.run.dir={tmp_path}")
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()


def test_the_signals_handled_include_usr2_and_submitits_choice(monkeypatch):
    monkeypatch.delenv(lifecycle.PREEMPT_SIGNAL_ENV, raising=False)
    assert set(lifecycle.handled_signals()) == {signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2,
                                                signal.SIGINT}
    monkeypatch.setenv(lifecycle.PREEMPT_SIGNAL_ENV, "PWR")  # as submitit reads it: without SIG
    assert signal.SIGPWR in lifecycle.handled_signals()
    assert lifecycle.status_of_signal(signal.SIGUSR2) == "preempted"
    assert lifecycle.exit_code_of_signal(signal.SIGUSR2) == 128 + signal.SIGUSR2


def test_the_stopping_signal_is_passed_on_to_the_handler_before_ours(monkeypatch):
    """Under submitit, the job process has submitit's requeue handler on USR2 before ours; after
    the run is recorded it is called. Python's own Ctrl-C handler is never called."""
    calls = []
    previous = {s: signal.getsignal(s) for s in (signal.SIGUSR2, signal.SIGINT)}
    signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    life = lifecycle.ProcessLifetime()
    try:
        life.install()
        life.phase = "fit"
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(0.05)
        assert life.signum == signal.SIGUSR2 and calls == []  # ours only noted it
        life.pass_on()
        assert calls == [signal.SIGUSR2]
        life.uninstall()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        life.install()
        life.phase = "fit"
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        life.pass_on()  # no KeyboardInterrupt
        assert life.signum == signal.SIGINT
    finally:
        life.uninstall()
        for s, h in previous.items():
            signal.signal(s, h)


FAKE_SUBMITIT = """
import os, signal, sys
from pathlib import Path
marker, record = Path(sys.argv[1]), Path(sys.argv[2]) / "metrics.json"
def checkpoint_and_try_requeue(signum, frame):  # what submitit installs in the job process
    marker.write_text(f"requeued {signal.Signals(signum).name}; record first: {record.exists()}")
    sys.exit(-1)  # submitit's exit after requeueing
signal.signal(signal.SIGUSR2, checkpoint_and_try_requeue)
signal.signal(signal.SIGTERM, lambda signum, frame: None)  # submitit's bypass
sys.argv = ["sharpbench.train", *sys.argv[3:]]
from sharpbench.train import main
main()
"""


def test_usr2_under_a_fake_submitit_stops_cleanly_then_requeues(tmp_path):
    run, marker = tmp_path / "run", tmp_path / "requeued"
    env = dict(ENV, SUBMITIT_PREEMPT_SIGNAL="USR2", SLURM_JOB_ID="4242")
    proc = subprocess.Popen([sys.executable, "-c", FAKE_SUBMITIT, str(marker), str(run), *BASE,
                             "trainer.max_epochs=50", f"hydra.run.dir={run}"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last = run / "checkpoints" / "last.ckpt"
    deadline = time.time() + 120
    while time.time() < deadline and not last.exists():
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR2)
    out, _ = proc.communicate(timeout=120)
    assert marker.read_text() == "requeued SIGUSR2; record first: True", out[-3000:]
    assert proc.returncode == 255, out[-3000:]  # submitit's sys.exit(-1): it requeued the job
    rec = metrics(run)
    assert rec["status"] == "preempted" and rec["steps"] == ckpt(run)["global_step"] > 0
    assert rec["resume_command"].endswith(f"ckpt_path=last hydra.run.dir={run}")
    assert "Traceback" not in out


def catches(pid, signum):
    """Whether process ``pid`` has a handler installed for ``signum`` (Linux /proc)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(mask >> (signum - 1) & 1)


EARLY = {  # when the SIGTERM is sent: after the handler is installed (while importing) + seconds,
    "imports+0": 0.0, "imports+0.4": 0.4, "imports+1.5": 1.5, "imports+4": 4.0,
    "lock": "lock",  # or the moment the run folder's lock file appears
}


@pytest.mark.slow  # about 5 start-ups of the CLI (a minute on a loaded 2-core machine)
def test_early_signals_never_crash_nor_are_lost(tmp_path):
    """SIGTERM while ``python -m sharpbench.train`` imports its libraries, composes, claims the
    folder: always exit 143, no traceback, never a run that goes on; after the folder is
    claimed, a record with the resume command."""
    for name, when in EARLY.items():
        run = tmp_path / name
        proc = subprocess.Popen([sys.executable, "-m", "sharpbench.train", *BASE,
                                 f"hydra.run.dir={run}"], cwd=ROOT, env=ENV,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 120
        if when == "lock":
            while time.time() < deadline and not (run / lifecycle.LOCK_FILE).exists():
                time.sleep(0.002)
        else:
            while time.time() < deadline and not catches(proc.pid, signal.SIGTERM):
                time.sleep(0.002)
            time.sleep(when)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 143, f"{name}: {out[-3000:]}"
        assert "Traceback" not in out and "Error" not in out, f"{name}: {out[-3000:]}"
        if "before the run started" in out:
            assert not (run / "metrics.json").exists(), name
        else:
            rec = metrics(run)
            assert rec["status"] == "preempted" and "resume_command" in rec, name
        if when == "lock":
            assert "resume_command" in metrics(run)


# ---------------------------------------------------------------------------- divergence
def test_late_divergence_keeps_the_last_finite_checkpoint_and_no_accuracy(tmp_path, monkeypatch):
    """Weights turn NaN in epoch 1 (step 10); the divergence is found by the module's check or,
    when that comes later, by the checkpoint's own finiteness check at step 12."""
    def poison(trainer):
        with torch.no_grad():
            next(trainer.lightning_module.parameters()).fill_(float("nan"))
    inject(monkeypatch, At("on_train_batch_end", poison, lambda t: t.global_step == 10))
    rec = train(cfg("trainer.log_every_n_steps=50"), tmp_path)
    assert rec["status"] == metrics(tmp_path)["status"] == "diverged"
    assert "diverged" in rec["error"]
    for key in ("test_acc", "test_loss"):
        assert rec[key] is None and metrics(tmp_path)[key] is None
    saved = ckpt(tmp_path)
    assert saved["global_step"] == 8  # the end of epoch 0, not the NaN weights of step 12
    assert not runtime.non_finite_tensors(saved)


def test_a_non_finite_checkpoint_is_never_written(tmp_path):
    io = runtime.AtomicCheckpointIO()
    good = {"state_dict": {"w": torch.ones(3)}, "optimizer_states": [{"state": {0: {"m": torch.zeros(3)}}}],
            "global_step": 8}
    path = tmp_path / "last.ckpt"
    io.save_checkpoint(good, path)
    before = path.read_bytes()
    bad = {**good, "optimizer_states": [{"state": {0: {"m": torch.tensor([0.0, float("nan"), 0.0])}}}],
           "global_step": 12}
    with pytest.raises(runtime.NonFiniteCheckpoint, match=r"optimizer_states.0.state.0.m"):
        io.save_checkpoint(bad, path)
    assert path.read_bytes() == before and not list(tmp_path.glob("*.tmp"))
    io.save_checkpoint({**good, "global_step": 16}, path)  # the good one becomes last.prev.ckpt
    assert torch.load(tmp_path / "last.prev.ckpt", weights_only=False)["global_step"] == 8


def test_a_non_finite_checkpoint_on_disk_is_not_resumed(tmp_path, reference):
    shutil.copytree(reference[0] / "checkpoints", tmp_path / "checkpoints")
    bad = ckpt(tmp_path)
    next(iter(bad["state_dict"].values())).fill_(float("inf"))
    torch.save(bad, tmp_path / "checkpoints" / "last.ckpt")  # as older versions could leave it
    path, loaded = runtime.resolve_ckpt_path("last", tmp_path)
    assert path.endswith("last.prev.ckpt") and not runtime.non_finite_tensors(loaded)


# --------------------------------------------------------------------- config before resume
@pytest.fixture
def finished(tmp_path, reference):
    run = tmp_path / "run"
    shutil.copytree(reference[0], run)
    return run, (run / "metrics.json").read_bytes(), (run / "checkpoints" / "last.ckpt").read_bytes()


def test_changed_config_is_refused_and_the_folder_left_alone(finished):
    run, record_bytes, ckpt_bytes = finished
    with pytest.raises(IdentityMismatch) as err:
        train(cfg("optimizer.lr=0.5", "ckpt_path=last"), run)
    assert "optimizer.lr: 0.05 -> 0.5" in str(err.value)
    assert "another folder" in str(err.value) and "delete that folder" in str(err.value)
    assert (run / "metrics.json").read_bytes() == record_bytes
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == ckpt_bytes
    # the failure is recorded beside the completed record, never over it
    where = write_failure(cfg("optimizer.lr=0.5", "ckpt_path=last"), run, "invalid_config", str(err.value))
    assert where == run / "metrics.invalid_config.json"
    assert (run / "metrics.json").read_bytes() == record_bytes


def test_a_preempted_checkpoint_of_another_config_is_refused(finished):
    run, _, _ = finished
    (run / "metrics.json").unlink()
    with pytest.raises(IdentityMismatch, match=r"checkpoint .*last.ckpt.*trainer.max_epochs: 2 -> 3"):
        train(cfg("trainer.max_epochs=3", "ckpt_path=last"), run)


def without_identity(run):
    """The folder's checkpoint as older versions wrote it: no run identity, no code segments."""
    path = run / "checkpoints" / "last.ckpt"
    old = torch.load(path, weights_only=False)
    for key in (CHECKPOINT_KEY, runtime.SEGMENTS_KEY):
        old.pop(key, None)
    torch.save(old, path)
    (run / "checkpoints" / "last.prev.ckpt").unlink()
    (run / "metrics.json").unlink()


@pytest.mark.parametrize("change", ["optimizer=sam", "++model.width=8"])
def test_an_old_checkpoint_of_another_model_or_optimizer_is_refused_with_a_message(finished, change):
    run, _, _ = finished
    without_identity(run)
    with pytest.raises(IdentityMismatch, match=r"no stored run identity .*does not fit") as err:
        train(cfg("trainer.max_epochs=3", "ckpt_path=last", change), run)
    assert ("optimizer 'sgd'" if change == "optimizer=sam" else "of shape") in str(err.value)
    assert not (run / "metrics.json").exists()


def test_an_old_checkpoint_that_fits_is_resumed(finished, caplog):
    run, _, _ = finished
    without_identity(run)
    rec = train(cfg("trainer.max_epochs=3", "ckpt_path=last"), run)
    assert rec["status"] == "completed" and rec["steps"] == 24
    assert "no stored run identity" in caplog.text
    assert rec["code_segments"][0] == {"code_version": None, "from_step": 0}
    assert rec["continued_by_other_code"] is True


def test_a_run_continued_by_other_code_says_so(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(record, "code_version", lambda: "git:old")
    inject(monkeypatch, At("on_train_batch_start", kill, lambda t: t.global_step == 10))
    with pytest.raises(Kill):
        train(cfg(), tmp_path)
    monkeypatch.undo()
    monkeypatch.setattr(record, "code_version", lambda: "git:new")
    rec = train(cfg("ckpt_path=last"), tmp_path)
    assert [(s["code_version"], s["from_step"]) for s in rec["code_segments"]] == [("git:old", 0),
                                                                                  ("git:new", 8)]
    assert rec["continued_by_other_code"] is True and metrics(tmp_path)["continued_by_other_code"]
    assert "trained up to step 8 by git:old and continues with git:new" in caplog.text
    same = train(cfg(), tmp_path / "again")
    assert same["continued_by_other_code"] is False and len(same["code_segments"]) == 1


def test_data_location_is_not_part_of_the_identity(finished, reference):
    run, record_bytes, _ = finished
    rec = train(cfg("dataset.root=/elsewhere", "ckpt_path=last"), run)
    assert rec == reference[1] and (run / "metrics.json").read_bytes() == record_bytes


def test_the_removed_ways_on_are_refused_with_the_ways_out(finished):
    """on_config_change=new_folder and extend were dropped: a changed config is refused."""
    run, record_bytes, _ = finished
    for mode in ("new_folder", "extend"):
        with pytest.raises(ConfigError, match=f"on_config_change={mode} was removed.*another folder"):
            train(cfg("trainer.max_epochs=3", "ckpt_path=last", f"on_config_change={mode}"), run)
    assert (run / "metrics.json").read_bytes() == record_bytes
    assert not list(run.parent.glob("run+*"))


# ------------------------------------------------------------------------ one folder, one process
HOLD = """
import sys, time
from pathlib import Path
from sharpbench.lifecycle import RunFolderLock
lock = RunFolderLock(Path(sys.argv[1])).acquire()
print("locked", flush=True)
time.sleep(120)
"""


@pytest.fixture
def held(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], cwd=ROOT, env=ENV,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    yield tmp_path, holder
    holder.kill()
    holder.wait()


def test_a_second_process_is_refused_naming_the_holder(held):
    run, holder = held
    with pytest.raises(lifecycle.RunFolderBusy) as err:
        train(cfg(), run)
    assert f"process {holder.pid} on host" in str(err.value)
    assert not (run / "metrics.json").exists() and not (run / "checkpoints" / "last.ckpt").exists()


def test_a_second_process_through_the_cli(held):
    run, holder = held
    out = subprocess.run([sys.executable, "-m", "sharpbench.train", *BASE, f"hydra.run.dir={run}"],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr[-2000:]
    assert f"in use by process {holder.pid}" in out.stdout + out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    assert not (run / "metrics.json").exists()


def test_a_busy_folder_with_a_checkpoint_does_not_say_resuming(tmp_path):
    """The second process is refused before it says "resuming from": only the process that
    holds the folder resumes it."""
    run = tmp_path / "run"
    train(cfg("ckpt_path=last"), run)
    (run / "metrics.json").unlink()  # as if stopped after its last checkpoint
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], cwd=ROOT, env=ENV,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        out = subprocess.run([sys.executable, "-m", "sharpbench.train", *BASE, "ckpt_path=last",
                              f"hydra.run.dir={run}"], cwd=ROOT, env=ENV, capture_output=True,
                             text=True, timeout=120)
    finally:
        holder.kill()
        holder.wait()
    text = out.stdout + out.stderr
    assert out.returncode == 1 and f"in use by process {holder.pid}" in text, text[-2000:]
    assert "resuming from" not in text
    out = subprocess.run([sys.executable, "-m", "sharpbench.train", *BASE, "ckpt_path=last",
                          f"hydra.run.dir={run}"], cwd=ROOT, env=ENV, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "resuming from" in out.stdout + out.stderr, out.stderr[-2000:]


def test_the_lock_is_released_at_exit(tmp_path):
    with lifecycle.RunFolderLock(tmp_path):
        pass
    with lifecycle.RunFolderLock(tmp_path):  # a kill -9 releases it too (the kernel does)
        pass


# ---------------------------------------------------------------------------------- disks
class FullDisk:
    """From ``fill()`` on, a checkpoint never fits on the run's disk; a small record still does,
    unless ``nothing_fits``. ``torch_error``: torch's zip writer fails the way it does on a real
    full disk (``RuntimeError ... unexpected pos``) instead of with ``OSError``."""

    def __init__(self, monkeypatch, folder, torch_error=False):
        self.folder, self.full, self.nothing_fits = Path(folder), False, False
        save, write = runtime.torch.save, record.atomic_write_text

        def save_on_disk(obj, f, *args, **kwargs):
            if self.full:
                if torch_error:
                    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(getattr(f, "name", f)))
            return save(obj, f, *args, **kwargs)

        def write_on_disk(path, text, **kwargs):
            if self.full and self.nothing_fits and Path(path).is_relative_to(self.folder):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            return write(path, text, **kwargs)
        monkeypatch.setattr(runtime.torch, "save", save_on_disk)
        monkeypatch.setattr(record, "atomic_write_text", write_on_disk)

    def fill(self, *_):
        self.full = True


@pytest.mark.parametrize("torch_error", [False, True], ids=["ENOSPC", "unexpected_pos"])
def test_full_disk_keeps_the_checkpoint_and_says_disk_full(tmp_path, monkeypatch, torch_error):
    disk = FullDisk(monkeypatch, tmp_path, torch_error)
    inject(monkeypatch, At("on_train_batch_end", disk.fill, lambda t: t.global_step == 10))
    with pytest.raises(runtime.DiskFull) as err:
        train(cfg(), tmp_path)
    assert err.value.errno == errno.ENOSPC and "disk full" in str(err.value)
    assert "last.ckpt keeps the last one written" in str(err.value)
    where = write_failure(cfg(), tmp_path, "failed", f"disk full: {err.value.strerror}")  # as main()
    assert where == tmp_path / "metrics.json"
    rec = metrics(tmp_path)
    assert rec["status"] == "failed" and "disk full" in rec["error"]
    assert ckpt(tmp_path)["global_step"] == 8 and not runtime.non_finite_tensors(ckpt(tmp_path))
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


def test_record_goes_to_the_fallback_folder_when_nothing_fits(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    run.mkdir()
    disk = FullDisk(monkeypatch, run)
    disk.nothing_fits = True
    disk.fill()
    monkeypatch.setenv("SHARPBENCH_FALLBACK_DIR", str(tmp_path / "fallback"))
    where = record.write_record(run, {"status": "failed", "error": "disk full"})
    assert where.parent == tmp_path / "fallback" and json.loads(where.read_text())["status"] == "failed"
    assert "the disk is full" in capsys.readouterr().err


def test_unwritable_run_folder_is_found_at_startup(tmp_path, monkeypatch):
    """A read-only checkpoints/ (simulated: tests may run as root) stops the run before any
    data is loaded, not after an epoch."""
    import tempfile
    (tmp_path / "checkpoints").mkdir()  # left by an earlier run, now read-only
    mkstemp = tempfile.mkstemp

    def read_only(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).name == "checkpoints":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dir))
        return mkstemp(*args, dir=dir, **kwargs)
    monkeypatch.setattr(lifecycle.tempfile, "mkstemp", read_only)
    from sharpbench.data import CIFARDataModule
    monkeypatch.setattr(CIFARDataModule, "prepare_data", kill)  # reaching the data is too late
    with pytest.raises(lifecycle.StartupError, match=r"cannot write to .*checkpoints \(Permission denied\)"):
        train(cfg(), tmp_path)


# ---------------------------------------------------------------------------------- sweeps
def job(sweep_dir, name, status, since, beside=None):
    folder = sweep_dir / name
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("[]\n")
    if status:
        (folder / "metrics.json").write_text(json.dumps({"status": status}))
        os.utime(folder / "metrics.json", (since - 100, since - 100))
    if beside:
        (folder / f"metrics.{beside}.json").write_text(json.dumps({"status": beside}))


def test_multirun_exit_status_counts_every_status(tmp_path, capsys):
    from omegaconf import OmegaConf
    callback = sweep_status.ExitStatusOnMultirunEnd()
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    old = tmp_path / "from_an_earlier_sweep"
    job(tmp_path, old.name, "failed", time.time())
    os.utime(old / ".hydra" / "overrides.yaml", (1, 1))
    callback.on_multirun_start(config)
    since = time.time()
    for i, status in enumerate(["completed", "completed", "failed", "diverged", "invalid_config"]):
        job(tmp_path, f"j{i}", status, since)
    job(tmp_path, "refused", "completed", since, beside="invalid_config")  # kept a completed record
    job(tmp_path, "killed", None, since)
    with pytest.raises(SystemExit) as exit_:
        callback.on_multirun_end(config)
    assert exit_.value.code == 1
    line = capsys.readouterr().out
    assert "7 jobs: 2 completed, 2 invalid_config, 1 diverged, 1 failed, 1 no_record" in line
    for folder in tmp_path.iterdir():
        if folder.name.startswith(("j2", "j3", "j4", "refused", "killed")):
            shutil.rmtree(folder)
    callback.on_multirun_end(config)  # all completed: no exit
    assert "2 jobs: 2 completed" in capsys.readouterr().out


# ------------------------------------------------------------------------------ data paths
def test_home_in_dataset_root_is_expanded_for_reading_and_cache(tmp_path, monkeypatch):
    from sharpbench.data import CIFARDataModule
    try:
        from cifar_fixtures import write_cifar_python
    except ImportError:
        from tests.cifar_fixtures import write_cifar_python
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    write_cifar_python(tmp_path / "home" / "x", "cifar10", 200, 50)
    data = CIFARDataModule(name="cifar10", root="~/x", format="python", batch_size=4)
    data.prepare_data()
    data.setup("fit")
    assert (tmp_path / "home" / "x" / ".sharpbench_cache").is_dir()
    assert not (tmp_path / "~").exists()


# ----------------------------------------------------------------------- a killed sweep launcher
def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in state  # a zombie has exited


def test_killing_the_joblib_launcher_stops_its_workers_with_records(tmp_path):
    """kill -9 of a local_parallel sweep's launcher: each worker stops its job at a safe point
    (checkpoint, record with the resume command) and exits, instead of training on unwatched."""
    sweep = tmp_path / "sweep"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "sharpbench.train", "-m", "hydra/launcher=local_parallel",
         "hydra.launcher.n_jobs=2", "experiment=smoke", "trainer.max_epochs=500",
         "trainer.enable_progress_bar=false", "seed=0,1", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while len(list(sweep.glob("*/checkpoints/last.ckpt"))) < 2:
            assert time.time() < deadline and launcher.poll() is None, "the jobs did not start"
            time.sleep(0.5)
        workers = [int(p) for p in subprocess.run(["pgrep", "-P", str(launcher.pid)],
                                                  capture_output=True, text=True).stdout.split()]
        assert workers
    finally:
        launcher.kill()
        launcher.wait()
    deadline = time.time() + 60
    while any(alive(p) for p in workers) and time.time() < deadline:
        time.sleep(0.5)
    assert not any(alive(p) for p in workers), "workers outlived their launcher"
    for job in sorted(sweep.glob("seed=*")):
        rec = json.loads((job / "metrics.json").read_text())
        assert rec["status"] == "preempted" and "ckpt_path=last" in rec["resume_command"], rec
        assert 0 < rec["epochs_completed"] < 500

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
from sharpbench.run_identity import IdentityMismatch, identity, identity_hash
from sharpbench.train import train, write_failure

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
    write = lifecycle.write_record

    def write_under_fire(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGTERM)
        return write(*args, **kwargs)
    monkeypatch.setattr(lifecycle, "write_record", write_under_fire)
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
    assert "optimizer.lr: 0.05 -> 0.5" in str(err.value) and "on_config_change=new_folder" in str(err.value)
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


def test_data_location_is_not_part_of_the_identity(finished, reference):
    run, record_bytes, _ = finished
    rec = train(cfg("dataset.root=/elsewhere", "ckpt_path=last"), run)
    assert rec == reference[1] and (run / "metrics.json").read_bytes() == record_bytes


def test_new_folder_on_request(finished):
    run, record_bytes, _ = finished
    rec = train(cfg("optimizer.lr=0.5", "trainer.max_epochs=1", "ckpt_path=last",
                    "on_config_change=new_folder"), run)
    fresh = run.with_name(f"run+{rec['config_hash'][:8]}")
    assert metrics(fresh)["config"]["optimizer"]["lr"] == 0.5 and rec["steps"] == 8
    assert (run / "metrics.json").read_bytes() == record_bytes


def test_extend_continues_for_more_epochs_under_its_own_identity(finished, reference):
    run, _, _ = finished
    with pytest.raises(IdentityMismatch, match="on_config_change=extend"):
        train(cfg("trainer.max_epochs=3", "ckpt_path=last"), run)
    rec = train(cfg("trainer.max_epochs=3", "ckpt_path=last", "on_config_change=extend"), run)
    assert rec["status"] == "completed" and rec["steps"] == 24 and rec["epochs_completed"] == 3
    assert rec["config"]["continued_from"] == {"epochs": 2, "config_hash": reference[1]["config_hash"]}
    fresh_three = identity_hash(identity(cfg("trainer.max_epochs=3")))
    assert rec["config_hash"] != fresh_three  # never averaged with a run planned for 3 epochs
    again = train(cfg("trainer.max_epochs=3", "ckpt_path=last", "on_config_change=extend"), run)
    assert again == rec  # re-running the same command skips the completed continuation


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


def test_the_lock_is_released_at_exit(tmp_path):
    with lifecycle.RunFolderLock(tmp_path):
        pass
    with lifecycle.RunFolderLock(tmp_path):  # a kill -9 releases it too (the kernel does)
        pass


# ---------------------------------------------------------------------------------- disks
class FullDisk:
    """From ``fill()`` on, every write fails with ENOSPC, except that deleting the run's reserve
    file (if it was there when the disk filled up) frees that much space."""

    def __init__(self, monkeypatch, folder):
        self.folder = Path(folder)
        self.reserve, self.full, self.freeable = self.folder / lifecycle.RESERVE_FILE, False, False
        save, write = runtime.torch.save, record.atomic_write_text

        def checked(path, nbytes):
            freed = self.freeable and not self.reserve.exists()
            if self.full and not (freed and nbytes <= lifecycle.RESERVE_BYTES):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

        def save_on_disk(obj, f, *args, **kwargs):
            checked(f, 1 << 30)  # a checkpoint never fits
            return save(obj, f, *args, **kwargs)

        def write_on_disk(path, text):
            if Path(path).is_relative_to(self.folder):  # another disk is not full
                checked(path, len(text.encode()))
            return write(path, text)
        monkeypatch.setattr(runtime.torch, "save", save_on_disk)
        monkeypatch.setattr(record, "atomic_write_text", write_on_disk)

    def fill(self, *_):
        self.full, self.freeable = True, self.reserve.exists()


def test_full_disk_keeps_the_checkpoint_and_records_the_failure(tmp_path, monkeypatch):
    disk = FullDisk(monkeypatch, tmp_path)
    inject(monkeypatch, At("on_train_batch_end", disk.fill, lambda t: t.global_step == 10))
    with pytest.raises(OSError) as err:
        train(cfg(), tmp_path)
    assert err.value.errno == errno.ENOSPC
    where = write_failure(cfg(), tmp_path, "failed", f"OSError: {err.value}")  # what main() does
    assert where == tmp_path / "metrics.json"
    rec = metrics(tmp_path)
    assert rec["status"] == "failed" and "No space left" in rec["error"]
    assert ckpt(tmp_path)["global_step"] == 8 and not runtime.non_finite_tensors(ckpt(tmp_path))
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


def test_record_goes_to_the_fallback_folder_when_nothing_can_be_freed(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    FullDisk(monkeypatch, run).fill()
    monkeypatch.setenv("SHARPBENCH_FALLBACK_DIR", str(tmp_path / "fallback"))
    where = lifecycle.write_record(run, {"status": "failed", "error": "disk full"})
    assert where.parent == tmp_path / "fallback" and json.loads(where.read_text())["status"] == "failed"


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


# ------------------------------------------------------------ the folder's Hydra record
def hydra_files(run, text):
    """What Hydra writes into the job folder before sharpbench sees the config."""
    (run / ".hydra").mkdir(exist_ok=True)
    for name in ("config.yaml", "overrides.yaml"):
        (run / ".hydra" / name).write_text(f"{name}: {text}\n")


def test_a_refused_command_leaves_the_folders_hydra_record_alone(finished):
    run, _, _ = finished
    hydra_files(run, "the run that lives here")
    from sharpbench import hydra_record
    hydra_record.accept(run)                       # as when that run was accepted
    hydra_files(run, "a refused command")          # Hydra, for the next command
    with pytest.raises(IdentityMismatch):
        train(cfg("optimizer.lr=0.5", "ckpt_path=last"), run)
    assert (run / ".hydra" / "config.yaml").read_text() == "config.yaml: the run that lives here\n"
    assert (run / ".hydra" / "overrides.yaml").read_text() == "overrides.yaml: the run that lives here\n"


def test_a_moved_run_takes_its_hydra_record_and_a_new_run_keeps_one(finished, tmp_path):
    run, _, _ = finished
    hydra_files(run, "the original")
    from sharpbench import hydra_record
    hydra_record.accept(run)
    hydra_files(run, "the new config")
    rec = train(cfg("optimizer.lr=0.5", "trainer.max_epochs=1", "ckpt_path=last",
                    "on_config_change=new_folder"), run)
    fresh = run.with_name(f"run+{rec['config_hash'][:8]}")
    assert (fresh / ".hydra" / "config.yaml").read_text() == "config.yaml: the new config\n"
    assert (fresh / ".hydra" / "accepted" / "config.yaml").read_text() == "config.yaml: the new config\n"
    assert (run / ".hydra" / "config.yaml").read_text() == "config.yaml: the original\n"

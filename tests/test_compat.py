"""The private Lightning internals of ``sharpbench.compat``, checked against the installed
version: each test names what changed when a Lightning release breaks it."""
import importlib
import inspect
import signal

import lightning as L
import pytest
from hydra import compose, initialize_config_dir

import sharpbench.train as train_mod
from sharpbench import compat

try:
    from test_faults import BASE, CONF
except ImportError:
    from tests.test_faults import BASE, CONF


def test_a_graceful_stop_is_what_lightning_reads_as_received_sigterm():
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    assert hasattr(trainer, compat.SIGNAL_CONNECTOR), (
        f"Lightning {L.__version__}: Trainer.{compat.SIGNAL_CONNECTOR} is gone; "
        "compat.request_graceful_stop needs another way to stop fit after the current batch")
    assert trainer.received_sigterm is False
    compat.request_graceful_stop(trainer)
    assert trainer.received_sigterm is True, (
        f"Lightning {L.__version__}: trainer.received_sigterm no longer reads the signal "
        "connector's flag")
    from lightning.pytorch.loops import training_epoch_loop
    source = inspect.getsource(training_epoch_loop)
    assert "received_sigterm" in source and "SIGTERMException" in source, (
        f"Lightning {L.__version__}: the training loop no longer stops on received_sigterm")


def test_lightning_installs_and_restores_its_sigterm_handler_around_fit():
    """Why StopAtSafePoint re-installs ours at on_train_start/on_test_start: Lightning replaces
    the SIGTERM handler when fit/test starts and puts the previous one back afterwards."""
    from lightning.pytorch.trainer.connectors import signal_connector
    source = inspect.getsource(signal_connector._SignalConnector)
    assert "signal.signal" in source and "teardown" in source, (
        f"Lightning {L.__version__} changed how it installs signal handlers; check "
        "runtime.StopAtSafePoint and signals.ProcessLifetime.reassert")


@pytest.mark.parametrize("name", compat.LAUNCHER_MODULES)
def test_the_ddp_child_command_builder_is_where_compat_replaces_it(name):
    module = importlib.import_module(name)
    builder = getattr(module, compat.CHILD_COMMAND, None)
    assert callable(builder), f"{name}.{compat.CHILD_COMMAND} is gone (Lightning {L.__version__})"
    assert list(inspect.signature(builder).parameters) == ["local_rank"], (
        f"{name}.{compat.CHILD_COMMAND} takes other arguments now")
    launcher = importlib.import_module("lightning.pytorch.strategies.launchers.subprocess_script")
    assert compat.CHILD_COMMAND in inspect.getsource(launcher._SubprocessScriptLauncher), (
        "Lightning's subprocess launcher no longer builds its children's command with "
        f"{compat.CHILD_COMMAND}: sharpbench.ddp_launch would not take effect")
    calls = []
    patched = compat.replace_child_command(lambda local_rank: calls.append(local_rank))
    try:
        getattr(module, compat.CHILD_COMMAND)(3)
        assert calls == [3]
    finally:
        compat.restore_child_command(patched)
    assert getattr(module, compat.CHILD_COMMAND) is builder


class CompareLoggingRule(L.Callback):
    """At every training batch end: compat.is_logging_step against Lightning's private rule."""

    def __init__(self):
        self.steps, self.logged = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        private = trainer._logger_connector.should_update_logs
        self.steps.append(trainer.global_step)
        self.logged.append(private)
        self.every = trainer.log_every_n_steps
        assert compat.is_logging_step(trainer) == private, (
            f"step {trainer.global_step}: Lightning {L.__version__} logs "
            f"{'' if private else 'not '}here, compat.is_logging_step disagrees")


class Stop(BaseException):
    pass


def test_is_logging_step_agrees_with_lightning_on_every_step_and_after_a_resume(tmp_path, monkeypatch):
    def cfg(*overrides):
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            # 64 steps in one epoch: a log interval of 3 is kept (run_logging.dense_log_interval)
            return compose(config_name="train", overrides=BASE + [
                "trainer.log_every_n_steps=3", "dataset.train_subset=128", "dataset.batch_size=2",
                "trainer.max_epochs=1", "trainer.checkpoint_every_n_steps=5", *overrides])
    build = train_mod.build_trainer
    compare = CompareLoggingRule()

    class KillAt(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 22:  # resumed from the checkpoint of step 20
                raise Stop()

    def build_with(*args, **kwargs):
        trainer = build(*args, **kwargs)
        trainer.callbacks.extend([compare, KillAt()])
        return trainer
    monkeypatch.setattr(train_mod, "build_trainer", build_with)
    with pytest.raises(Stop):
        train_mod.train(cfg(), tmp_path)
    monkeypatch.setattr(train_mod, "build_trainer",
                        lambda *a, **k: (lambda t: (t.callbacks.append(compare), t)[1])(build(*a, **k)))
    rec = train_mod.train(cfg("ckpt_path=last"), tmp_path)
    assert rec["status"] == "completed"
    assert compare.every == 3 and compare.steps[0] == 1 and compare.steps[-1] == 64
    assert compare.steps.count(21) == 2  # trained before the kill and again after the resume
    assert any(compare.logged) and not all(compare.logged)

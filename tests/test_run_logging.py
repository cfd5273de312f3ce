"""What the loggers receive: every step of a short epoch, lr/passes/time per logged step, train
accuracy per epoch, the config as hyperparameters, final numbers in TensorBoard and W&B, the
in-training evaluation named "test"; the end-of-epoch checkpoint holds the final epoch's loss."""
import json
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from sharpbench.run_logging import (EvalProgressBar, dense_log_interval, finish_loggers,
                                    log_hyperparameters)
from sharpbench.train import train


def test_dense_log_interval():
    assert dense_log_interval(50, 39) == 1       # a 39-step epoch: every step (was 1 point)
    assert dense_log_interval(50, 391) == 19     # CIFAR at batch 128: 20 points per epoch
    assert dense_log_interval(10, 10_000) == 10  # long epochs keep the configured interval


@pytest.mark.parametrize("names, text", [(["test"], "Test"), (["val", "test"], "Evaluation (val + test)")])
def test_progress_bar_names_the_evaluation_after_its_split(names, text):
    bar = EvalProgressBar()
    bar._trainer = SimpleNamespace(datamodule=SimpleNamespace(eval_names=names))
    assert bar.validation_description == text


def test_a_short_run_logs_every_step_its_config_and_finals(compose_cfg, tmp_path):
    cfg = compose_cfg(["experiment=smoke", "optimizer=sam", "trainer.max_epochs=2",
                       "trainer.log_every_n_steps=50", "dataset.train_subset=256",
                       "dataset.test_subset=128", "trainer.enable_progress_bar=false",
                       "logger=tensorboard"])
    record = train(cfg, tmp_path, [])
    log = pd.read_csv(tmp_path / "csv" / "metrics.csv")
    steps = log.dropna(subset=["train/loss_step"])
    assert len(steps) == record["steps"] == 8  # 4-step epochs, every step logged
    for column in ("train/lr", "train/passes", "train/time_s"):
        assert log[column].notna().sum() == 8, column
    assert list(log.dropna(subset=["train/passes"])["train/passes"]) == [2.0 * (i + 1) for i in range(8)]
    lrs = log.dropna(subset=["train/lr"])["train/lr"].to_numpy()
    assert lrs[0] == pytest.approx(cfg.optimizer.lr) and lrs[-1] < lrs[0]  # the lr each step used
    assert log["train/acc"].notna().sum() == 2 and record["train_acc"] is not None
    # the epoch mean, from the module's own sum (Lightning's per-step accumulation is not used)
    epochs = log.dropna(subset=["train/loss_epoch"])["train/loss_epoch"].to_numpy()
    assert len(epochs) == 2 and epochs[-1] == pytest.approx(record["train_loss"])
    assert epochs[0] == pytest.approx(steps["train/loss_step"].to_numpy()[:4].mean(), rel=1e-5)
    # timing: training and evaluation apart, both recorded
    assert record["eval_time_s"] > 0 and len(record["eval_times_s"]) == 2
    assert record["wall_time_s"] == pytest.approx(sum(record["epoch_times_s"]))
    # the end-of-epoch checkpoint holds the last epoch's values (was the epoch before)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["sharpbench"]["train_loss_epoch"] == record["train_loss"]
    assert ckpt["sharpbench"]["train_acc_epoch"] == record["train_acc"]
    # hyperparameters: the resolved config (was {}), and the finals in the HPARAMS tab
    assert "name: sam" in (tmp_path / "csv" / "hparams.yaml").read_text()
    assert "max_epochs: 2" in (tmp_path / "tensorboard" / "hparams.yaml").read_text()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert events.Scalars("final/test_acc")[-1].value == pytest.approx(record["test_acc"])
    # each evaluation once: two in-training points, the final test (same weights, same step)
    # not logged again (it was: a third test/acc point at the last step)
    for tag in ("test/acc", "test/loss"):
        points = events.Scalars(tag)
        assert len(points) == 2 and len({p.step for p in points}) == 2, (tag, points)
    assert events.Scalars("test/acc")[-1].value == pytest.approx(record["test_acc"])
    plugin = events.PluginTagToContent("hparams")
    assert plugin and any(b"optimizer/name" in v for v in plugin.values())


def test_wandb_run_gets_the_config_and_the_final_numbers(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    from lightning.pytorch.loggers import WandbLogger
    logger = WandbLogger(project="sharpbench-test", save_dir=str(tmp_path), offline=True)
    config = {"optimizer": {"name": "sam", "rho": 0.05}, "seed": 3}
    log_hyperparameters([logger], config)
    run = logger.experiment
    assert run.config["optimizer"] == {"name": "sam", "rho": 0.05} and run.config["seed"] == 3
    finished = []
    real_finish = run.finish
    monkeypatch.setattr(run, "finish", lambda *a, **k: finished.append(True))
    finish_loggers([logger], {"test_acc": 91.5, "wall_time_s": 12.0, "status": "completed",
                              "config": config}, config)
    assert run.summary["test_acc"] == 91.5 and run.summary["wall_time_s"] == 12.0
    assert run.summary["status"] == "completed"
    assert finished  # closed, so a sweep's next job starts its own W&B run
    real_finish()


def test_tensorboard_and_wandb_take_each_evaluation_once(monkeypatch):
    from sharpbench.lifecycle import LIFETIME
    from sharpbench.run_logging import log_each_point_once
    calls = {}

    def fake(kind):
        def log_metrics(self, metrics, step=None):
            calls.setdefault(kind, []).append((dict(metrics), step))
        return type(kind, (), {"log_metrics": log_metrics, "log_hyperparams": lambda self, *a, **k: None})()

    tb, wb, csv = fake("TensorBoardLogger"), fake("WandbLogger"), fake("CSVLogger")
    log_hyperparameters([tb, wb, csv], {})
    log_each_point_once([tb])  # a second call does not wrap twice
    trainer = SimpleNamespace(testing=False)
    monkeypatch.setattr(LIFETIME, "trainer", trainer)
    for logger in (tb, wb, csv):
        trainer.testing = False
        logger.log_metrics({"test/acc": 40.0, "epoch": 0}, step=3)                # epoch 1's evaluation
        logger.log_metrics({"test/acc": 50.0, "test/loss": 1.0, "epoch": 1}, step=7)  # epoch 2's
        logger.log_metrics({"test/acc": 50.0, "train/x": 2.0, "epoch": 1}, step=7)   # again at step 7
        trainer.testing = True   # trainer.test after fit: the same weights, logged at step 8
        logger.log_metrics(metrics={"test/acc": 50.0, "test/loss": 1.0, "epoch": 2}, step=8)
    expected = [({"test/acc": 40.0, "epoch": 0}, 3), ({"test/acc": 50.0, "test/loss": 1.0, "epoch": 1}, 7),
                ({"train/x": 2.0, "epoch": 1}, 7)]
    assert calls["TensorBoardLogger"] == expected and calls["WandbLogger"] == expected
    assert len(calls["CSVLogger"]) == 4  # the CSV keeps every row (curves reads it)
    # a final test after an epoch that was not evaluated is logged
    trainer.testing = True
    tb.log_metrics({"test/acc": 55.0, "epoch": 3}, step=16)
    assert calls["TensorBoardLogger"][-1] == ({"test/acc": 55.0, "epoch": 3}, 16)


def test_lightning_log_is_called_on_logging_steps_only(compose_cfg, tmp_path, monkeypatch):
    """``LightningModule.log`` costs about a millisecond of Python a call: off logging steps the
    training step makes none (a 391-step CIFAR epoch logs every 19 steps)."""
    from sharpbench.module import SharpnessModule
    calls = []
    original = SharpnessModule.log

    def counting_log(self, name, *args, **kwargs):
        if self.trainer.training and not self.trainer.sanity_checking:
            calls.append((self.global_step, name))
        return original(self, name, *args, **kwargs)

    monkeypatch.setattr(SharpnessModule, "log", counting_log)
    cfg = compose_cfg(["experiment=smoke", "optimizer=sam", "trainer.max_epochs=1",
                       "trainer.log_every_n_steps=3", "dataset.train_subset=512",
                       "dataset.batch_size=8", "dataset.test_subset=64",
                       "trainer.enable_progress_bar=false"])
    train(cfg, tmp_path, [])
    per_step = {}
    for step, name in calls:
        per_step.setdefault(step, []).append(name)
    step_names = {s: n for s, n in per_step.items() if "train/loss_step" in n}
    assert sorted(step_names) == list(range(3, 64, 3))  # 64 steps, logged every 3rd
    assert sorted(per_step) == sorted(step_names) + [64]   # + the epoch-end values
    assert all(set(n) <= {"train/loss_step", "train/lr", "train/passes", "loss", "train/time_s"}
               for n in step_names.values()), step_names


def test_a_run_that_raises_closes_its_wandb_run_as_failed(compose_cfg, tmp_path, monkeypatch):
    """An unexpected error inside fit: the W&B run is finished with exit code 1, then the error
    propagates (it was left "running")."""
    import sharpbench.train as train_module
    finished = []

    class WandbLogger:                      # what run_logging recognises, by class name
        def __init__(self):
            self.experiment = SimpleNamespace(finish=lambda exit_code=0: finished.append(exit_code))

        def log_hyperparams(self, *args, **kwargs):
            pass

    from sharpbench.run_logging import abort_loggers
    abort_loggers([WandbLogger(), object()])
    assert finished == [1]

    def broken_fit(*args, **kwargs):
        raise RuntimeError("boom")

    real_build = train_module.build_trainer

    def build_with_fake_wandb(*args, **kwargs):
        trainer = real_build(*args, **kwargs)
        trainer.fit = broken_fit
        monkeypatch.setattr(type(trainer), "loggers", property(lambda self: [WandbLogger()]))
        return trainer

    monkeypatch.setattr(train_module, "build_trainer", build_with_fake_wandb)
    cfg = compose_cfg(["experiment=smoke", "trainer.enable_progress_bar=false"])
    with pytest.raises(RuntimeError, match="boom"):
        train(cfg, tmp_path, [])
    assert finished == [1, 1]

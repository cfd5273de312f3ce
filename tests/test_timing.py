"""Training and evaluation are timed apart; partial epochs are timed; an end-of-epoch checkpoint
holds that epoch's values. Toy modules whose costs are known (sleeps), no data, CPU."""
import time

import lightning as L
import pytest
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader, TensorDataset

from sharpbench.record import RunTimer
from sharpbench.runtime import AtomicCheckpointIO, LastCheckpoint

TRAIN_STEP_S = 0.1   # per training batch, 3 batches per epoch
EVAL_S = 1.0         # one evaluation batch per epoch


def loader(n):
    return DataLoader(TensorDataset(torch.zeros(n, 1), torch.zeros(n, dtype=torch.long)), batch_size=1)


class KnownCost(L.LightningModule):
    """Training costs 3 × 0.1 s per epoch, each evaluation 1 s; optionally stops like a signal."""

    def __init__(self, stop_at_step=None):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.stop_at_step = stop_at_step
        self.epoch_value = None  # set at the end of each epoch, saved in checkpoints

    def training_step(self, batch, batch_idx):
        time.sleep(TRAIN_STEP_S)
        if self.global_step == self.stop_at_step:
            raise SIGTERMException()  # what Lightning raises on SIGTERM between two batches
        return (self.w * 0).sum() + self.w.sum() ** 2

    def validation_step(self, batch, batch_idx):
        time.sleep(EVAL_S)

    def on_train_epoch_end(self):
        self.epoch_value = self.current_epoch

    def on_save_checkpoint(self, checkpoint):
        checkpoint["epoch_value"] = self.epoch_value

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return loader(3)

    def val_dataloader(self):
        return loader(1)


def fit(module, tmp_path, epochs=2, **trainer_kwargs):
    timer = RunTimer()
    last = LastCheckpoint(tmp_path / "checkpoints")
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, callbacks=[timer, last],
                        enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, plugins=[AtomicCheckpointIO()],
                        default_root_dir=tmp_path, **trainer_kwargs)
    trainer.fit(module)
    return timer, trainer


def test_evaluation_is_not_training_time(tmp_path):
    timer, _ = fit(KnownCost(), tmp_path)
    train = 3 * TRAIN_STEP_S
    assert len(timer.epoch_times) == 2
    for seconds in timer.epoch_times:  # was ~1.3 s: the evaluation counted as training
        assert train <= seconds < train + 0.5 * EVAL_S, timer.epoch_times
    assert len(timer.eval_times) == 2
    for seconds in timer.eval_times:
        assert EVAL_S <= seconds < EVAL_S + 0.5, timer.eval_times
    assert timer.train_seconds() == pytest.approx(sum(timer.epoch_times))


def test_a_stopped_run_keeps_its_partial_epoch(tmp_path):
    module = KnownCost(stop_at_step=4)  # epoch 0: steps 0-2; stopped in step 4 of epoch 1
    with pytest.raises(SIGTERMException):
        fit(module, tmp_path)
    assert len(timer_of(module).epoch_times) == 1
    partial = timer_of(module).partial  # steps 3 and 4 of epoch 1: ~0.2 s (was lost: "0.0 s")
    assert 2 * TRAIN_STEP_S <= partial < 2 * TRAIN_STEP_S + 0.5
    state = timer_of(module).state_dict()
    resumed = RunTimer()
    resumed.load_state_dict(state)
    assert resumed.partial == pytest.approx(partial) and resumed.epoch_times == state["epoch_times"]


def timer_of(module):
    return next(c for c in module.trainer.callbacks if isinstance(c, RunTimer))


def test_end_of_epoch_checkpoint_holds_that_epochs_values(tmp_path):
    """LastCheckpoint saves after the module's and the timer's epoch-end hooks."""
    fit(KnownCost(), tmp_path, epochs=2, limit_val_batches=0)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["epoch"] == 1 and ckpt["epoch_value"] == 1  # was 0: the epoch before
    timer_state = next(v for k, v in ckpt["callbacks"].items() if "RunTimer" in k)
    assert len(timer_state["epoch_times"]) == 2 and timer_state["partial"] == 0.0


def test_machine_load_and_cpu_time_are_recorded_beside_wall_time(tmp_path, monkeypatch):
    """The load average is sampled at the start, each epoch's end and the end; CPU time is the
    process's while the training clock ran (sleeping costs wall time, not CPU time)."""
    from sharpbench import record
    loads = iter([0.5, 1.0, 7.0, 2.0, 9.9])
    monkeypatch.setattr(record, "load_average", lambda: next(loads))
    timer, _ = fit(KnownCost(), tmp_path)
    assert timer.load_samples == [0.5, 1.0, 7.0, 2.0]  # start, 2 epoch ends, end
    assert 0 <= timer.cpu_time < 0.5 * timer.train_seconds()  # the training steps sleep
    state = timer.state_dict()
    again = RunTimer()
    again.load_state_dict(state)  # a resumed run keeps both
    assert again.load_samples == timer.load_samples and again.cpu_time == state["cpu_time"]
    monkeypatch.setattr(record.os, "cpu_count", lambda: 4)
    assert record.machine_load(timer.load_samples) == {
        "load_avg_start": 0.5, "load_avg_end": 2.0, "load_avg_max": 7.0, "overloaded": True}
    assert not record.machine_load([3.9, 6.0])["overloaded"]  # 6 <= 1.5 x 4
    assert record.machine_load([])["overloaded"] is None  # not measured (no load average here)

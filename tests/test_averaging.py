"""SWA and EMA of the weights (``monitor.weight_average``): the update rules against hand-written
averages, the extra accuracy in metrics.json and the report, and an exact resume."""
import copy
import json

import pytest
import torch
from torch import nn

from sharpbench.averaging import WeightAveraging
from sharpbench.train import train


class FakeTrainer:
    def __init__(self, epoch=0, max_epochs=4):
        self.current_epoch, self.max_epochs, self.world_size = epoch, max_epochs, 1


class FakeModule:
    def __init__(self, model):
        self.model = model


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double()


def nudge(m, k):
    with torch.no_grad():
        for i, p in enumerate(m.parameters()):
            p.add_(0.1 * (k + 1) * (i + 1))
        for b in m.buffers():
            if b.is_floating_point():
                b.add_(0.01 * (k + 1))


def test_ema_is_the_per_step_exponential_average_of_weights_and_buffers():
    m = model()
    cb = WeightAveraging("ema", ema_decay=0.9)
    cb.setup(None, FakeModule(m), "fit")
    expect = [t.detach().clone() for t in list(m.parameters()) + list(m.buffers())
              if t.is_floating_point()]
    for k in range(5):
        nudge(m, k)
        cb.on_train_batch_end(None, FakeModule(m), None, None, k)
        cur = [t for t in list(m.parameters()) + list(m.buffers()) if t.is_floating_point()]
        expect = [0.9 * e + 0.1 * c for e, c in zip(expect, cur)]
    got = [t for t in list(cb.average.parameters()) + list(cb.average.buffers())
           if t.is_floating_point()]
    for g, e in zip(got, expect):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-14)
    assert cb.n_averaged == 5


def test_swa_is_the_mean_of_the_epoch_end_weights_from_its_start():
    m = model()
    cb = WeightAveraging("swa", swa_start=0.5)
    cb.setup(None, FakeModule(m), "fit")
    seen = []
    for epoch in range(4):
        nudge(m, epoch)
        cb.on_train_epoch_end(FakeTrainer(epoch, 4), FakeModule(m))
        if epoch >= 2:                                   # ceil(0.5 · 4) = 2
            seen.append([p.detach().clone() for p in m.parameters()])
    mean = [sum(ps) / len(seen) for ps in zip(*seen)]
    for g, e in zip(cb.average.parameters(), mean):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-14)
    assert cb.n_averaged == 2


@pytest.mark.parametrize("bad", [dict(kind="mean"), dict(kind="swa", swa_start=1.0),
                                 dict(kind="ema", ema_decay=1.0)])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError):
        WeightAveraging(**bad)


SMOKE = ["experiment=smoke", "optimizer=sam", "trainer.enable_progress_bar=false",
         "dataset.train_subset=256", "dataset.test_subset=128", "trainer.max_epochs=3", "logger=csv"]


@pytest.mark.e2e
@pytest.mark.parametrize("kind", ["swa", "ema"])
def test_a_run_records_the_average_beside_the_final_accuracy(compose_cfg, tmp_path, kind):
    overrides = [*SMOKE, f"monitor.weight_average={kind}", "monitor.swa_start=0.3"]
    record = train(compose_cfg(overrides), tmp_path / "run", overrides)
    assert record["status"] == "completed"
    assert 0 <= record[f"test_acc_{kind}"] <= 100 and record[f"test_loss_{kind}"] > 0
    assert record[f"{kind}_averaged"] == (2 if kind == "swa" else record["steps"])
    assert record[f"test_acc_{kind}"] != record["test_acc"] or \
        record[f"test_loss_{kind}"] != record["test_loss"]      # another set of weights
    from sharpbench import report
    table = report.table1(report.collect_runs([tmp_path]))
    assert table[f"test_acc_{kind}_mean"].iloc[0] == pytest.approx(record[f"test_acc_{kind}"])


@pytest.mark.e2e
@pytest.mark.parametrize("kind", ["swa", "ema"])
def test_a_resume_mid_epoch_continues_the_average_exactly(compose_cfg, tmp_path, monkeypatch, kind):
    import shutil
    from sharpbench import runtime
    base = ["experiment=smoke", "optimizer=sam", "trainer.max_epochs=2", "dataset.train_subset=256",
            "dataset.test_subset=128", "dataset.batch_size=32", "trainer.deterministic=true",
            "trainer.enable_progress_bar=false", "trainer.checkpoint_every_n_steps=1",
            "logger=none", f"monitor.weight_average={kind}", "monitor.swa_start=0.0"]
    kept = tmp_path / "step11.ckpt"                      # mid second epoch (8 steps per epoch)
    save = runtime.LastCheckpoint.save

    def save_and_keep(self, trainer):
        save(self, trainer)
        if trainer.global_step == 11 and not kept.exists():
            shutil.copy(self.path, kept)

    monkeypatch.setattr(runtime.LastCheckpoint, "save", save_and_keep)
    ref = train(compose_cfg(base), tmp_path / "ref")
    resumed = train(compose_cfg(base + [f"ckpt_path={kept}"]), tmp_path / "resumed")
    for key in (f"test_acc_{kind}", f"test_loss_{kind}", f"{kind}_averaged"):
        assert ref[key] == resumed[key], key

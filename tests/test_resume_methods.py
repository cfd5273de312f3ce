"""Resuming from a mid-epoch checkpoint restores every method's state exactly (in-process)."""
import shutil
from pathlib import Path

import pytest
import torch

from sharpbench import runtime
from sharpbench.train import train

from sharpbench.optim import registry

# Every method that is not a plain torch optimizer: its state (EMAs, masks, stale gradients,
# eigenvectors, HATAM's moments and curvature accumulator) must survive a checkpoint.
METHODS = [m for m, info in registry.methods().items() if not info.plain]
BASE = ["experiment=smoke", "trainer.max_epochs=2", "dataset.train_subset=256",
        "dataset.test_subset=128", "dataset.batch_size=32", "trainer.deterministic=true",
        "trainer.enable_progress_bar=false", "trainer.checkpoint_every_n_steps=1", "logger=none"]
STOP_AT = 11  # mid second epoch (8 steps per epoch)
# Knobs of the driver that change what a step computes, each with one method.
KNOBS = {"sam+micro_batches": ("sam", ["trainer.micro_batches=4"])}


@pytest.mark.parametrize("case", METHODS + list(KNOBS))
def test_resume_mid_epoch_equals_uninterrupted(compose_cfg, tmp_path, monkeypatch, case):
    method, knobs = KNOBS.get(case, (case, []))
    extra = [f"optimizer={method}", *knobs]
    if method == "a2sam":
        extra.append("optimizer.interval=4")  # several eigen-solves, one of them after the resume
    if method == "ssam_f":
        extra.append("optimizer.num_samples=64")
    if method in ("saf", "mesa"):
        extra.append("optimizer.kl_start_epoch=0")  # the trajectory loss on in the second epoch
    if method == "imb_sam":
        extra.append("dataset.imbalance_factor=10")  # tail classes, so the tail pass perturbs
    kept = tmp_path / f"step{STOP_AT}.ckpt"
    save = runtime.LastCheckpoint.save

    def save_and_keep(self, trainer):
        save(self, trainer)
        if trainer.global_step == STOP_AT and not kept.exists():
            shutil.copy(self.path, kept)

    monkeypatch.setattr(runtime.LastCheckpoint, "save", save_and_keep)
    ref = train(compose_cfg(BASE + extra), tmp_path / "ref")
    resumed = train(compose_cfg(BASE + extra + [f"ckpt_path={kept}"]), tmp_path / "resumed")
    a = torch.load(tmp_path / "ref" / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)
    assert a["global_step"] == b["global_step"] == 16
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    for key in ("test_acc", "test_loss", "passes_per_step"):
        assert ref[key] == resumed[key], key

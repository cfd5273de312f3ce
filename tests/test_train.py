"""End-to-end training on synthetic data: loss falls, metrics.json is complete, BN policy holds."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from sharpbench.train import train

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = ["method", "dataset", "model", "seed", "epochs", "test_acc", "test_loss", "train_loss",
            "wall_time_s", "epoch_time_s", "images_per_s", "passes_per_step", "peak_mem_mb",
            "device", "precision", "torch_version", "git_sha", "status", "overrides"]


def smoke(compose_cfg, tmp_path, *overrides):
    cfg = compose_cfg(["experiment=smoke", "trainer.enable_progress_bar=false", *overrides])
    return train(cfg, tmp_path, list(overrides)), cfg


def step_losses(run_dir):
    df = pd.read_csv(run_dir / "csv" / "metrics.csv")
    return df["train/loss_step"].dropna().to_numpy()


@pytest.mark.parametrize("method, passes", [("sgd", 1.0), ("sam", 2.0), ("asam", 2.0)])
def test_smoke_training_lowers_loss_and_records_everything(compose_cfg, tmp_path, method, passes):
    record, cfg = smoke(compose_cfg, tmp_path, f"optimizer={method}", "dataset.val_split=0.1")
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(record, default=str))
    for key in REQUIRED + ["val_acc", "val_loss"]:
        assert on_disk.get(key) is not None, key
    assert on_disk["status"] == "completed" and on_disk["method"] == method
    assert on_disk["passes_per_step"] == pytest.approx(passes)
    assert on_disk["epochs_completed"] == cfg.trainer.max_epochs
    losses = step_losses(tmp_path)
    assert losses[-4:].mean() < 0.8 * losses[:4].mean()
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    assert 0 <= on_disk["test_acc"] <= 100


def test_two_pass_training_updates_batchnorm_once_per_step(compose_cfg, tmp_path):
    record, _ = smoke(compose_cfg, tmp_path, "optimizer=sam")
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    tracked = [v for k, v in ckpt["state_dict"].items() if k.endswith("num_batches_tracked")]
    assert tracked and all(int(t) == ckpt["global_step"] == record["steps"] for t in tracked)


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_trains(compose_cfg, tmp_path, precision):
    record, _ = smoke(compose_cfg, tmp_path, "optimizer=sam", f"trainer.precision={precision}",
                      "dataset.train_subset=512", "dataset.batch_size=32")
    assert record["status"] == "completed" and record["precision"] == precision
    losses = step_losses(tmp_path)
    assert losses[-4:].mean() < losses[:4].mean()


CHEAP = [("looksam",), ("msam",), ("esam",), ("eg_sam",), ("og_sam",), ("saf", "optimizer.kl_start_epoch=0"),
         ("mesa", "optimizer.kl_start_epoch=0"), ("sam", "optimizer.sam_every=3"),
         ("sam", "optimizer.sam_prob=0.5"), ("sam", "optimizer.m=8"),
         ("sam", "trainer.micro_batches=4"), ("sgd", "trainer.micro_batches=2")]


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("setting", CHEAP, ids=lambda s: "-".join(s))
def test_the_cheaper_sams_and_knobs_train_in_mixed_precision(compose_cfg, tmp_path, precision,
                                                             setting):
    """No non-finite loss or weight; fp16 skips only what its loss scaler skips at the start."""
    method, *extra = setting
    record, _ = smoke(compose_cfg, tmp_path, f"optimizer={method}", *extra,
                      f"trainer.precision={precision}", "dataset.train_subset=256",
                      "dataset.batch_size=32", "trainer.max_epochs=2")
    assert record["status"] == "completed" and record["precision"] == precision
    df = pd.read_csv(tmp_path / "csv" / "metrics.csv")
    losses = pd.concat([df[c] for c in ("train/loss_step", "train/loss_perturbed_step")
                        if c in df]).dropna().to_numpy()
    assert len(losses) and np.isfinite(losses).all()
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values()
               if v.is_floating_point())
    assert record["skipped_steps"] <= (3 if precision == "16-mixed" else 0)


@pytest.mark.e2e
def test_cli_runs_end_to_end(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="offline")
    cmd = [sys.executable, "-m", "sharpbench.train", "experiment=smoke", "optimizer=sam",
           "trainer.max_epochs=1", "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp_path}"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "[sharpbench] completed" in out.stdout
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record["status"] == "completed" and "optimizer=sam" in record["overrides"]

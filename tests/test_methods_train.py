"""Every optimizer of the project trains experiment=smoke through the Lightning module."""
from pathlib import Path

import pandas as pd
import pytest

from sharpbench.train import train

from sharpbench.optim import registry

CONF = Path(__file__).resolve().parents[1] / "sharpbench" / "conf"
METHODS = registry.names()
# (nominal passes per step, tolerance): measured by the module's closure counter
EXTRA = {"imb_sam": ["dataset.imbalance_factor=10"]}


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_smoke_with_falling_loss(compose_cfg, tmp_path, method):
    overrides = ["experiment=smoke", f"optimizer={method}", "trainer.enable_progress_bar=false",
                 "dataset.train_subset=512", "dataset.test_subset=256", "trainer.max_epochs=3",
                 *EXTRA.get(method, [])]
    info = registry.method(method)
    if info.baseline == "adamw" or method in ("adam", "rmsprop"):  # adaptive steps: a smaller lr
        overrides.append("optimizer.lr=3e-3")
    record = train(compose_cfg(overrides), tmp_path, overrides)
    assert record["status"] == "completed", record.get("error")
    # Steps whose only loss is at w + e (A²SAM's one-pass steps, MSAM's) log it under its own
    # name (train/loss is at w): the curve is the one with most steps
    log = pd.read_csv(tmp_path / "csv" / "metrics.csv")
    column = max(("train/loss_step", "train/loss_perturbed_step"),
                 key=lambda c: log[c].notna().sum() if c in log else -1)
    losses = log[column].dropna().to_numpy()
    assert losses[-5:].mean() < 0.9 * losses[:5].mean(), losses
    assert record["passes_per_step"] >= 1.0
    if info.passes == 1 and not info.needs:  # one pass, no refresh
        assert record["passes_per_step"] == 1.0
    if "loss_closure" in info.needs:  # Hessian-vector products
        assert record["hvps_per_step"] > 0


def test_every_registered_method_has_a_config_and_every_config_a_method():
    yamls = sorted(p.stem for p in (CONF / "optimizer").glob("*.yaml"))
    assert yamls == sorted(METHODS)

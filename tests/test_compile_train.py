"""``trainer.compile=true`` through the path ``sharpbench.train`` runs: Lightning, SharpnessModule,
its closures and BatchNorm policy. The forward compiles once for training and once for evaluation
(BatchNorm's mode is a guard), whatever the number of passes and steps."""
import functools

import pytest
import torch

from sharpbench.bench import METHODS
from sharpbench.train import train


def run_compiled(compose_cfg, tmp_path, method, extra=()):
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    cfg = compose_cfg(["experiment=smoke", f"optimizer={method}", "trainer.compile=true",
                       "trainer.max_epochs=1", "dataset.train_subset=256",
                       "dataset.test_subset=128", "trainer.enable_progress_bar=false", *extra])
    record = train(cfg, tmp_path, [])
    graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    return record, graphs


@pytest.mark.parametrize("bn_policy", ["first_pass", "momentum_zero"])
def test_compiled_training_builds_one_train_and_one_eval_graph(compose_cfg, tmp_path,
                                                              monkeypatch, bn_policy):
    """Dynamo's guards with the eager backend (no inductor compile time in the default suite)."""
    import sharpbench.module
    monkeypatch.setattr(sharpbench.module.torch, "compile",
                        functools.partial(torch.compile, backend="eager"))
    record, graphs = run_compiled(compose_cfg, tmp_path, "sam", [f"optimizer.bn_policy={bn_policy}"])
    assert record["status"] == "completed" and record["steps"] == 4
    assert graphs == 2, graphs


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_compiled_with_inductor(compose_cfg, tmp_path, method):
    record, graphs = run_compiled(compose_cfg, tmp_path, method)
    assert record["status"] == "completed" and record["test_acc"] is not None
    assert graphs == 2, graphs

"""Every config group composes, and every option instantiates what it names."""
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from sharpbench import checks
from sharpbench.models import build_model
from sharpbench.optim.factory import build_optimizer
from sharpbench.schedule import build_scheduler, check_schedule

CONF = Path(__file__).resolve().parents[1] / "sharpbench" / "conf"


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("name", options("optimizer"))
def test_optimizer_configs_build(compose_cfg, name):
    cfg = compose_cfg([f"optimizer={name}"])
    assert cfg.optimizer.name == name
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    opt = build_optimizer(model, OmegaConf.to_container(cfg.optimizer, resolve=True))
    # lr and weight decay are those of the step actually taken
    assert opt.param_groups[0]["lr"] == cfg.optimizer.lr
    assert opt.param_groups[0]["weight_decay"] == cfg.optimizer.weight_decay


@pytest.mark.parametrize("name", options("optimizer"))
def test_lr_override_reaches_every_method(compose_cfg, name):
    cfg = compose_cfg([f"optimizer={name}", "optimizer.lr=0.05"])
    opt = build_optimizer(torch.nn.Linear(4, 3), OmegaConf.to_container(cfg.optimizer, resolve=True))
    base = getattr(opt, "base_optimizer", opt)
    assert base.param_groups[0]["lr"] == 0.05


@pytest.mark.parametrize("name", options("model"))
def test_model_configs_build(compose_cfg, name):
    cfg = compose_cfg([f"model={name}"])
    model = build_model(cfg.model.name, num_classes=10,
                        **{k: v for k, v in cfg.model.items() if k != "name"})
    if name == "tiny_cnn":
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name", options("schedule"))
def test_schedule_configs_build(compose_cfg, name):
    cfg = compose_cfg([f"schedule={name}"])
    check_schedule(cfg.schedule, int(cfg.trainer.max_epochs))
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    sched = build_scheduler(opt, cfg.schedule, steps_per_epoch=10, epochs=80)
    for _ in range(10 * 60):
        opt.step()
        sched.step()
    expected = {"multistep": 0.01, "constant": 0.1}.get(name)
    if expected is not None:
        assert opt.param_groups[0]["lr"] == pytest.approx(expected)


@pytest.mark.parametrize("name", options("dataset"))
def test_dataset_configs_compose(compose_cfg, name):
    cfg = compose_cfg([f"dataset={name}"])
    assert cfg.dataset.name == name
    assert cfg.dataset.batch_size == (128 if name != "synthetic" else 128)
    for key in ("root", "download", "format", "train_subset", "val_split"):
        assert key in cfg.dataset


@pytest.mark.parametrize("name", options("trainer"))
def test_trainer_configs_compose(compose_cfg, name):
    cfg = compose_cfg([f"trainer={name}", "schedule=cosine"])
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        with pytest.raises(checks.ConfigError, match="no CUDA GPU"):
            checks.check_config(cfg)
    else:
        checks.check_config(cfg)


@pytest.mark.parametrize("name", options("logger"))
def test_logger_configs_build(compose_cfg, name, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    from sharpbench.runtime import build_loggers
    cfg = compose_cfg([f"logger={name}"])
    loggers = build_loggers(cfg.logger, tmp_path)
    assert (len(loggers) == 0) == (name == "none")


@pytest.mark.parametrize("name", options("experiment"))
def test_experiment_configs_compose_and_check(compose_cfg, name):
    cfg = compose_cfg([f"experiment={name}"])
    checks.check_config(cfg)


def test_table1_sam_is_the_papers_recipe(compose_cfg):
    cfg = compose_cfg(["experiment=table1_sam"])
    assert (cfg.optimizer.name, cfg.model.name, cfg.dataset.name) == ("sam", "resnet18", "cifar10")
    assert cfg.optimizer.rho == 0.05 and cfg.optimizer.lr == 0.1 and cfg.optimizer.momentum == 0.9
    assert cfg.optimizer.weight_decay == 5e-4 and cfg.dataset.batch_size == 128
    assert cfg.trainer.max_epochs == 80 and list(cfg.schedule.milestones) == [50, 75]
    assert cfg.schedule.gamma == 0.1 and cfg.label_smoothing == 0.1


def test_smoke_experiment_keeps_a_real_dataset_given_on_the_command_line(compose_cfg):
    cfg = compose_cfg(["experiment=smoke", "dataset=cifar10", "dataset.format=folder"])
    assert cfg.dataset.name == "cifar10" and cfg.dataset.train_subset == 1024
    assert cfg.model.name == "tiny_cnn" and cfg.trainer.accelerator == "cpu"

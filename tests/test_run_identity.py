"""One list of the keys that do not define a run: the identity, the report's settings and the
sweep folder names agree on it; the removed on_config_change values are refused with the ways out."""
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

from sharpbench import report, run_identity
from sharpbench.checks import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "sharpbench" / "conf"


def composed(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=["experiment=smoke", *overrides])


def test_report_settings_and_identity_leave_out_the_same_keys():
    from omegaconf import OmegaConf
    cfg = composed()
    full = report.flatten({k: v for k, v in OmegaConf.to_container(cfg, resolve=False).items()
                           if k != "hydra"})
    ident = report.flatten(run_identity.identity(cfg))
    assert set(ident) <= set(full) and len(ident) < len(full)
    for key in full:
        assert run_identity.defines_run(key) == (key in ident), key
        assert report.is_setting(key) == (key in ident and key != "seed"), key
    # every where-not-what key the config has is out of both
    for key in run_identity.NOT_RUN_DEFINING:
        assert not report.is_setting(key) and not report.is_setting(key + ".x")
    assert not report.is_setting("seed") and report.is_setting("optimizer.rho")


def test_old_records_keys_are_no_settings_either():
    """A record written by an older version may hold keys today's identity strips."""
    old = {"seed": 1, "trainer": {"max_epochs": 2, "checkpoint_every_n_steps": 4,
                                  "enable_progress_bar": False},
           "dataset": {"name": "cifar10", "root": "/data"}, "monitor": {"lambda_max_subset": 512}}
    kept = {k for k in report.flatten(old) if report.is_setting(k)}
    assert kept == {"trainer.max_epochs", "dataset.name"}
    assert run_identity.strip(old) == {"seed": 1, "trainer": {"max_epochs": 2},
                                       "dataset": {"name": "cifar10"}}


def test_sweep_folder_names_leave_out_exactly_those_keys():
    train_yaml = yaml.safe_load((CONF / "train.yaml").read_text())
    listed = train_yaml["hydra"]["job"]["config"]["override_dirname"]["exclude_keys"]
    assert listed == run_identity.override_dirname_exclusions(train_yaml)


@pytest.mark.parametrize("value", ["new_folder", "extend", "sideways"])
def test_removed_on_config_change_values_name_the_ways_out(value):
    with pytest.raises(ConfigError, match=r"another folder .*delete that folder"):
        run_identity.check_on_config_change(value)
    run_identity.check_on_config_change("refuse")
    run_identity.check_on_config_change(None)


def test_an_int_recorded_where_a_typed_float_key_now_holds_a_float_is_the_same_run():
    """Typed configs make ``optimizer.lr=1`` a float (1.0); a run recorded with the int 1 by an
    older version is still this config's run, while a changed value or a bool for a number is not."""
    old = {"optimizer": {"lr": 1, "betas": [0.9, 1]}, "seed": 0}
    assert run_identity.same_run(old, {"optimizer": {"lr": 1.0, "betas": [0.9, 1.0]}, "seed": 0})
    assert not run_identity.same_run(old, {"optimizer": {"lr": 1.5, "betas": [0.9, 1.0]}, "seed": 0})
    assert run_identity.differing_keys({"a": True}, {"a": 1}) == ["a"]
    assert run_identity.differing_keys({"a": [1, 2]}, {"a": [1.0]}) == ["a"]

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import sharpbench.train_configs  # noqa: F401 - registers the typed configs with Hydra's ConfigStore

CONF = str(Path(__file__).resolve().parents[1] / "sharpbench" / "conf")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture
def compose_cfg():
    """compose_cfg(["optimizer=sam", ...]) → the composed DictConfig (with hydra keys)."""
    def _compose(overrides=()):
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            return compose(config_name="train", overrides=list(overrides), return_hydra_config=True)
    return _compose

"""The trained network on its own: ``<run dir>/model.pt``, a plain ``state_dict``.

Keys are the network's own (``conv1.weight`` …, no ``model.`` prefix), so the file loads into
the architecture built by :func:`sharpbench.models.build_model` without Lightning or sharpbench's
training code::

    net = build_model("resnet18", num_classes=10)
    net.load_state_dict(torch.load("outputs/runs/<run>/model.pt"))

:func:`load_model` does both from a run folder, reading the architecture from the run's config.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data.sources import CIFAR_NUM_CLASSES
from .fileio import atomic_torch_save
from .models import build_model

MODEL_FILE = "model.pt"


def export_model(model: nn.Module, run_dir: str | os.PathLike) -> Path:
    """Write ``model.state_dict()`` (tensors on the CPU) to ``<run_dir>/model.pt``, atomically."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return atomic_torch_save(state, Path(run_dir) / MODEL_FILE)


def model_config_of_run(run_dir: str | os.PathLike) -> dict[str, Any]:
    """``{"name", "num_classes", **kwargs}`` of a run's network, from its ``metrics.json``."""
    record = json.loads((Path(run_dir) / "metrics.json").read_text())
    config = record.get("config") or {}
    model = dict(config.get("model") or {"name": record["model"]})
    dataset = config.get("dataset") or {"name": record["dataset"]}
    model.setdefault("num_classes", CIFAR_NUM_CLASSES.get(dataset.get("name"))
                     or int(dataset.get("num_classes") or 10))  # synthetic: its num_classes
    return model


def load_model(run_dir: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """The trained network of a completed run: architecture from its config, weights from model.pt."""
    net = build_model(**model_config_of_run(run_dir))
    net.load_state_dict(torch.load(Path(run_dir) / MODEL_FILE, map_location=map_location))
    return net

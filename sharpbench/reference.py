"""The published numbers the report puts beside ours, and the recipe they were measured with.

Feldman, R. G. (2025). "Ландшафт функции потерь нейронных сетей: SAM и его модификации"
(Loss landscape of neural networks: SAM and its modifications), Table 1: top-1 test accuracy (%)
of ResNet-18 trained from scratch for 80 epochs on the full CIFAR-10 / CIFAR-100 training set,
batch 128, SGD lr 0.1 (momentum 0.9, weight decay 5e-4) divided by 10 at epochs 50 and 75,
rho 0.05 for every method, label-smoothed cross-entropy, mean of 4 repeats.

The paper gives the validation loss and the training time relative to SAM only in words (SAM
about +40 % over SGD, SSAM-F +5-6 %), not per method and dataset; ``PaperRow`` has fields for them
so that a source with numbers can fill them, and the report shows a column only where a value
exists.

A value of the paper is shown beside a row of ours only when every run of the row used this
recipe (``recipe_differences`` is empty); elsewhere it is marked "different recipe".
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

CITATION = "Feldman 2025"
CITATION_FULL = ('Feldman, R. G. (2025). "Ландшафт функции потерь нейронных сетей: SAM и его '
                 'модификации", Table 1')


@dataclass(frozen=True)
class PaperRow:
    """One method on one dataset: top-1 (%), loss and training time vs SAM (%) where given."""
    top1: float | None = None
    loss: float | None = None
    time_vs_sam_pct: float | None = None


TABLE1: dict[tuple[str, str], PaperRow] = {
    ("cifar10", "sam"): PaperRow(top1=92.0), ("cifar10", "friendly_sam"): PaperRow(top1=92.7),
    ("cifar10", "ssam_f"): PaperRow(top1=92.1), ("cifar10", "ssam_d"): PaperRow(top1=91.8),
    ("cifar100", "sam"): PaperRow(top1=71.0), ("cifar100", "friendly_sam"): PaperRow(top1=70.3),
    ("cifar100", "ssam_f"): PaperRow(top1=73.1), ("cifar100", "ssam_d"): PaperRow(top1=69.8),
}

_UNSET = (None, 0, 0.0)
# flattened config key -> the values that count as the paper's recipe (absent = None)
RECIPE: dict[str, tuple] = {
    "model.name": ("resnet18",),
    "trainer.max_epochs": (80,),
    "dataset.batch_size": (128,),
    "dataset.train_subset": (None,),      # the full training set ...
    "dataset.val_split": _UNSET,          # ... none of it held out
    "dataset.test_subset": (None,),
    "dataset.imbalance_factor": (None,),
    "dataset.label_noise": _UNSET,
    "dataset.augment": (True, None),      # random crop (4 px padding) + flip
    "trainer.limit_train_batches": (None, 1.0),
    "label_smoothing": (0.1,),
    "schedule.name": ("multistep",),
    "schedule.milestones": ("[50, 75]",),
    "schedule.gamma": (0.1,),
    "schedule.warmup_epochs": _UNSET,
    "optimizer.lr": (0.1,),
    "optimizer.momentum": (0.9,),
    "optimizer.weight_decay": (5e-4,),
    "optimizer.rho": (0.05,),
}


def paper_row(dataset: str, method: str) -> PaperRow | None:
    return TABLE1.get((dataset, method))


def recipe_differences(flat_config: dict[str, Any] | None) -> list[str]:
    """``key=value`` for every recipe key a run's flattened config sets otherwise ([] = the
    paper's recipe). A run without a resolved config cannot be checked: ["no config"]."""
    if flat_config is None:
        return ["no config"]
    out = []
    for key, allowed in RECIPE.items():
        value = flat_config.get(key)
        if isinstance(value, list):
            value = json.dumps(value)
        if not any(_same(value, a) for a in allowed):
            out.append(f"{key}={value}")
    return out


def _same(value: Any, allowed: Any) -> bool:
    if value is None or allowed is None:
        return value is None and allowed is None
    if isinstance(value, str) or isinstance(allowed, str):
        return str(value) == str(allowed)
    try:
        return abs(float(value) - float(allowed)) <= 1e-12 * max(1.0, abs(float(allowed)))
    except (TypeError, ValueError):
        return False

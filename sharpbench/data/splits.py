"""Build the final train / validation / test tensors from a :class:`DataConfig` (no Lightning needed).

Order of operations (each step seeded from ``seed``)::

    load -> imbalance (train) -> validation split (train) -> train_subset -> label noise (train)
    test set: load -> test_subset (stratified); never imbalanced or noisy

Validation images are held out before the subset and the noise, so they keep clean labels and the
long-tailed class profile of the training pool.

Sanity, before any training: a long-tail factor that would leave a class without images, a
subset larger than the data it is drawn from, and a training set missing a class are errors
(:class:`DataConfigError`) naming the sizes involved.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from sharpbench.data.config import DataConfig
from sharpbench.data.errors import DataConfigError
from sharpbench.data.loader import DeviceLoader
from sharpbench.data.sources import load_raw
from sharpbench.data.stats import CIFAR_STATS, channel_stats
from sharpbench.data.transforms import (
    add_label_noise,
    class_counts,
    long_tail_counts,
    long_tail_indices,
    split_validation,
    stratified_subset,
)


@dataclass
class DataSplits:
    """Final tensors (images uint8 ``[N,3,32,32]``, labels int64 ``[N]``, on CPU) and metadata.

    ``val_x``/``val_y`` are ``None`` without a validation split. ``train_y`` holds the (possibly
    noisy) training labels, ``train_y_clean`` the true ones and ``train_noise_mask`` marks the
    flipped samples. ``train_class_counts`` counts training images per class by their *clean* labels
    (the designed long-tail profile), which is what the many/medium/few groups are based on.
    ``mean``/``std`` are per-channel statistics on the 0..1 scale.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor | None
    val_y: torch.Tensor | None
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_class_counts: torch.Tensor
    train_y_clean: torch.Tensor
    train_noise_mask: torch.Tensor

    @property
    def has_val(self) -> bool:
        """Whether a validation split exists."""
        return self.val_x is not None


def as_config(config: DataConfig | Mapping[str, Any] | None = None, **overrides: Any) -> DataConfig:
    """Return ``config`` as a validated :class:`DataConfig`, with ``overrides`` applied."""
    if isinstance(config, DataConfig):
        return DataConfig.from_kwargs(config.to_dict(), **overrides) if overrides else config
    return DataConfig.from_kwargs(config, **overrides)


def build_splits(config: DataConfig | Mapping[str, Any] | None = None, **overrides: Any) -> DataSplits:
    """Load the dataset described by ``config`` (a :class:`DataConfig`, a mapping, or keywords)."""
    cfg = as_config(config, **overrides)
    raw = load_raw(
        cfg.name, cfg.root, format=cfg.format, download=cfg.download, cache=cfg.cache,
        cache_dir=cfg.cache_dir, num_train=cfg.num_train, num_test=cfg.num_test,
        num_classes=cfg.num_classes or 10, seed=cfg.seed, decode_workers=cfg.decode_workers,
    )
    c = raw.num_classes
    x, y = raw.train_x, raw.train_y
    require_every_class(y, c, raw.class_names, f"the {cfg.name} training data")
    if cfg.imbalance_factor is not None and cfg.imbalance_factor > 1:
        check_long_tail(y, c, cfg.imbalance_factor)
        keep, _ = long_tail_indices(y, c, cfg.imbalance_factor, cfg.seed)
        x, y = x[keep], y[keep]
    val_x = val_y = None
    if cfg.val_split:
        train_idx, val_idx = split_validation(len(y), cfg.val_split, cfg.seed)
        val_x, val_y = x[val_idx], y[val_idx]
        x, y = x[train_idx], y[train_idx]
        require_every_class(y, c, raw.class_names, f"the training set left by dataset.val_split={cfg.val_split}")
    if cfg.train_subset is not None:
        check_subset_size("train_subset", cfg.train_subset, len(y), _train_pool(cfg))
        keep = stratified_subset(y, c, cfg.train_subset, cfg.seed, tag="train_subset")
        x, y = x[keep], y[keep]
        require_every_class(y, c, raw.class_names, f"dataset.train_subset={cfg.train_subset}")
    noisy, mask = add_label_noise(y, c, cfg.label_noise, cfg.seed)
    test_x, test_y = raw.test_x, raw.test_y
    if cfg.test_subset is not None:
        check_subset_size("test_subset", cfg.test_subset, len(test_y), f"the {cfg.name} test set")
        keep = stratified_subset(test_y, c, cfg.test_subset, cfg.seed, tag="test_subset")
        test_x, test_y = test_x[keep], test_y[keep]
    mean, std = CIFAR_STATS[cfg.name] if cfg.name in CIFAR_STATS else channel_stats(raw.train_x)
    return DataSplits(
        train_x=x, train_y=noisy, val_x=val_x, val_y=val_y, test_x=test_x, test_y=test_y,
        num_classes=c, class_names=raw.class_names, mean=tuple(mean), std=tuple(std),
        train_class_counts=class_counts(y, c), train_y_clean=y, train_noise_mask=mask,
    )


def _train_pool(cfg: DataConfig) -> str:
    steps = [s for s, on in (("the long tail", cfg.imbalance_factor and cfg.imbalance_factor > 1),
                             ("the validation split", bool(cfg.val_split))) if on]
    return f"the {cfg.name} training set" + (f" after {' and '.join(steps)}" if steps else "")


def check_subset_size(key: str, n: int, available: int, pool: str) -> None:
    """A subset larger than the data would silently mean "all of it": refuse it."""
    if n > available:
        raise DataConfigError(
            f"dataset.{key}={n} is larger than {pool}, which has {available} images: use "
            f"dataset.{key}={available} or fewer, or dataset.{key}=null for all of them."
        )


def check_long_tail(y: torch.Tensor, num_classes: int, imbalance_factor: float) -> None:
    """Refuse a long-tail factor whose smallest class would have no image."""
    n_max = int(class_counts(y, num_classes).max())
    smallest = min(long_tail_counts(n_max, num_classes, imbalance_factor))
    if smallest < 1:
        raise DataConfigError(
            f"dataset.imbalance_factor={imbalance_factor:g} would leave the smallest class with "
            f"{smallest} training images ({n_max}/{imbalance_factor:g} = {n_max / imbalance_factor:.3g}); "
            f"every class needs at least one. Use dataset.imbalance_factor={n_max} or less "
            f"(e.g. 100: {n_max} down to {n_max // 100} images per class)."
        )


def require_every_class(y: torch.Tensor, num_classes: int, class_names: list[str], cause: str) -> None:
    """Every class must have at least one training image, or its accuracy means nothing."""
    counts = class_counts(y, num_classes)
    empty = [class_names[i] if i < len(class_names) else str(i) for i in range(num_classes) if counts[i] == 0]
    if empty:
        shown = ", ".join(empty[:10]) + (f" and {len(empty) - 10} more" if len(empty) > 10 else "")
        raise DataConfigError(
            f"{cause} leaves {len(empty)} of {num_classes} classes without a training image "
            f"({shown}; smallest class size {int(counts.min())}, largest {int(counts.max())}): "
            f"every class must be present. Keep more images (e.g. a larger dataset.train_subset, "
            f"a smaller dataset.val_split or dataset.imbalance_factor)."
        )


def make_loaders(
    splits: DataSplits,
    config: DataConfig | None = None,
    *,
    device: torch.device | str | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, DeviceLoader]:
    """Return ``{"train", "val"?, "test"}`` :class:`DeviceLoader` s for plain-PyTorch training loops.

    The training loader shuffles, augments (if ``config.augment``) and drops the last partial batch;
    evaluation loaders keep dataset order, never augment and keep every sample.
    """
    cfg = config or DataConfig()
    common = dict(
        mean=splits.mean, std=splits.std, device=device, seed=cfg.seed, rank=rank,
        world_size=world_size, channels_last=cfg.channels_last,
    )
    loaders = {
        "train": DeviceLoader(
            splits.train_x, splits.train_y, cfg.batch_size, shuffle=True, augment=cfg.augment,
            drop_last=True, **common,
        )
    }
    eval_sets = [("val", splits.val_x, splits.val_y), ("test", splits.test_x, splits.test_y)]
    for key, x, y in eval_sets:
        if x is not None:
            loaders[key] = DeviceLoader(x, y, cfg.resolved_eval_batch_size, **common)
    return loaders

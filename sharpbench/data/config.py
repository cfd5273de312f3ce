"""``DataConfig``: the validated settings of the data layer (the Hydra ``dataset`` node + loader knobs)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from sharpbench.data.errors import DataConfigError
from sharpbench.data.sources import CIFAR_NUM_CLASSES, check_name_and_format


_LOADER_KEYS = ("batch_size", "eval_batch_size", "seed")


@dataclass
class DataConfig:
    """All data settings. Unknown keys are rejected by :meth:`from_kwargs` to catch typos.

    Dataset fields:
        name: "cifar10" | "cifar100" | "synthetic".
        root: folder holding the data (python format: the folder containing
            ``cifar-10-batches-py/``; folder format: the folder containing ``train/`` and ``test/``).
            Relative paths are relative to the current working directory, ``~`` is expanded;
            null only for synthetic.
        download: fetch the official archive if missing (python format only).
        format: "python" (pickle archive) | "folder" (``train/<class>/*.png``); unused for synthetic.
        train_subset: keep this many training images (stratified by class, seeded); null = all.
        val_split: hold out part of the training set as validation: null/0 = none, a float in
            (0, 1) = fraction, an int = image count (seeded random, taken before subset and noise).
        imbalance_factor: null = balanced; >= 1 = exponential long tail, largest/smallest class size.
        label_noise: rate in [0, 1) of symmetric label noise on the training set.
        num_classes: classes of the synthetic source (default 10); for CIFAR null or the true count.
        num_train, num_test: synthetic split sizes.
        test_subset: keep this many test images (stratified, seeded); null = all. For smoke runs.
        cache: cache decoded CIFAR tensors on disk; cache_dir: where (default ``<root>/.sharpbench_cache``).
        decode_workers: processes for decoding image folders (null = automatic, 1 = no pool).

    Loader fields:
        batch_size: training batch size per rank; eval_batch_size: evaluation batch size per rank
            (null = batch_size); augment: random crop + flip on the training set; channels_last:
            batches in channels_last memory format; seed: seeds every random step of the data layer.
    """

    name: str = "cifar10"
    root: str | None = "data"
    download: bool = False
    format: str = "python"
    train_subset: int | None = None
    val_split: int | float | None = None
    imbalance_factor: float | None = None
    label_noise: float = 0.0
    num_classes: int | None = None
    num_train: int = 5000
    num_test: int = 1000
    test_subset: int | None = None
    cache: bool = True
    cache_dir: str | None = None
    decode_workers: int | None = None
    batch_size: int = 128
    eval_batch_size: int | None = None
    augment: bool = True
    channels_last: bool = False
    seed: int = 0

    @classmethod
    def from_kwargs(cls, config: Mapping[str, Any] | None = None, **overrides: Any) -> "DataConfig":
        """Build from a mapping (e.g. a Hydra/OmegaConf node) and keyword overrides, then validate."""
        values = dict(_to_plain(config) if config is not None else {})
        values.update(overrides)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise DataConfigError(
                f"Unknown data setting(s) {', '.join(unknown)}. Accepted settings: {', '.join(sorted(known))}."
            )
        return cls(**values)

    def __post_init__(self) -> None:
        self.name = str(self.name).lower()
        self.format = str(self.format).lower()
        check_name_and_format(self.name, self.format)
        if self.root is None and self.name != "synthetic":
            raise DataConfigError(
                f"dataset.root is null but {self.name} is read from disk; set dataset.root to the data "
                "folder (or the SHARPBENCH_DATA environment variable)."
            )
        # "~/x" is $HOME/x for reading and for the cache beside it alike
        self.root = None if self.root is None else str(Path(str(self.root)).expanduser())
        self.cache_dir = None if self.cache_dir is None else str(Path(str(self.cache_dir)).expanduser())
        if self.name == "synthetic":
            self.num_classes = 10 if self.num_classes is None else self.num_classes
            _check_int("num_classes", self.num_classes, 2)
            _check_int("num_train", self.num_train, 1)
            _check_int("num_test", self.num_test, 1)
        elif self.num_classes is not None and self.num_classes != CIFAR_NUM_CLASSES[self.name]:
            raise DataConfigError(
                f"dataset.num_classes={self.num_classes} does not match {self.name} "
                f"({CIFAR_NUM_CLASSES[self.name]} classes); set it to null (it is only used by synthetic)."
            )
        for key in ("train_subset", "test_subset"):
            if getattr(self, key) is not None:
                _check_int(key, getattr(self, key), 1)
        if isinstance(self.val_split, bool) or not isinstance(self.val_split, (int, float, type(None))):
            raise DataConfigError(
                f"dataset.val_split={self.val_split!r} must be null/0, a fraction in (0, 1) or an image count."
            )
        if isinstance(self.val_split, float) and not 0 <= self.val_split < 1:
            raise DataConfigError(
                f"dataset.val_split={self.val_split} is a float, so it must be a fraction in (0, 1); "
                "write a whole number (e.g. 5000) to hold out a count of images."
            )
        if isinstance(self.val_split, int) and self.val_split < 0:
            raise DataConfigError(f"dataset.val_split={self.val_split} must not be negative.")
        if self.imbalance_factor is not None and not self.imbalance_factor >= 1:
            raise DataConfigError(
                f"dataset.imbalance_factor={self.imbalance_factor} must be >= 1 (largest/smallest "
                "class size, e.g. 100); use null for a balanced training set."
            )
        if not 0 <= self.label_noise < 1:
            raise DataConfigError(
                f"dataset.label_noise={self.label_noise} must be in [0, 1) (fraction of training labels "
                "to corrupt); use 0 for clean labels."
            )
        _check_int("batch_size", self.batch_size, 1)
        if self.eval_batch_size is not None:
            _check_int("eval_batch_size", self.eval_batch_size, 1)
        if self.decode_workers is not None:
            _check_int("decode_workers", self.decode_workers, 0)
        _check_int("seed", self.seed, None)

    @property
    def resolved_eval_batch_size(self) -> int:
        """Evaluation batch size (``eval_batch_size``, or ``batch_size`` when unset)."""
        return self.eval_batch_size or self.batch_size

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as a plain dict (for logging hyperparameters)."""
        return asdict(self)


def _check_int(key: str, value: Any, minimum: int | None) -> None:
    label = key if key in _LOADER_KEYS else f"dataset.{key}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataConfigError(f"{label}={value!r} must be a whole number.")
    if minimum is not None and value < minimum:
        raise DataConfigError(f"{label}={value} must be at least {minimum}.")


def _to_plain(config: Any) -> Mapping[str, Any]:
    """Turn an OmegaConf node into a plain dict (resolving interpolations); pass mappings through."""
    try:
        from omegaconf import DictConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency, but keep the data layer usable
        return config
    if isinstance(config, DictConfig):
        return OmegaConf.to_container(config, resolve=True)
    return config

"""Typed configs of the training run: its groups (dataset, model, schedule, logger, trainer) and
its ``monitor`` and ``sweep`` nodes. The optimizer group's configs live beside their methods
(one dataclass per method, :mod:`sharpbench.optim`; the base step's keys in
:mod:`sharpbench.optim.step_config`).

Each key's type (for Hydra: a structured config registered with the ConfigStore, so Hydra refuses
an unknown key or a value of the wrong type when composing), default, accepted values (``spec``,
in the value language of :mod:`sharpbench.schema`, which the training checks apply) and meaning
are written here once. The YAML files take their defaults from these dataclasses (their first
default, e.g. ``/schema/dataset/cifar@_here_``; ``/schema/trainer``, ``/schema/monitor``,
``/schema/sweep``) and set only their name and what they change. :mod:`sharpbench.schema` derives its tables of
these keys from here, and with them ``--help`` and ``docs/configuration.md``.
"""
from dataclasses import MISSING, dataclass
from typing import Any, List, Optional

from .optim.registry import discover as discover_methods
from .typed_config import key, store

# Keys typed ``Any`` take several kinds of value (an int or a word, an int or a fraction) or are
# recorded in the run's identity as the user wrote them (an int kept an int): their ``spec`` is
# checked by the training checks.


@dataclass
class TrainerConfig:
    accelerator: str = key("auto", "where to train; auto: a CUDA GPU when one is visible, else the CPU",
                           spec="auto | cpu | gpu | cuda")
    devices: Any = key(1, "devices per node (-1: all visible), or a list of GPU ids",
                       spec="int >= 1 | -1 | auto | list[int >= 0]")
    num_nodes: int = key(1, "nodes (DDP across nodes)", spec="int >= 1")
    strategy: str = key("auto", "distribution strategy; ddp: one process per device",
                        spec="auto | ddp | ddp_spawn")
    precision: Any = key("auto", "auto: bf16-mixed on a GPU that supports it, else 32; applied by "
                                 "the sharpbench module",
                         spec="auto | 32 | 32-true | bf16-mixed | 16-mixed")
    max_epochs: int = key(80, "epochs to train", spec="int >= 1")
    gradient_clip_val: Any = key(0.0, "clip the gradient's global L2 norm to this value (0 or "
                                      "null: off)", spec="null | float >= 0")
    log_every_n_steps: int = key(50, "log the training loss (and check for divergence) every this "
                                     "many steps", spec="int >= 1")
    check_val_every_n_epoch: int = key(1, "evaluate on validation/test every this many epochs",
                                       spec="int >= 1")
    limit_train_batches: Any = key(None, "train on this many batches per epoch (int) or this "
                                         "fraction of them (float); null: all",
                                   spec="null | int >= 1 | float in (0, 1]")
    limit_val_batches: Any = key(None, "validation batches per evaluation (int) or fraction "
                                       "(float); null: all",
                                 spec="null | int >= 0 | float in [0, 1]")
    limit_test_batches: Any = key(None, "test batches (int) or fraction (float); null: all",
                                  spec="null | int >= 1 | float in (0, 1]")
    checkpoint_every_n_steps: Optional[int] = key(
        None, "also save last.ckpt every this many steps, to resume mid-epoch after a kill (0 or "
              "null: at epoch ends only)", spec="null | int >= 0")
    deterministic: bool = key(False, "deterministic algorithms (bit-identical resume on CPU; "
                                     "slower on GPU)", spec="bool")
    compile: bool = key(False, "torch.compile the model's forward", spec="bool")
    channels_last: bool = key(True, "channels_last memory format (CUDA only)", spec="bool")
    sync_perturbation: bool = key(False, "DDP: average the first-pass gradient before perturbing "
                                         "(false: each device perturbs with its own, SAM's "
                                         "m-sharpness)", spec="bool")
    micro_batches: int = key(1, "gradient accumulation: run each batch (dataset.batch_size, the "
                                "batch of one step) as this many micro-batches, in the memory of "
                                "one; SAM, ASAM and GSAM perturb each micro-batch with its own "
                                "gradient (m-sharpness, m = the micro-batch), other methods with "
                                "the accumulated one", spec="int >= 1")
    enable_progress_bar: bool = key(True, "show the progress bar", spec="bool")


@dataclass
class MonitorConfig:
    """Measurements during training that leave the weights unchanged (not part of the identity)."""
    lambda_max_every_n_epochs: int = key(0, "measure the top Hessian eigenvalue every this many "
                                            "epochs (0: off) -> <run>/lambda_max.json",
                                         spec="int >= 0")
    lambda_max_subset: int = key(512, "un-augmented training images lambda_max is measured on",
                                 spec="int >= 1")
    lambda_max_iters: int = key(20, "Lanczos steps per lambda_max measurement", spec="int >= 1")
    weight_average: str = key("none", "an average of the weights evaluated beside the trained "
                                      "ones -> metrics.json test_acc_swa / test_acc_ema "
                                      "(sharpbench/averaging.py)", spec="none | swa | ema")
    swa_start: float = key(0.75, "swa: average the end-of-epoch weights from this fraction of "
                                 "the epochs on", spec="float in [0, 1)")
    ema_decay: float = key(0.999, "ema: decay of the per-step exponential moving average",
                           spec="float in (0, 1)")


@dataclass
class SweepConfig:
    """Sweep plumbing: where jobs run, not what they compute (not part of the identity)."""
    gpu_pool: Any = key(None, "hydra/launcher=local_parallel: GPU ids (or \"0,1\" groups) the "
                              "workers share, e.g. [0,1,2,3]", spec="null | list[any] | str")
    jobs_per_gpu: int = key(1, "workers per GPU of gpu_pool (set hydra.launcher.n_jobs = "
                               "len(gpu_pool) x jobs_per_gpu)", spec="int >= 1")
    objective: Optional[str] = key(None, "metrics.json key a job returns to an optimising sweeper "
                                         "(e.g. test_acc)", spec="null | str")


# --- dataset: the keys every option has, then CIFAR's (read from disk) and the synthetic data's


@dataclass
class DatasetConfig:
    name: str = key(MISSING, "the dataset", spec="cifar10 | cifar100 | synthetic")
    root: Optional[str] = key("${oc.env:SHARPBENCH_DATA,data}",
                              "folder holding the data (python format: the folder containing "
                              "cifar-10-batches-py/; folder format: train/ and test/); env "
                              "SHARPBENCH_DATA; null only for synthetic", spec="null | str")
    download: bool = key(True, "download the official archive when it is missing (python format)",
                         spec="bool")
    format: str = key("python", "python: torchvision's pickle archive; folder: "
                                "train/<class>/*.png|jpg, test/<class>/*", spec="python | folder")
    train_subset: Optional[int] = key(None, "keep this many training images (stratified by class, "
                                            "seeded); null: all", spec="null | int >= 1")
    test_subset: Optional[int] = key(None, "keep this many test images (stratified, seeded); null: "
                                           "all", spec="null | int >= 1")
    val_split: Any = key(0, "hold out part of the training set for validation: a fraction (0.1) or "
                            "a count (5000); 0/null: none; test is reported separately",
                         spec="null | int >= 0 | float in [0, 1)")
    imbalance_factor: Optional[float] = key(None, "long-tailed training set, largest/smallest class "
                                                  "size (Cao et al. 2019), e.g. 100; null: balanced",
                                            spec="null | float >= 1")
    label_noise: float = key(0.0, "fraction of training labels replaced by a different, uniformly "
                                  "drawn class", spec="float in [0, 1)")
    batch_size: int = key(128, "training batch size per device", spec="int >= 1")
    eval_batch_size: Optional[int] = key(1000, "evaluation batch size per device (null: batch_size)",
                                         spec="null | int >= 1")
    augment: bool = key(True, "random crop (4 px padding) and horizontal flip of training images",
                        spec="bool")


@dataclass
class CifarConfig(DatasetConfig):
    """CIFAR-10/100 (Krizhevsky 2009), read from disk."""
    cache: bool = key(True, "cache decoded images as a uint8 tensor file (decode once)", spec="bool")
    cache_dir: Optional[str] = key(None, "where the cache goes (null: <root>/.sharpbench_cache)",
                                   spec="null | str")
    decode_workers: Optional[int] = key(None, "processes decoding an image folder (null: up to 8; "
                                              "0 or 1: in this process)", spec="null | int >= 0")


@dataclass
class SyntheticConfig(DatasetConfig):
    """Class-structured random images of CIFAR shape, made from the seed."""
    num_classes: int = key(10, "classes of the synthetic data", spec="int >= 2")
    num_train: int = key(2048, "training images of the synthetic data", spec="int >= 1")
    num_test: int = key(512, "test images of the synthetic data", spec="int >= 1")


# --- model: the network's builder takes the other keys (sharpbench.models.MODELS)


@dataclass
class ModelConfig:
    name: str = key(MISSING, "the network", spec="resnet18 | preact_resnet18 | wrn28_10 | tiny_cnn")


@dataclass
class WideResNetConfig(ModelConfig):
    dropout: float = key(0.0, "dropout rate between the convolutions of a wide block",
                         spec="float in [0, 1)")


@dataclass
class ModelExtras:
    """Builder arguments no option sets by default (add them with ``+model.<key>=``)."""
    width: int = key(16, "tiny_cnn: channels of the first convolution", spec="int >= 1")


# --- schedule: a multiplier of optimizer.lr per step


@dataclass
class ScheduleConfig:
    name: str = key(MISSING, "learning-rate schedule (a multiplier of optimizer.lr)",
                    spec="multistep | cosine | constant")
    warmup_epochs: Any = key(0, "linear warm-up from lr/steps to lr over this many epochs "
                                  "(before the schedule)", spec="float >= 0")


@dataclass
class MultistepConfig(ScheduleConfig):
    milestones: List[Any] = key(factory=lambda: [0.625, 0.9375],
                                  meaning="when lr is multiplied by gamma: epochs (1 or more) or "
                                          "fractions of trainer.max_epochs (below 1)",
                                  spec="list[float >= 0]")
    gamma: float = key(0.1, "factor applied to lr at each milestone", spec="float in (0, 1]")


@dataclass
class CosineConfig(ScheduleConfig):
    min_lr_ratio: float = key(0.0, "final lr as a fraction of lr", spec="float in [0, 1]")


# --- logger: where metrics go besides metrics.json (the CSV log is always kept)


@dataclass
class LoggerConfig:
    name: str = key(MISSING, "where metrics go besides metrics.json (the CSV log is always kept)",
                    spec="csv | wandb | tensorboard | none")


@dataclass
class WandbConfig(LoggerConfig):
    project: str = key("sharpbench", "Weights & Biases project", spec="str")
    group: Optional[str] = key(None, "Weights & Biases group", spec="null | str")
    offline: bool = key(False, "Weights & Biases offline mode (or WANDB_MODE=offline)", spec="bool")
    tags: List[str] = key(factory=list, meaning="Weights & Biases tags", spec="list[str]")
    run_name: Optional[str] = key("${run_name}", "Weights & Biases run name", spec="null | str")


# ``/schema/<name>`` of the YAML files' defaults lists.
TYPED_NODES = {"trainer": TrainerConfig, "monitor": MonitorConfig, "sweep": SweepConfig,
               "dataset/cifar": CifarConfig, "dataset/synthetic": SyntheticConfig,
               "model/model": ModelConfig, "model/wide_resnet": WideResNetConfig,
               "schedule/constant": ScheduleConfig, "schedule/multistep": MultistepConfig,
               "schedule/cosine": CosineConfig,
               "logger/logger": LoggerConfig, "logger/wandb": WandbConfig}
# Keys an option accepts but no option sets by default (documented, added with +group.key=).
EXTRAS = {"model": ModelExtras}

for _path, _node in TYPED_NODES.items():
    _group, _, _name = _path.rpartition("/")
    store(_name, _node, group="schema" + (f"/{_group}" if _group else ""))

# The optimizer group's typed configs are stored by the method registry as each method file is
# imported (sharpbench.optim.registry.register): find them all before Hydra composes.
discover_methods()

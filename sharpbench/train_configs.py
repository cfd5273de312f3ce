"""Typed configs of the training run's trainer group and its ``monitor`` and ``sweep`` nodes.

Each key's type (for Hydra: a structured config registered with the ConfigStore, so Hydra refuses
an unknown key or a value of the wrong type when composing), default, accepted values (``spec``,
in the value language of :mod:`sharpbench.schema`, which the training checks apply) and meaning
are written here once. ``conf/trainer/default.yaml`` and ``conf/train.yaml`` take their defaults
from these dataclasses (``/schema/trainer``, ``/schema/monitor``, ``/schema/sweep``); the options
(``trainer=cpu`` ...) set only what they change. :mod:`sharpbench.schema` derives its tables of
these keys from here, and with them ``--help`` and ``docs/configuration.md``.
"""
from dataclasses import dataclass
from typing import Any, Optional

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


@dataclass
class SweepConfig:
    """Sweep plumbing: where jobs run, not what they compute (not part of the identity)."""
    gpu_pool: Any = key(None, "hydra/launcher=local_parallel: GPU ids (or \"0,1\" groups) the "
                              "workers share, e.g. [0,1,2,3]", spec="null | list[any] | str")
    jobs_per_gpu: int = key(1, "workers per GPU of gpu_pool (set hydra.launcher.n_jobs = "
                               "len(gpu_pool) x jobs_per_gpu)", spec="int >= 1")
    objective: Optional[str] = key(None, "metrics.json key a job returns to an optimising sweeper "
                                         "(e.g. test_acc)", spec="null | str")


# ``/schema/<name>`` of the YAML files' defaults lists.
TYPED_NODES = {"trainer": TrainerConfig, "monitor": MonitorConfig, "sweep": SweepConfig}

store("trainer", TrainerConfig, group="schema")
store("monitor", MonitorConfig, group="schema")
store("sweep", SweepConfig, group="schema")

"""Typed configs of the optimizer group: the base step's keys, written once, and the blocks each
method's config composes.

A method declares its config beside its class, as a dataclass that extends one of the base-step
blocks below with its own keys, and names it in its registration::

    @dataclass
    class SAMConfig(SGDStep):
        rho: float = rho_key(0.05)
        ...

    @register_method("sam", ..., config=SAMConfig)
    class SAM(SharpnessAwareOptimizer): ...

The registry stores the dataclass with Hydra's ConfigStore as ``/schema/optimizer/<name>``;
``conf/optimizer/<name>.yaml`` uses it as its first default and sets its ``name``. Hydra then
checks every override's type against it, and the schema (:mod:`sharpbench.schema`) derives the
optimizer keys' accepted values and meanings, ``--help`` and ``docs/configuration.md`` from it.
A base optimizer's other arguments (``+optimizer.betas=...`` when ``optimizer.base=adam``) are
added with ``+``; those that have a documented meaning are in :class:`OptionalKeys`.
"""
from __future__ import annotations

from dataclasses import MISSING, dataclass
from typing import Any, List, Optional

from ..typed_config import key

BASES = ("sgd", "adam", "adamw", "rmsprop")


# --- keys shared by several configs (one meaning each)

def base_key(default: str) -> Any:
    return key(default, "the base optimizer taking the step with the method's gradient",
               spec=" | ".join(BASES))


def lr_key(default: float) -> Any:
    return key(default, "learning rate of the step actually taken (the base step)", spec="float > 0")


def weight_decay_key(default: float) -> Any:
    return key(default, "weight decay of the base step (L2 for sgd/adam/rmsprop, decoupled for "
                        "adamw/hatam)", spec="float >= 0")


def momentum_key(default: float) -> Any:
    return key(default, "momentum of the base step", spec="float in [0, 1)")


def betas_key() -> Any:
    return key(factory=lambda: [0.9, 0.999], meaning="decay rates of Adam's first and second "
                                                     "moment estimates",
               spec="list[float in [0, 1)] of 2")


def eps_key(default: float = 1e-8) -> Any:
    return key(default, "term added to the denominator for numerical stability", spec="float >= 0")


def rho_key(default: float = 0.05) -> Any:
    return key(default, "neighbourhood radius: the perturbation has norm rho", spec="float > 0")


def m_key() -> Any:
    return key(None, "m-sharpness: samples per perturbation on one device, each chunk of m "
                     "samples perturbed with its own gradient (equal to DDP over batch/m devices; "
                     "Foret et al. 2021, sec. 4.1); null: the whole batch",
               spec="null | int >= 1")


def bn_policy_key(default: str = "first_pass") -> Any:
    return key(default, "BatchNorm running statistics: updated by the first pass only (the JAX "
                        "original), by both passes, or frozen by momentum 0 in the second pass "
                        "(davda54/sam); sharpbench/optim/bn.py",
               spec="first_pass | both_passes | momentum_zero")


# --- the blocks


@dataclass
class MethodConfig:
    """Every method's config: its registered name (the YAML file sets it)."""
    name: str = key(MISSING, "the method (a registered name: sharpbench.optim.registry)", spec="str")


@dataclass
class ScheduleKeys(MethodConfig):
    """Which steps of a two-pass method are sharpness-aware (every two-pass method's config
    includes these; sharpbench/optim/sharpness_schedule.py)."""
    sam_every: int = key(1, "sharpness-aware steps only every k-th step, plain base steps between "
                            "(Composer's SAM interval); 1: every step", spec="int >= 1")
    sam_prob: float = key(1.0, "each (sam_every-th) step sharpness-aware with this probability, "
                               "plain otherwise (SS-SAM); 1: always", spec="float in (0, 1]")
    sam_seed: int = key(0, "seed of the sam_prob draws (the same on every DDP rank)", spec="int")


@dataclass
class SGDStep(MethodConfig):
    """The base step of the SAM family on CIFAR: SGD with momentum 0.9, lr 0.1, weight decay 5e-4."""
    base: str = base_key("sgd")
    lr: float = lr_key(0.1)
    momentum: float = momentum_key(0.9)
    nesterov: bool = key(False, "Nesterov momentum (sgd)", spec="bool")
    weight_decay: float = weight_decay_key(5e-4)


@dataclass
class AdamStep(MethodConfig):
    """Adam (Kingma & Ba 2015); weight decay is L2 (coupled), as in torch.optim.Adam."""
    base: str = base_key("adam")
    lr: float = lr_key(1e-3)
    betas: List[float] = betas_key()
    eps: float = eps_key()
    weight_decay: float = weight_decay_key(5e-4)


@dataclass
class AdamWStep(AdamStep):
    """AdamW (Loshchilov & Hutter 2019): decoupled weight decay."""
    base: str = base_key("adamw")
    weight_decay: float = weight_decay_key(5e-2)


@dataclass
class RMSpropStep(MethodConfig):
    """RMSprop (Tieleman & Hinton 2012)."""
    base: str = base_key("rmsprop")
    lr: float = lr_key(1e-3)
    alpha: float = key(0.99, "smoothing constant of RMSprop's squared-gradient average",
                       spec="float in [0, 1)")
    eps: float = eps_key()
    momentum: float = momentum_key(0.0)
    weight_decay: float = weight_decay_key(5e-4)


@dataclass
class OptionalKeys:
    """Constructor arguments no config sets by default (``+optimizer.<key>=...``): the base
    optimizers' other arguments, and SAM's ``adaptive``."""
    dampening: float = key(0.0, "momentum dampening (sgd)", spec="float in [0, 1]")
    amsgrad: bool = key(False, "AMSGrad variant of Adam/AdamW", spec="bool")
    centered: bool = key(False, "centred RMSprop (normalise by the variance estimate)", spec="bool")
    adaptive: bool = key(False, "SAM: davda54/sam's adaptive SAM, the neighbourhood scaled by |w| "
                                "(ASAM with eta 0)", spec="bool")

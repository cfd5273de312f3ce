"""Build any optimizer of the project from a flat, paper-style hyperparameter table.

A config such as ``{name: sam, base: sgd, lr: 0.1, momentum: 0.9, weight_decay: 5e-4, rho: 0.05}``
becomes ``SAM(params, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, weight_decay=5e-4)``.
``lr`` and ``weight_decay`` are always those of the step actually taken (the base step), so
``optimizer.lr=0.05`` means the same thing for every method.
"""
from __future__ import annotations

import inspect
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from .bn import check_bn_policy
from .registry import methods

BASE_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "rmsprop": torch.optim.RMSprop,
}

# Fields that configure the base optimizer; each is passed only to bases that accept it.
BASE_FIELDS = ("lr", "momentum", "nesterov", "dampening", "weight_decay", "betas", "eps",
               "alpha", "centered", "amsgrad", "foreach", "fused")
# The base step's implementation when the config names none: fused kernels (one op for all
# tensors, step counters on the device, so no host sync) where torch has them, foreach otherwise.
# torch's own default is a per-tensor loop on CPU and .item() on Adam's step counters.
FAST_BASE_STEP = {"sgd": {"fused": True}, "adam": {"fused": True}, "adamw": {"fused": True},
                  "rmsprop": {"foreach": True}}
# Fields read by the factory or by the driver (not passed to any optimizer constructor).
FACTORY_FIELDS = ("name", "base", "adaptive_params", "bn_policy")
# Facts about the run a method may need (e.g. SSAM's epoch-based refresh): passed by the driver
# to ``build_optimizer(..., context=...)`` and given to a method only if its constructor names
# them and the config does not set them.
CONTEXT_FIELDS = ("steps_per_epoch", "total_epochs")


class OptimizerConfigError(ValueError):
    """A bad optimizer configuration; the message says what to change."""


def method_registry() -> dict[str, type | None]:
    """Method name → class (``None``: the plain base optimizer, one pass per step)."""
    return {name: info.cls for name, info in methods().items()}


def split_fields(cfg: Mapping[str, Any]) -> tuple[str, str, dict, dict]:
    name = str(cfg.get("name", "")).lower()
    base = str(cfg.get("base", name if name in BASE_OPTIMIZERS else "sgd")).lower()
    base_kwargs = {k: v for k, v in cfg.items() if k in BASE_FIELDS and v is not None}
    method_kwargs = {k: v for k, v in cfg.items()
                     if k not in BASE_FIELDS and k not in FACTORY_FIELDS and v is not None}
    if "betas" in base_kwargs:
        base_kwargs["betas"] = tuple(base_kwargs["betas"])
    return name, base, base_kwargs, method_kwargs


def accepted_kwargs(cls: type, kwargs: dict) -> tuple[dict, list[str]]:
    params = inspect.signature(cls.__init__).parameters
    keep = {k: v for k, v in kwargs.items() if k in params}
    return keep, sorted(set(kwargs) - set(keep))


def check_driver_fields(cfg: Mapping[str, Any]) -> None:
    """The field the driver reads (the BatchNorm policy), checked here so that a bad value stops
    the run before any data loads."""
    try:
        check_bn_policy(cfg.get("bn_policy") or "first_pass")
    except ValueError as err:
        raise OptimizerConfigError(f"optimizer: {err}") from err


def constructor_params(cls: type) -> set[str]:
    """Keyword names ``cls(...)`` accepts, following ``**kwargs`` up to the parents' ``__init__``."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass is torch.optim.Optimizer or "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters
        names.update(params)
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            break
    return names


def param_groups(model: nn.Module, cfg: Mapping[str, Any]) -> list[dict] | Iterable:
    """ASAM's ``adaptive_params: weights`` reproduces the authors' code: only parameters whose
    name contains ``weight`` get ``T = |w| + eta``; the others form a group with ``adaptive=False``."""
    scope = cfg.get("adaptive_params")
    if scope in (None, "all"):
        return [p for p in model.parameters() if p.requires_grad]
    if scope != "weights":
        raise OptimizerConfigError(f"optimizer.adaptive_params must be 'all' or 'weights', got {scope!r}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if "weight" in n]},
            {"params": [p for n, p in named if "weight" not in n], "adaptive": False}]


def build_optimizer(model: nn.Module, cfg: Mapping[str, Any],
                    context: Mapping[str, Any] | None = None) -> torch.optim.Optimizer:
    """Instantiate the optimizer named by ``cfg['name']`` for ``model``'s parameters.

    ``context`` (optional): run facts from ``CONTEXT_FIELDS`` for methods that ask for them."""
    methods = method_registry()
    check_driver_fields(cfg)
    name, base, base_kwargs, method_kwargs = split_fields(cfg)
    if name not in methods:
        raise OptimizerConfigError(
            f"unknown optimizer {name!r}; choose one of: {', '.join(sorted(methods))} "
            "(e.g. optimizer=sam)")
    cls = methods[name]
    if cls is not None and not getattr(cls, "takes_base_optimizer", True):
        # A standalone method (e.g. HATAM): everything goes to its constructor.
        kwargs, ignored = accepted_kwargs(cls, {**base_kwargs, **method_kwargs})
        return _construct(cls, name, [p for p in model.parameters() if p.requires_grad],
                          kwargs, ignored)
    if base not in BASE_OPTIMIZERS:
        raise OptimizerConfigError(
            f"unknown base optimizer {base!r}; choose one of: {', '.join(BASE_OPTIMIZERS)} "
            "(e.g. optimizer.base=adam)")
    base_cls = BASE_OPTIMIZERS[base]
    if "foreach" not in base_kwargs and "fused" not in base_kwargs:
        base_kwargs.update(FAST_BASE_STEP[base])
    if cls is not None:
        # A field the method's constructor names is the method's (X-SAM's alpha is not RMSprop's).
        own = set(inspect.signature(cls.__init__).parameters)
        method_kwargs.update({k: base_kwargs.pop(k) for k in list(base_kwargs)
                              if k in own and k not in ("lr", "weight_decay")})
    base_kwargs, ignored = accepted_kwargs(base_cls, base_kwargs)
    if cls is None:
        if method_kwargs:
            raise OptimizerConfigError(
                f"optimizer {name!r} is the plain {base} step and takes no method hyperparameters; "
                f"remove {sorted(method_kwargs)} or pick a sharpness-aware method")
        return _construct(base_cls, name, model.parameters(), base_kwargs, ignored)
    takes = constructor_params(cls)
    for key, value in (context or {}).items():
        if key in CONTEXT_FIELDS and key in takes and method_kwargs.get(key) is None:
            method_kwargs[key] = value
    return _construct(cls, name, param_groups(model, cfg), {**method_kwargs, **base_kwargs},
                      ignored, base_optimizer=base_cls)


def _construct(cls, name, params, kwargs, ignored, **extra):
    if ignored:
        import logging
        logging.getLogger(__name__).info("optimizer %s: ignoring %s (not used by this base optimizer)",
                                         name, ", ".join(ignored))
    try:
        return cls(params, **extra, **kwargs)
    except TypeError as err:
        raise OptimizerConfigError(f"optimizer {name!r}: {err}; check conf/optimizer/{name}.yaml "
                                   "and your overrides") from err
    except ValueError as err:
        raise OptimizerConfigError(f"optimizer {name!r}: {err}") from err

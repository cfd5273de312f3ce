"""Start-up checks: bad input stops the run before any work, with a message that says what to change.

``check_config`` runs before any data is loaded: every key against :mod:`sharpbench.schema`
(unknown keys with the nearest valid one, types and ranges), then the rules that relate several
keys, then the optimizer's own checks (it is built on a stand-in parameter). ``check_data`` runs
once the data is loaded. Every message names the key, the bad value, what is accepted and an
example override.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from . import schema
from .schema import format_value


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the setting and how to fix it."""



WAYS_OUT = ("To run this configuration, use another folder (hydra.run.dir=..., or "
            "hydra.sweep.dir=... for a sweep; or another run_name), or delete that folder to "
            "start over in it; to resume the original run, use its original settings.")
REMOVED_ON_CONFIG_CHANGE = ("new_folder", "extend")


def on_config_change_problem(value: Any) -> str | None:
    """``refuse`` is what always happens; the removed ``new_folder``/``extend`` name the ways out."""
    value = "refuse" if value in (None, "") else str(value)
    if value == "refuse":
        return None
    if value in REMOVED_ON_CONFIG_CHANGE:
        return (f"on_config_change={value} was removed: a folder holding another "
                f"configuration's run is always refused. {WAYS_OUT}")
    return f"on_config_change={value!r}: the only value is refuse. {WAYS_OUT}"


HELP_HINT = "python -m sharpbench.train --help lists every key with its meaning"


def config_errors() -> tuple[type[BaseException], ...]:
    """Every error class that means "the user's input is wrong" (reported without a traceback)."""
    from .data import DataConfigError
    from .models import ModelConfigError
    from .optim.factory import OptimizerConfigError
    from .schedule import ScheduleConfigError
    return (ConfigError, DataConfigError, ModelConfigError, OptimizerConfigError, ScheduleConfigError)


# ---------------------------------------------------------------------------------------------
# Messages


def _path(group: str, name: str) -> str:
    return f"{group}.{name}" if group else name


# Lightning Trainer arguments that sharpbench provides under another name or another meaning.
LIGHTNING_NAMES = {
    ("trainer", "accumulate_grad_batches"): (
        "Lightning's gradient accumulation does not apply to the manual optimization that "
        "two-pass methods need; sharpbench's is trainer.micro_batches=k, which runs each batch "
        "(dataset.batch_size) as k micro-batches: a loader batch b with accumulate_grad_batches=k "
        "is dataset.batch_size=k*b trainer.micro_batches=k"),
}


def unknown_key_message(group: str, name: str, value: Any, accepted: Mapping[str, schema.Key],
                        option: str | None) -> str:
    """``group.name`` is not a key of the group's selected option."""
    if (group, name) in LIGHTNING_NAMES:
        return f"unknown key {_path(group, name)}={format_value(value)}: " \
               f"{LIGHTNING_NAMES[(group, name)]}."
    where = f"{group}={option}" if option else (group or "the top level")
    nearest = schema.did_you_mean(name, list(accepted))
    target = nearest or next(iter(accepted), name)
    example = value if nearest and value is not None else schema.example_value(group, option, target, accepted.get(target))
    example = f"{_path(group, target)}={format_value(example)}"
    hint = f"; did you mean {_path(group, nearest)}?" if nearest else "."
    if not nearest:
        other, users = _elsewhere(group, name, option)
        if users:
            hint = (f" ({other} is a key of {group}={', '.join(users)}: select one of them to "
                    "use it).")
            example = f"{group}={users[0]} {_path(group, other)}={format_value(value)}"
    return (f"unknown key {_path(group, name)}={format_value(value)}: {where} has no key {name!r}"
            f"{hint} Accepted keys: {', '.join(accepted)} (a + cannot add other keys). "
            f"Example: {example} ({HELP_HINT}).")


def _elsewhere(group: str, name: str, option: str | None) -> tuple[str, list[str]]:
    """The key (``name`` or the nearest one) that other options of the group take, and those options."""
    if not group or option is None:
        return name, []
    candidates = {k for k in schema.GROUPS[group].keys if "." not in k}
    target = name if name in candidates else schema.did_you_mean(name, sorted(candidates))
    users = [o for o in schema.options_using(group, target) if o != option] if target else []
    return target or name, users


def value_message(group: str, name: str, value: Any, key: schema.Key, problem: str,
                  option: str | None) -> str:
    """``group.name=value`` has the wrong type or is out of range."""
    path = _path(group, name)
    what = "is out of range" if problem == "range" else (
        "is not an accepted value" if key.choices else f"has the wrong type ({type(value).__name__})")
    nearest = schema.did_you_mean(str(value), key.choices) if key.choices else None
    hint = f"; did you mean {path}={nearest}?" if nearest else "."
    example = schema.example_value(group, option, name, key)
    return (f"{path}={format_value(value)} {what}: {path} accepts {key.spec} ({key.meaning}){hint} "
            f"Example: {path}={format_value(nearest or example)}.")


def group_not_a_node_message(group: str, value: Any) -> str:
    options = schema.group_options(group)
    return (f"{group}={format_value(value)}: {group} is a config group, select one of its options: "
            f"{', '.join(options)}. Example: {group}={options[0] if options else 'name'}.")


# ---------------------------------------------------------------------------------------------
# The schema


def resolved(cfg: Any) -> dict[str, Any]:
    """The config as plain data, interpolations resolved (``hydra`` left out); a key whose
    interpolation fails is named in the error."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException
    if not isinstance(cfg, DictConfig):
        return {k: v for k, v in dict(cfg).items() if k not in schema.FOREIGN}
    out: dict[str, Any] = {}
    for top in cfg:
        if top in schema.FOREIGN:
            continue
        try:
            value = cfg[top]
            out[top] = OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) \
                else value
        except OmegaConfBaseException as err:
            raise ConfigError(_interpolation_message(cfg, top, err)) from None
    return out


def _interpolation_message(cfg: Any, top: str, err: Exception) -> str:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException
    node = OmegaConf.to_container(cfg, resolve=False).get(top)
    path, raw = top, node
    if isinstance(node, dict):
        node = cfg[top]
        for key in node:
            try:
                node[key]
            except OmegaConfBaseException:
                path, raw = f"{top}.{key}", OmegaConf.to_container(node, resolve=False).get(key)
                break
    reason = str(err).splitlines()[0]
    return (f"{path}={raw}: its value cannot be resolved ({reason}); give a plain value, "
            f"e.g. {path}=<value>, or fix the interpolation.")


def schema_problems(cfg: Any) -> list[str]:
    """Messages for every unknown, missing, mistyped or out-of-range key of the config."""
    root = resolved(cfg)
    problems: list[str] = []
    for name, value in root.items():
        if name in schema.GROUPS:
            if not isinstance(value, Mapping):
                problems.append(group_not_a_node_message(name, value))
            else:
                problems += group_problems(name, value)
        elif name in schema.accepted_keys("", root):
            key = schema.accepted_keys("", root)[name]
            problem = key.problem(value)
            if problem:
                problems.append(value_message("", name, value, key, problem, None))
            elif isinstance(value, Mapping) and isinstance(schema._yaml("", "train").get(name), Mapping):
                problems += _undescribed_node_problems(name, value)
        else:
            accepted = {**schema.TOP, **{g: schema.Key("dict", "config group") for g in schema.GROUPS}}
            problems.append(unknown_key_message("", name, value, accepted, None))
    for name in schema.GROUPS:
        if name not in root and name in schema._yaml("", "train"):
            problems.append(f"{name}: the group is missing from the config; select one of its "
                            f"options, e.g. {name}={(schema.group_options(name) or ['...'])[0]}.")
    return problems


def _undescribed_node_problems(name: str, node: Mapping[str, Any]) -> list[str]:
    """A top-level node train.yaml defines but no table describes yet: its keys are those of
    train.yaml, each typed by its default."""
    defaults = schema._yaml("", "train")[name]
    keys = {k: schema.inferred_key(k, (f"the YAML default {format_value(v)}", v))
            for k, v in defaults.items()}
    problems = []
    for key, value in node.items():
        if key not in keys:
            problems.append(unknown_key_message(name, key, value, keys, None))
        elif keys[key].problem(value):
            problems.append(value_message(name, key, value, keys[key], keys[key].problem(value), None))
    return problems


def group_problems(group: str, node: Mapping[str, Any]) -> list[str]:
    g = schema.GROUPS[group]
    option = schema.option_of(group, node)
    if g.named and option is not None:
        name_key = g.keys["name"]
        if name_key.problem(option):
            return [value_message(group, "name", option, name_key, "type", option)]
    accepted = schema.accepted_keys(group, node)
    problems = []
    for name, value in node.items():
        key = accepted.get(name)
        if key is None:
            if g.extras or (value is None and schema.known_anywhere(group, name)):
                continue  # e.g. rho: null for SGD in experiment=table1_full: "not set"
            problems.append(unknown_key_message(group, name, value, accepted, option))
            continue
        problem = key.problem(value)
        if problem:
            problems.append(value_message(group, name, value, key, problem, option))
    for name in schema.yaml_defaults(group, option):
        if name not in node and name in accepted:
            problems.append(f"{group}.{name} is missing (removed with ~?); the run needs it. "
                            f"Example: {group}.{name}="
                            f"{format_value(schema.example_value(group, option, name, accepted[name]))}.")
    return problems


# ---------------------------------------------------------------------------------------------
# Rules that relate several keys


def cross_field_problems(root: Mapping[str, Any]) -> list[str]:
    """Settings that are each valid but do not work together (no data needed); ``root`` is the
    resolved config (:func:`resolved`) that passed the schema."""
    problems = []
    if (removed := on_config_change_problem(root.get("on_config_change"))) is not None:
        problems.append(removed)
    t, opt, data = root["trainer"], root["optimizer"], root["dataset"]
    accelerator, devices = str(t.get("accelerator", "auto")), t.get("devices", 1)
    if accelerator in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            problems.append(f"trainer.accelerator={accelerator} but no CUDA GPU is visible: use "
                            "trainer=default (GPU when present, else CPU) or trainer=cpu")
        elif isinstance(devices, int) and devices > torch.cuda.device_count():
            problems.append(f"trainer.devices={devices} but {torch.cuda.device_count()} CUDA GPU(s) "
                            f"are visible: use trainer.devices={torch.cuda.device_count()} or fewer")
    from .optim import METHODS
    name, base = opt.get("name"), opt.get("base", opt.get("name"))
    if name in METHODS and METHODS[name] is None and base != name:
        problems.append(f"optimizer.base={base} with optimizer={name}: the plain {name} step has "
                        f"no other base; use optimizer={base}, or a sharpness-aware method with "
                        f"optimizer.base={base} (e.g. optimizer=sam optimizer.base={base})")
    m, batch = opt.get("m"), data.get("batch_size")
    if isinstance(m, int) and isinstance(batch, int) and m >= 1 and batch % m:
        divisors = [d for d in range(1, batch + 1) if batch % d == 0 and d < batch]
        problems.append(f"optimizer.m={m} (samples per perturbation) must divide "
                        f"dataset.batch_size={batch}: choose m among {divisors[-6:]} (or "
                        f"optimizer.m=null for the whole batch)")
    k = t.get("micro_batches", 1)
    if isinstance(k, int) and isinstance(batch, int) and k >= 1:
        if batch % k:
            divisors = [d for d in range(1, batch + 1) if batch % d == 0]
            problems.append(f"trainer.micro_batches={k} must divide dataset.batch_size={batch} "
                            f"(the batch of one step, run as {k} micro-batches): choose it among "
                            f"{divisors[:8]}")
        elif k > 1 and isinstance(m, int) and m >= 1 and (batch // k) % m:
            problems.append(f"optimizer.m={m} must divide the micro-batch of {batch // k} samples "
                            f"(dataset.batch_size={batch} / trainer.micro_batches={k}): choose m "
                            f"among the divisors of {batch // k}, or leave it null (m = the "
                            f"micro-batch)")
    classes = expected_classes(data)
    subset = data.get("train_subset")
    if classes and subset is not None and subset < classes:
        problems.append(f"dataset.train_subset={subset} is smaller than the number of classes "
                        f"({classes} in {data.get('name')}): every class needs a training image; "
                        f"use dataset.train_subset={max(classes * 10, 100)} or more")
    return problems


def expected_classes(data: Mapping[str, Any]) -> int | None:
    from .data.sources import CIFAR_NUM_CLASSES
    if data.get("name") == "synthetic":
        return int(data.get("num_classes") or 10)
    return CIFAR_NUM_CLASSES.get(data.get("name"))


def failure_status(err: BaseException) -> str:
    """``data_unavailable`` for an environment problem (dataset missing, download impossible,
    archive corrupt), ``invalid_config`` for a setting the user must change."""
    from .data import DatasetUnavailableError
    return "data_unavailable" if isinstance(err, DatasetUnavailableError) else "invalid_config"


def check_config(cfg: Any) -> None:
    """Checks that need no data: every key, the rules between keys, the optimizer's own checks."""
    from omegaconf import OmegaConf
    from .optim.factory import build_optimizer
    from .schedule import check_schedule

    problems = schema_problems(cfg)
    if not problems:
        problems = cross_field_problems(resolved(cfg))
    if problems:
        raise ConfigError("\n".join(problems))
    check_schedule(cfg.schedule, int(cfg.trainer.max_epochs))
    # Build the optimizer on a stand-in parameter: every hyperparameter check of every method
    # (rho <= 0, p < 1, sparsity outside [0, 1), unknown base …) runs here, before any data loads.
    probe = nn.Sequential(nn.Linear(2, 2))
    build_optimizer(probe, OmegaConf.to_container(cfg.optimizer, resolve=True),
                    context={"steps_per_epoch": 1, "total_epochs": int(cfg.trainer.max_epochs)})


def check_data(cfg: Any, data: Any) -> None:
    """Checks that need the loaded data (the data layer itself refuses empty classes and
    subsets larger than the data; see :func:`sharpbench.data.splits.build_splits`)."""
    n_train = len(data.train_y)
    batch = int(cfg.dataset.batch_size)
    world = int(cfg.trainer.get("devices", 1)) if str(cfg.trainer.get("devices", 1)).isdigit() else 1
    if batch * world > n_train:
        raise ConfigError(
            f"dataset.batch_size={batch}{f' × {world} devices' if world > 1 else ''} is larger "
            f"than the training set ({n_train} images after subsetting/val split): lower "
            f"dataset.batch_size or raise dataset.train_subset. Example: "
            f"dataset.batch_size={max(1, min(128, n_train // (4 * world)))}")

"""The schema of the whole training config: every key of every group, what it accepts, what it
means, for ``--help``, ``docs/configuration.md`` and the checks of :mod:`sharpbench.checks`.

Each key's type, default, accepted values and meaning are written once, in a typed config (a
dataclass registered with Hydra's ConfigStore): the groups' and nodes' in
:mod:`sharpbench.train_configs`, each method's beside its class (:mod:`sharpbench.optim.step_config`).
This module derives its tables from them (``keys_of``, ``group_keys``, ``optimizer_keys``); only
the top-level keys (``TOP``) are written here. :mod:`sharpbench.checks` applies the tables, plus
the rules that relate several keys, before anything runs.

Accepted values are written in a small language, alternatives joined by `` | ``:

- ``int``, ``float`` (an int is accepted too), optionally with a range: ``int >= 1``,
  ``float > 0``, ``float in [0, 1)``;
- ``bool``, ``str``, ``dict``, ``any``, ``null`` (the YAML ``null``: "not set");
- ``list[<one alternative>]``, optionally ``of N`` items: ``list[float in [0, 1)] of 2``;
- anything else is a literal value: ``auto | cpu | gpu | cuda``, ``-1``.

The optimizer and model groups also accept their constructors' other parameters (a method's and
its base optimizer's, added with ``+``): ``Group.members`` reads them from the signatures, and a
parameter no typed config describes gets its type from its default (``inferred_key``).
"""
from __future__ import annotations

import difflib
import inspect
import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .optim.registry import names as registered_methods
from .train_configs import MonitorConfig, SweepConfig, TrainerConfig

CONF_DIR = Path(__file__).resolve().parent / "conf"

# ---------------------------------------------------------------------------------------------
# The value language


@dataclass(frozen=True)
class Alternative:
    """One alternative of a spec: a type with an optional range, or a literal."""

    kind: str                      # int float bool str dict any null list literal
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    literal: str = ""
    item: "Alternative | None" = None
    length: int | None = None

    def type_ok(self, v: Any) -> bool:
        if self.kind == "any":
            return True
        if self.kind == "null":
            return v is None
        if v is None:
            return False
        if self.kind == "int":
            return isinstance(v, int) and not isinstance(v, bool)
        if self.kind == "float":
            return isinstance(v, (int, float)) and not isinstance(v, bool)
        if self.kind == "bool":
            return isinstance(v, bool)
        if self.kind == "str":
            return isinstance(v, str)
        if self.kind == "dict":
            return isinstance(v, Mapping)
        if self.kind == "list":
            return (isinstance(v, Sequence) and not isinstance(v, str)
                    and all(self.item.type_ok(x) for x in v))
        return not isinstance(v, (bool, Mapping, list, tuple)) and str(v) == self.literal

    def range_ok(self, v: Any) -> bool:
        if self.kind == "list":
            return ((self.length is None or len(v) == self.length)
                    and all(self.item.range_ok(x) for x in v))
        if self.kind not in ("int", "float"):
            return True
        if isinstance(v, float) and not math.isfinite(v):
            return False  # nan, and inf (a learning rate of inf diverges at once)
        above = v > self.low if self.low_open else v >= self.low
        below = v < self.high if self.high_open else v <= self.high
        return above and below

    def example(self) -> Any:
        """A value this alternative accepts (for messages)."""
        if self.kind == "literal":
            return self.literal
        if self.kind in ("int", "float"):
            lo = 0 if self.low == -math.inf else self.low
            if self.high != math.inf and (self.high_open or self.low_open):
                return (lo + self.high) / 2 if self.kind == "float" else int(lo) + 1
            step = 1 if self.kind == "int" else 0.1
            value = lo + step if self.low_open else lo
            return int(value) if self.kind == "int" else value
        if self.kind == "list":
            n = self.length or 2
            return [self.item.example()] * n
        return {"bool": True, "str": "name", "null": None, "dict": {}, "any": None}[self.kind]


_NUMBER = r"[-+]?(?:\d+\.?\d*(?:e[-+]?\d+)?|inf)"
_OPS = re.compile(rf"^(int|float)\s*(>=|>|<=|<)\s*({_NUMBER})$")
_INTERVAL = re.compile(rf"^(int|float)\s+in\s+([\[(])\s*({_NUMBER})\s*,\s*({_NUMBER})\s*([\])])$")


def parse_alternative(text: str) -> Alternative:
    text = text.strip()
    if text in ("int", "float", "bool", "str", "dict", "any", "null"):
        return Alternative(text)
    if text.startswith("list[") and "]" in text:
        close = text.rindex("]")
        rest = text[close + 1:].strip()
        length = int(rest[3:]) if rest.startswith("of ") else None
        return Alternative("list", item=parse_alternative(text[5:close]), length=length)
    m = _OPS.match(text)
    if m:
        kind, op, num = m.group(1), m.group(2), float(m.group(3))
        if op.startswith(">"):
            return Alternative(kind, low=num, low_open=op == ">")
        return Alternative(kind, high=num, high_open=op == "<")
    m = _INTERVAL.match(text)
    if m:
        return Alternative(m.group(1), low=float(m.group(3)), high=float(m.group(4)),
                           low_open=m.group(2) == "(", high_open=m.group(5) == ")")
    if text.split()[0] in ("int", "float", "list"):
        raise ValueError(f"cannot parse the value spec {text!r}")
    return Alternative("literal", literal=text)


@dataclass(frozen=True)
class Key:
    """A config key: the values it accepts (``spec``, see the module docstring) and its meaning.

    ``options``: the group options that use the key (``None``: every option)."""

    spec: str
    meaning: str
    options: tuple[str, ...] | None = None
    alternatives: tuple[Alternative, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        alts = tuple(parse_alternative(a) for a in self.spec.split(" | "))
        object.__setattr__(self, "alternatives", alts)

    def problem(self, value: Any) -> str | None:
        """``None`` if ``value`` is accepted, else ``"type"`` or ``"range"``."""
        typed = [a for a in self.alternatives if a.type_ok(value)]
        if any(a.range_ok(value) for a in typed):
            return None
        return "range" if typed else "type"

    def example(self) -> Any:
        for alt in self.alternatives:
            if alt.kind != "null":
                return alt.example()
        return None

    @property
    def choices(self) -> list[str]:
        """The literal values, when the key takes nothing else (e.g. a name)."""
        if all(a.kind in ("literal", "null") for a in self.alternatives):
            return [a.literal if a.kind == "literal" else "null" for a in self.alternatives]
        return []


# ---------------------------------------------------------------------------------------------
# The groups

TOP = {
    "seed": Key("int in [0, 4294967295]", "seeds model initialisation, data order, augmentation and every random choice"),
    "ckpt_path": Key("null | str", "null: start fresh; last: resume <run dir>/checkpoints/last.ckpt; or a .ckpt path"),
    "on_config_change": Key("refuse | new_folder | extend", "a folder holding another config's checkpoint or completed record is refused, naming the keys that differ (new_folder and extend were removed: each is refused with the ways out)"),
    "label_smoothing": Key("float in [0, 1)", "label smoothing of the cross-entropy (0.1 in the paper's Table 1 recipe)"),
    "run_name": Key("str", "name of the run folder (default <method>-<dataset>-<model>-seed<seed>)"),
    "sweep_name": Key("str", "name of the sweep folder under outputs/sweeps/"),
}

def keys_of(cls: type) -> dict[str, Key]:
    """The keys of a typed config (:mod:`sharpbench.train_configs`) as schema entries."""
    from .typed_config import rows
    return {r.key: Key(r.type, r.meaning) for r in rows(cls)}


SWEEP = keys_of(SweepConfig)
MONITOR = keys_of(MonitorConfig)
TRAINER = keys_of(TrainerConfig)

def group_options(group: str) -> list[str]:
    """The options of a config group (its YAML files)."""
    folder = CONF_DIR / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


@lru_cache(maxsize=None)
def _load(group: str, option: str) -> dict:
    """``conf/<group>/<option>.yaml`` (``group=""``: ``train.yaml``) as written, or ``{}``."""
    from omegaconf import OmegaConf
    path = CONF_DIR / group / f"{option}.yaml" if group else CONF_DIR / "train.yaml"
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False) if path.is_file() else {}


def _schema_entry(entry: Any) -> tuple[str, str] | None:
    """A defaults-list entry ``/schema/<node>@<package>`` as ``(node, package)``, else ``None``."""
    if isinstance(entry, str) and entry.startswith("/schema/"):
        node, _, package = entry[len("/schema/"):].partition("@")
        return node, package
    return None


def typed_node_of(group: str, option: str) -> str | None:
    """The typed config ``conf/<group>/<option>.yaml`` takes its keys from (its
    ``/schema/<node>@_here_`` default), e.g. ``dataset/cifar``; ``None`` if it has none."""
    for entry in _load(group, option).get("defaults") or []:
        typed = _schema_entry(entry)
        if typed is not None and typed[1] == "_here_":
            return typed[0]
    return None


def group_keys(group: str) -> dict[str, Key]:
    """A group's keys from its options' typed configs (and its documented extras): each key once,
    ``options`` naming the options that have it when not all do."""
    from .train_configs import EXTRAS, TYPED_NODES
    from .typed_config import rows
    options = group_options(group)
    have: dict[str, list[str]] = {}
    keys: dict[str, Key] = {}
    for option in options:
        node = TYPED_NODES.get(typed_node_of(group, option) or "")
        for r in rows(node) if node is not None else ():
            keys.setdefault(r.key, Key(r.type, r.meaning))
            have.setdefault(r.key, []).append(option)
    for name, key in keys.items():
        if len(have[name]) < len(options):
            keys[name] = Key(key.spec, key.meaning, options=tuple(have[name]))
    if group in EXTRAS:
        keys.update(keys_of(EXTRAS[group]))
    return keys


DATASET = group_keys("dataset")
SCHEDULE = group_keys("schedule")
LOGGER = group_keys("logger")
MODEL = group_keys("model")

def optimizer_keys() -> dict[str, Key]:
    """The optimizer group's keys from the registered methods' typed configs
    (:mod:`sharpbench.optim.step_config`): the base step's keys once, then each method's. A key
    whose meaning depends on the method is listed as ``<method>.<key>`` for every method after
    the first that has it; ``options`` names the methods whose config sets a key (not the base
    step's keys, which every method has or can take)."""
    from .optim.registry import methods
    from .optim.step_config import AdamStep, OptionalKeys, RMSpropStep, SGDStep
    from .typed_config import rows
    keys = {"name": Key(" | ".join(registered_methods()),
                        "the method (the registered methods: sharpbench.optim.registry)")}
    for block in (SGDStep, AdamStep, RMSpropStep, OptionalKeys):
        for r in rows(block):
            if r.key != "name":
                keys.setdefault(r.key, Key(r.type, r.meaning))
    shared = set(keys)
    users: dict[str, list[str]] = {}
    for name, info in methods().items():
        for r in rows(info.config) if info.config is not None else ():
            if r.key == "name":
                continue
            key = Key(r.type, r.meaning)
            if r.key in shared and keys[r.key] == key:
                continue
            if r.key not in shared and (r.key not in keys or keys[r.key] == key):
                keys[r.key] = key
                users.setdefault(r.key, []).append(name)
            else:
                keys[f"{name}.{r.key}"] = Key(r.type, r.meaning, options=(name,))
    for name, who in users.items():
        keys[name] = Key(keys[name].spec, keys[name].meaning, options=tuple(who))
    return keys


OPTIMIZER = optimizer_keys()


@dataclass(frozen=True)
class Group:
    """A config group: its key table and, for constructor-defined groups, where its keys come from.

    ``members(option, node)``: the key names the option accepts (None: the table's keys for that
    option). ``extras``: whether ``+group.key=...`` may add keys nobody declared."""

    keys: dict[str, Key]
    members: Callable[[str | None, Mapping], set[str]] | None = None
    extras: bool = False
    named: bool = True          # the node's ``name`` key is its option

    def key(self, name: str, option: str | None) -> Key | None:
        return self.keys.get(f"{option}.{name}") or self.keys.get(name)

    def accepted(self, option: str | None, node: Mapping) -> dict[str, Key]:
        """Every key the option accepts, with its spec."""
        if self.members is None:
            return {k: v for k, v in self.keys.items()
                    if "." not in k and (v.options is None or option in v.options)}
        out = {}
        for name in sorted(self.members(option, node)):
            out[name] = self.key(name, option) or inferred_key(name)
        return out


def _parameters(fn: Any, skip: Sequence[str] = ("self", "params", "base_optimizer")) -> dict[str, inspect.Parameter]:
    sig = inspect.signature(fn.__init__ if inspect.isclass(fn) else fn)
    return {n: p for n, p in sig.parameters.items()
            if n not in skip and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


@lru_cache(maxsize=None)
def constructor_of(group: str, option: str | None, base: str | None = None) -> dict[str, tuple[str, Any]]:
    """``{parameter: (owner, default)}`` of the constructor(s) behind a group option."""
    out: dict[str, tuple[str, Any]] = {}
    if group == "model":
        from .models import MODELS
        if option in MODELS:
            fn = MODELS[option]
            for n, p in _parameters(fn, ("num_classes",)).items():
                out[n] = (f"sharpbench.models.{fn.__name__}", p.default)
        return out
    from .optim import METHODS
    from .optim.factory import BASE_OPTIMIZERS
    if option not in METHODS:
        return out
    cls = METHODS[option]
    takes_base = cls is None or getattr(cls, "takes_base_optimizer", True)
    base_cls = BASE_OPTIMIZERS.get(base or (option if cls is None else "sgd")) if takes_base else None
    for owner in (base_cls, cls):
        if owner is not None:
            for n, p in _parameters(owner).items():
                out[n] = (_qualified(owner), p.default)
    return out


def _qualified(cls: type) -> str:
    module = cls.__module__
    if module.startswith(("torch.optim.", "sharpbench.optim.")):
        module = module.rsplit(".", 1)[0]
    return f"{module}.{cls.__qualname__}"


def inferred_key(name: str, owner_default: tuple[str, Any] | None = None) -> Key:
    """A key with no table entry (e.g. torch's ``foreach``): its type from its default value."""
    owner, default = owner_default or ("the constructor", inspect.Parameter.empty)
    kind = ("bool" if isinstance(default, bool) else "int" if isinstance(default, int)
            else "float" if isinstance(default, float) else "str" if isinstance(default, str)
            else "any")
    if owner.startswith("the YAML"):
        return Key(kind if default is not None else "any", f"(not described yet; {owner})")
    if owner.startswith("torch."):  # the same meaning for every torch base optimizer
        return Key(kind, "passed to the torch.optim base optimizer (see its documentation)")
    return Key(kind, f"argument {name!r} of {owner}")


# Constructor parameters the trainer fills in (epoch facts), not config keys.
SUPPLIED_BY_DRIVER = ("steps_per_epoch", "total_epochs")


def optimizer_members(option: str | None, node: Mapping) -> set[str]:
    from .optim import METHODS
    names = {"name"}
    if option not in METHODS:
        return names
    cls = METHODS[option]
    if cls is None or getattr(cls, "takes_base_optimizer", True):
        names.add("base")
    from .optim.base import SCHEDULE_KEYS, SharpnessAwareOptimizer
    if cls is not None and issubclass(cls, SharpnessAwareOptimizer):
        names.add("bn_policy")  # the driver's BatchNorm policy: every multi-pass method has it
        if cls.takes_schedule:  # which steps are sharpness-aware: every such method takes them
            names.update(SCHEDULE_KEYS)
    names |= set(constructor_of("optimizer", option, _base(option, node))) - set(SUPPLIED_BY_DRIVER)
    names |= {k for k, v in OPTIMIZER.items() if v.options and option in v.options}
    names |= set(yaml_defaults("optimizer", option))
    return names


def _base(option: str | None, node: Mapping) -> str | None:
    base = node.get("base") if isinstance(node, Mapping) else None
    return str(base) if isinstance(base, str) else None


def model_members(option: str | None, node: Mapping) -> set[str]:
    return {"name"} | set(constructor_of("model", option))


GROUPS: dict[str, Group] = {
    "optimizer": Group(OPTIMIZER, members=optimizer_members),
    "model": Group(MODEL, members=model_members),
    "dataset": Group(DATASET),
    "schedule": Group(SCHEDULE),
    "trainer": Group(TRAINER, named=False),
    "logger": Group(LOGGER),
    "sweep": Group(SWEEP, named=False),
    "monitor": Group(MONITOR, named=False),
}
# Top-level nodes that are not ours to check.
FOREIGN = ("hydra",)


def option_of(group: str, node: Any) -> str | None:
    if group in GROUPS and GROUPS[group].named and isinstance(node, Mapping):
        name = node.get("name")
        return str(name) if name is not None else None
    return None


def accepted_keys(group: str, node: Mapping) -> dict[str, Key]:
    """Every key the group's selected option accepts, with its spec (``group=""``: top level).

    A key that the option's YAML file sets but no table describes is accepted too, its type
    taken from its default (so a key added in parallel work runs; ``tests/test_schema.py`` asks
    for its line here)."""
    if group == "":
        keys = dict(TOP)
        defaults = {k: v for k, v in _yaml("", "train").items() if k not in GROUPS and k not in FOREIGN}
    else:
        g = GROUPS[group]
        option = option_of(group, node)
        keys = g.accepted(option, node)
        if g.members is not None:  # constructor-defined: infer what no table describes
            params = constructor_of(group, option, _base(option, node))
            for name in keys:
                if g.key(name, option) is None:
                    keys[name] = inferred_key(name, params.get(name))
        defaults = yaml_defaults(group, option)
    for name, value in defaults.items():
        if name not in keys:
            keys[name] = inferred_key(name, (f"the YAML default {format_value(value)}", value))
    return keys


def known_anywhere(group: str, name: str) -> bool:
    """Whether some option of the group takes ``name`` (table1_full sets ``rho: null`` for SGD)."""
    return name in GROUPS[group].keys


def options_using(group: str, name: str) -> list[str]:
    """The options of ``group`` that accept the key ``name``."""
    if group not in GROUPS:
        return []
    out = []
    for option in group_options(group):
        node = {**yaml_defaults(group, option), "name": option} if GROUPS[group].named else {}
        if name in accepted_keys(group, node):
            out.append(option)
    return out


def did_you_mean(name: str, candidates: Sequence[str]) -> str | None:
    match = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return match[0] if match else None


# ---------------------------------------------------------------------------------------------
# Defaults, from the YAML files


@lru_cache(maxsize=None)
def _yaml(group: str, option: str) -> dict:
    node = dict(_load(group, option))
    merged: dict = {}
    for entry in node.pop("defaults", None) or []:
        typed = _schema_entry(entry)
        if isinstance(entry, str) and entry != "_self_" and "/" not in entry and "@" not in entry:
            merged.update(_yaml(group, entry))  # an option of the same group it extends
        elif typed is not None:  # a typed config's defaults
            name, package = typed
            if package in ("", "_here_"):
                merged.update(typed_defaults(name))
            else:
                merged[package] = typed_defaults(name)
    merged.update(node)
    return merged


def typed_defaults(name: str) -> dict:
    """The defaults of the typed config ``/schema/<name>`` (:mod:`sharpbench.train_configs`)."""
    from .train_configs import TYPED_NODES
    from .typed_config import defaults
    cls = TYPED_NODES.get(name)
    if name.startswith("optimizer/"):  # a method's, stored by the registry
        from .optim.registry import methods
        info = methods().get(name[len("optimizer/"):])
        cls = info.config if info is not None else None
    return defaults(cls) if cls is not None else {}


def yaml_defaults(group: str, option: str | None) -> dict:
    """The keys and default values the option's YAML file sets (its ``defaults`` list included)."""
    if group in GROUPS and not GROUPS[group].named:  # trainer: conf/trainer/*; sweep: a train.yaml node
        if not (CONF_DIR / group).is_dir():  # monitor, sweep: typed nodes of train.yaml
            return {**typed_defaults(group), **(_yaml("", "train").get(group) or {})}
        return _yaml(group, option or "default")
    return dict(_yaml(group, option)) if option else {}


def example_value(group: str, option: str | None, name: str, key: Key | None) -> Any:
    """A value to show in an example override: the YAML default when it is valid, else one the spec accepts."""
    default = (_yaml("", "train") if group == "" else yaml_defaults(group, option)).get(name)
    if key is None:
        return default
    if default is not None and not (isinstance(default, str) and "${" in default) and key.problem(default) is None:
        return default
    return key.example()


def format_value(value: Any) -> str:
    """A value as it would be typed on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, float):
        return repr(value) if abs(value) >= 1e-3 or value == 0 else f"{value:g}"
    return str(value)


# ---------------------------------------------------------------------------------------------
# --help


def render_help(cfg: Mapping, choices: Mapping[str, str] | None = None) -> str:
    """Every group's options and keys with accepted values and meanings, for the composed ``cfg``."""
    choices = dict(choices or {})
    lines = ["sharpbench: train one model with one optimizer (Hydra configs).",
             "",
             "  python -m sharpbench.train [group=option ...] [group.key=value ...]",
             "  python -m sharpbench.train -m <sweep overrides>      (a sweep: one job per combination)",
             "  python -m sharpbench.train optimizer=sam --help      (this page for another option)",
             "  python -m sharpbench.train --cfg job                 (print the composed config)",
             "",
             "Config groups (the selection shown below is marked *):"]
    for group in ("optimizer", "model", "dataset", "schedule", "trainer", "logger", "experiment"):
        chosen = choices.get(group) or option_of(group, cfg.get(group)) or ""
        opts = [f"{o}*" if o == chosen else o for o in group_options(group)]
        lines.append(f"  {group:<10} " + ", ".join(opts))
    lines += ["", "Keys (override with group.key=value; + cannot add keys that are not listed here)."]

    def table(title: str, keys: Mapping[str, Key]) -> None:
        lines.append("")
        lines.append(title)
        width = max([len(k) for k in keys] + [8])
        for name, key in keys.items():
            lines.append(f"  {name:<{width}}  {key.spec}")
            lines.append(f"  {'':<{width}}    {key.meaning}")

    table("top level", TOP)
    for group in GROUPS:
        node = cfg.get(group) if isinstance(cfg.get(group), Mapping) else {}
        option = option_of(group, node)
        keys = accepted_keys(group, node)
        table(f"{group}" + (f" ({group}={option})" if option else ""), keys)
        if not GROUPS[group].named:
            continue
        others: dict[tuple[str, Key], list[str]] = {}
        for other in group_options(group):
            if other == option:
                continue
            for name, key in accepted_keys(group, {**yaml_defaults(group, other), "name": other}).items():
                if name not in keys or key != keys[name]:
                    others.setdefault((name, key), []).append(other)
        if others:
            lines.append(f"  keys of the other {group} options ({group}=<option> to use them):")
            width = max(len(name) for name, _ in others)
            for (name, key), users in sorted(others.items(), key=lambda item: item[0][0]):
                lines.append(f"  {name:<{width}}  {key.spec}  [{', '.join(users)}]")
                lines.append(f"  {'':<{width}}    {key.meaning}")
    lines += ["", "Hydra's own options: -m/--multirun (a sweep), --cfg job|hydra|all (print the "
              "config), --resolve, --info, --hydra-help."]
    return "\n".join(lines) + "\n"


def key_reference() -> str:
    """Every key of the training config as Markdown tables, top level first, then each group
    (docs/configuration.md holds this text; ``tests/test_docs.py`` fails when they differ)."""
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")

    def table(keys: Mapping[str, Key]) -> list[str]:
        out = ["| key | accepts | meaning |", "|---|---|---|"]
        for name, key in keys.items():
            option, _, short = name.rpartition(".")
            where = [f"{option} only"] if option else []
            where += [f"options: {', '.join(key.options)}"] if key.options else []
            note = f" ({'; '.join(where)})" if where else ""
            out.append(f"| `{short}` | {cell(key.spec)} | {cell(key.meaning)}{cell(note)} |")
        return out

    lines = ["### top level", "", *table(TOP)]
    for group in ("optimizer", "model", "dataset", "schedule", "trainer", "logger", "monitor", "sweep"):
        lines += ["", f"### {group}", "", *table(GROUPS[group].keys)]
    return "\n".join(lines)

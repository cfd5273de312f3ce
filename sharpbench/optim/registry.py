"""The method registry: every optimizer sharpbench can train with, declared once, beside its code.

A method file declares its class with :func:`register_method`::

    @dataclass
    class SAMConfig(SGDStep):          # its keys: type, default, range, meaning
        rho: float = rho_key(0.05)

    @register_method("sam", label="SAM", passes=2, config=SAMConfig,
                     paper='Foret et al., "Sharpness-Aware Minimization for Efficiently '
                           'Improving Generalization", ICLR 2021')
    class SAM(SharpnessAwareOptimizer):
        ...

and ships a config ``conf/optimizer/sam.yaml`` whose ``name`` is the registered name and whose
first default is the typed config (``/schema/optimizer/sam@_here_``, stored with Hydra's
ConfigStore at registration; :mod:`sharpbench.optim.step_config`). Every list
of methods in the project is derived from here: the accepted ``optimizer.name`` values, the
report's labels and order, the bench's method list, the method tables of the docs and the tests'
parametrizations. Nothing else needs editing to add a method (``docs/contributing.md``).

Where methods are found (:func:`methods` imports these once):

- every module of the ``sharpbench.optim`` package (a new file there is found by itself);
- modules named by the ``sharpbench.methods`` entry-point group of installed packages
  (``[project.entry-points."sharpbench.methods"] my_sam = "my_package.my_sam"``);
- modules listed in the environment variable ``SHARPBENCH_METHODS`` (comma-separated), for code
  that is importable but not installed.

A user's YAML for such a method goes in their own config folder, added to Hydra's search path
(``hydra.searchpath=[pkg://my_package.conf]`` or ``[file:///path/to/conf]``).
"""
from __future__ import annotations

import importlib
import os
import pkgutil
from dataclasses import dataclass, field
from importlib import metadata
from typing import Callable, TypeVar

ENTRY_POINT_GROUP = "sharpbench.methods"
ENV_VAR = "SHARPBENCH_METHODS"
# What a step may offer a method (the fields of sharpbench.optim.context.StepContext a method may
# declare in ``needs``); a declaration outside this list is refused at registration.
STEP_NEEDS = ("loss_closure", "sample", "closure_of", "batch_idx", "class_counts", "model",
              "per_sample_losses", "closure_on", "closure_with", "sample_ids", "dataset_size",
              "epoch")

T = TypeVar("T")


@dataclass(frozen=True)
class MethodInfo:
    """One trainable method.

    - ``name``: the config name (``optimizer=<name>``, ``conf/optimizer/<name>.yaml``);
    - ``label``: as printed in tables and figures;
    - ``cls``: the optimizer class, or ``None`` for a plain torch optimizer (``base``);
    - ``paper``: the citation (authors, title, venue, year);
    - ``passes``: nominal forward/backward passes per step (the driver measures the real count);
    - ``needs``: the step-context fields the method reads (see ``STEP_NEEDS``); a driver that
      cannot offer one of them refuses the method before training;
    - ``base``: for plain methods, the ``torch.optim`` optimizer's name;
    - ``order``: position in tables (methods of equal order sort by name);
    - ``bench``: whether ``sharpbench bench`` times it by default;
    - ``baseline``: the one-pass method its cost is compared with (sgd or adamw);
    - ``config``: its typed config, a dataclass extending a base-step block of
      :mod:`sharpbench.optim.step_config` (``None``: its YAML file is its only description);
    - ``claimed_cost``: the cost per step its source states, in SGD steps, as the source puts it
      (empty: the source states none); ``sharpbench bench`` prints it beside the measured cost.
    """

    name: str
    label: str
    cls: type | None
    paper: str
    passes: float
    needs: tuple[str, ...] = ()
    base: str | None = None
    order: float = 100.0
    bench: bool = True
    baseline: str = "sgd"
    config: type | None = field(default=None, compare=False)
    module: str = field(default="", compare=False)
    claimed_cost: str = ""

    @property
    def plain(self) -> bool:
        """A torch optimizer used as it is (one pass per step)."""
        return self.cls is None


_REGISTRY: dict[str, MethodInfo] = {}
_DISCOVERED = False


class RegistryError(ValueError):
    """A method declared twice, or declared with a need no driver offers."""


def register(info: MethodInfo) -> MethodInfo:
    """Add ``info`` to the registry (a second declaration of a name with another class fails)."""
    if not info.name or info.name != info.name.lower() or not info.name.isidentifier():
        raise RegistryError(f"method name {info.name!r}: use a lower-case identifier (e.g. my_sam)")
    unknown = sorted(set(info.needs) - set(STEP_NEEDS))
    if unknown:
        raise RegistryError(f"method {info.name!r} needs {unknown}, which no step offers; "
                            f"choose from {', '.join(STEP_NEEDS)}")
    old = _REGISTRY.get(info.name)
    if old is not None and old.cls is not info.cls and not _same_class(old.cls, info.cls):
        raise RegistryError(f"method {info.name!r} is declared twice: by {old.module} and by "
                            f"{info.module}; give one of them another name")
    _REGISTRY[info.name] = info
    if info.config is not None:
        from hydra.core.config_store import ConfigStore
        ConfigStore.instance().store(name=info.name, node=info.config, group="schema/optimizer")
    return info


def _same_class(a: type | None, b: type | None) -> bool:
    """The same class re-executed (a module imported twice, e.g. by a test's reload)."""
    return (a is not None and b is not None and a.__qualname__ == b.__qualname__
            and a.__module__ == b.__module__)


def register_method(name: str, *, label: str, paper: str, passes: float,
                    needs: tuple[str, ...] = (), order: float = 100.0, bench: bool = True,
                    baseline: str = "sgd", config: type | None = None,
                    claimed_cost: str = "") -> Callable[[T], T]:
    """Class decorator: declare the optimizer class as method ``name`` (see :class:`MethodInfo`)."""
    def decorate(cls: T) -> T:
        register(MethodInfo(name=name, label=label, cls=cls, paper=paper, passes=float(passes),
                            needs=tuple(needs), order=order, bench=bench, baseline=baseline,
                            config=config, module=cls.__module__, claimed_cost=claimed_cost))
        return cls
    return decorate


def discover() -> None:
    """Import every module that may declare methods (once per process)."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    package = importlib.import_module("sharpbench.optim")
    for mod in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"sharpbench.optim.{mod.name}")
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        importlib.import_module(entry.value.split(":")[0])
    for name in filter(None, (s.strip() for s in os.environ.get(ENV_VAR, "").split(","))):
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise RegistryError(f"{ENV_VAR} names {name!r}, which cannot be imported: {err}") from err


def methods() -> dict[str, MethodInfo]:
    """Every registered method, in table order (``order``, then name)."""
    discover()
    return dict(sorted(_REGISTRY.items(), key=lambda item: (item[1].order, item[0])))


def method(name: str) -> MethodInfo:
    """The method registered as ``name``; an unknown name gets the list to choose from."""
    found = methods().get(name)
    if found is None:
        raise RegistryError(f"unknown method {name!r}; registered: {', '.join(methods())} "
                            "(e.g. optimizer=sam)")
    return found


def names() -> list[str]:
    return list(methods())


def label(name: str) -> str:
    """The method's label (the name itself for a method nobody registered, e.g. in an old run)."""
    info = methods().get(name)
    return info.label if info is not None else name


def method_table() -> str:
    """The Markdown table of every method (``sharpbench methods``; the README and docs/methods.md
    embed it, and a test checks that they match)."""
    rows = ["| method | `optimizer=` | passes per step | class | paper |",
            "|---|---|---|---|---|"]
    for info in methods().values():
        cls = f"`{info.cls.__name__}`" if info.cls is not None else f"`torch.optim` ({info.base})"
        passes = f"{info.passes:g}"
        rows.append(f"| {info.label} | `{info.name}` | {passes} | {cls} | {info.paper} |")
    return "\n".join(rows)


"""A sweep's grid, as Hydra's basic sweeper expands it: ``{key: "a,b" | "range(..)" | "glob(..)"}``
→ one ``{key: value}`` per job (keys in order, the last varying fastest)."""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Mapping

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Glob

CONF_DIR = Path(__file__).resolve().parent / "conf"


def group_options(group: str, conf_dir: Path = CONF_DIR) -> list[str]:
    """The options of a config group: its YAML files."""
    return sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))


def values(key: str, value: object, conf_dir: Path = CONF_DIR) -> list[str]:
    """The values the sweeper takes for ``key=value``: a list, a range, or ``glob(...)`` over a
    config group's options."""
    override = OverridesParser.create().parse_override(f"{key}={value}")
    if isinstance(override.value(), Glob):
        return override.value().filter(group_options(key, conf_dir))
    if override.is_sweep_override():
        return list(override.sweep_string_iterator())
    return [str(value)]


def jobs(params: Mapping[str, object], conf_dir: Path = CONF_DIR) -> list[dict[str, str]]:
    """Every job of the grid ``params`` (``hydra.sweeper.params``)."""
    keys = list(params)
    return [dict(zip(keys, combo)) for combo in
            itertools.product(*(values(k, params[k], conf_dir) for k in keys))]

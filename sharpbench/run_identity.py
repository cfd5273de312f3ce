"""What a run *is*: the part of its config that determines its results, and the check that a
folder's checkpoint or record belongs to the config about to use it.

The identity is the resolved config without the keys that say where or how a run is written
(``NOT_RUN_DEFINING``: data location and format, loggers, progress bar, checkpoint cadence,
sweep plumbing). That one list also decides which keys the report leaves out of a row's setting
(``defines_run``) and, checked by a test, which overrides ``conf/train.yaml`` leaves out of sweep
job folder names (``override_dirname_exclusions``). The identity's hash (``config_hash``) names
the run in ``metrics.json`` and is stored, with the identity itself, in every checkpoint, so a
resume can say exactly which keys differ.

A folder whose checkpoint or completed record holds another identity is refused before anything
is written, naming the keys that differ and the two ways out (another folder, or deleting that
one). ``on_config_change`` is kept only so that ``on_config_change=refuse`` (its one behaviour)
still works; its former values ``new_folder`` and ``extend`` are refused with that hint.
"""
from __future__ import annotations

import copy
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from .checks import WAYS_OUT, ConfigError, on_config_change_problem
from .record import config_hash

# Config keys that say where or how a run is written or watched, not what it computes. A key
# covers everything below it (``sweep`` covers ``sweep.gpu_pool``). The one list: the identity,
# the report's settings and the sweep folder names are derived from it.
NOT_RUN_DEFINING = ("ckpt_path", "run_name", "sweep_name", "on_config_change", "logger", "sweep",
                    "monitor", "hydra",
                    "dataset.root", "dataset.download", "dataset.format", "dataset.cache",
                    "dataset.cache_dir", "dataset.decode_workers",
                    "trainer.enable_progress_bar", "trainer.checkpoint_every_n_steps")
# Left out of sweep job folder names besides NOT_RUN_DEFINING: a preset's own overrides name it.
NOT_IN_FOLDER_NAMES = ("experiment",)
CHECKPOINT_KEY = "sharpbench_identity"


class IdentityMismatch(ConfigError):
    """A folder's checkpoint or completed record was made by another configuration."""


def defines_run(key: str) -> bool:
    """Whether the dotted config ``key`` is part of a run's identity."""
    return not any(key == k or key.startswith(k + ".") for k in NOT_RUN_DEFINING)


def override_dirname_exclusions(train_yaml: Mapping[str, Any]) -> list[str]:
    """``hydra.job.config.override_dirname.exclude_keys`` of ``conf/train.yaml`` (Hydra matches
    an override's key exactly): each key of NOT_RUN_DEFINING, and the keys below those that are
    mappings in ``train_yaml``; ``hydra.*`` overrides never name a job's folder anyway."""
    out = []
    from dataclasses import fields
    from .train_configs import TYPED_NODES as typed  # monitor, sweep: their keys are theirs
    for key in NOT_RUN_DEFINING + NOT_IN_FOLDER_NAMES:
        if key == "hydra":
            continue
        value = train_yaml.get(key)
        if value is None and key in typed:
            value = {f.name: None for f in fields(typed[key])}
        if isinstance(value, Mapping):
            out += [f"{key}.{child}" for child in value]
        else:
            out.append(key)
    return out


def _drop(tree: dict[str, Any], dotted: str) -> None:
    head, _, rest = dotted.partition(".")
    if not rest:
        tree.pop(head, None)
    elif isinstance(tree.get(head), dict):
        _drop(tree[head], rest)


def strip(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` without the where-not-what keys (works on identities of older versions too)."""
    plain = copy.deepcopy(dict(config))
    for key in NOT_RUN_DEFINING:
        _drop(plain, key)
    return plain


def identity(cfg: DictConfig) -> dict[str, Any]:
    """The part of the resolved config that defines the run's results."""
    keep = [k for k in cfg if defines_run(str(k))]
    return strip(OmegaConf.to_container(OmegaConf.masked_copy(cfg, keep), resolve=True))


def identity_hash(ident: Mapping[str, Any]) -> str:
    return config_hash(strip(ident))


def differing_keys(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two identities (a key missing on one side counts)."""
    out = []
    for key in sorted(set(a) | set(b), key=str):
        va, vb = a.get(key, "<unset>"), b.get(key, "<unset>")
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            out += differing_keys(va, vb, f"{prefix}{key}.")
        elif _differs(va, vb):
            out.append(f"{prefix}{key}")
    return out


def _differs(a: Any, b: Any) -> bool:
    """Values differ; ``1`` and ``1.0`` do not (a typed float key records ``optimizer.lr=1`` as
    1.0 where an older version kept 1), ``True`` and ``1`` do."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is not type(b) or a != b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) != len(b) or any(_differs(x, y) for x, y in zip(a, b))
    return a != b


def describe(keys: list[str], old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    def get(d, dotted):
        for part in dotted.split("."):
            d = d.get(part, "<unset>") if isinstance(d, Mapping) else "<unset>"
        return d
    shown = [f"{k}: {get(old, k)!r} -> {get(new, k)!r}" for k in keys[:8]]
    more = f" (and {len(keys) - 8} more)" if len(keys) > 8 else ""
    return "; ".join(shown) + more


def check_on_config_change(value: Any) -> None:
    """``refuse`` is what always happens; the removed ``new_folder``/``extend`` name the ways out."""
    problem = on_config_change_problem(value)
    if problem is not None:
        raise ConfigError(problem)


def same_run(found: Mapping[str, Any], ident: Mapping[str, Any]) -> bool:
    """``found`` is this config's run: the same identity, or this config continuing an earlier run
    (``continued_from``, as written by the removed ``on_config_change=extend``)."""
    found_hash = identity_hash(found)
    return found_hash == identity_hash(ident) or not differing_keys(strip(found), strip(ident)) or (
        bool(found.get("continued_from"))
        and found_hash == identity_hash({**ident, "continued_from": found["continued_from"]}))


def as_found(found: Mapping[str, Any], ident: dict[str, Any]) -> dict[str, Any]:
    """The identity to run under when ``same_run(found, ident)``."""
    if found.get("continued_from"):
        return {**strip(ident), "continued_from": found["continued_from"]}
    return ident


def refuse(found: Mapping[str, Any], ident: Mapping[str, Any], where: str) -> IdentityMismatch:
    """The refusal of a folder whose ``where`` (checkpoint, completed record) holds ``found``."""
    keys = differing_keys(strip(found), strip(ident))
    return IdentityMismatch(
        f"{where} was made by a different configuration "
        f"({describe(keys, strip(found), strip(ident))}); resuming it would mix two runs. Its "
        f"record and checkpoints were left as they are. {WAYS_OUT}")


def stored_identity(checkpoint: Mapping[str, Any]) -> dict[str, Any] | None:
    return checkpoint.get(CHECKPOINT_KEY)

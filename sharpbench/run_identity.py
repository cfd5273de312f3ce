"""What a run *is*: the part of its config that determines its results, and the check that a
folder's checkpoint or record belongs to the config about to use it.

The identity is the resolved config without the keys that say where or how a run is written
(data location and format, loggers, progress bar, checkpoint cadence, sweep plumbing). Its hash
(``config_hash``) names the run in ``metrics.json`` and is stored, with the identity itself, in
every checkpoint, so a resume can say exactly which keys differ.

``on_config_change`` decides what a run does with a folder holding another identity:

- ``refuse`` (default): stop before anything is written, naming the keys that differ;
- ``new_folder``: start this config fresh in ``<run dir>+<its hash>`` beside it;
- ``extend``: continue that run for more epochs; allowed only when ``trainer.max_epochs`` grew
  and nothing else changed. The learning-rate schedule is then the one of the new length,
  evaluated from the step reached, and the record names the run it continues
  (``continued_from``), so it is never averaged with runs trained for the new length from scratch.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from .checks import ConfigError
from .record import config_hash

# Top-level keys that say where or how a run is written, not what it computes.
NON_IDENTITY_KEYS = ("ckpt_path", "run_name", "sweep_name", "logger", "sweep", "hydra",
                     "on_config_change", "monitor")
# Keys inside groups that say where the data is or how it is read, or how the run is watched.
NON_IDENTITY_PATHS = ("dataset.root", "dataset.download", "dataset.format", "dataset.cache",
                      "dataset.cache_dir", "dataset.decode_workers", "trainer.enable_progress_bar",
                      "trainer.checkpoint_every_n_steps")
ON_CONFIG_CHANGE = ("refuse", "new_folder", "extend")
CHECKPOINT_KEY = "sharpbench_identity"


class IdentityMismatch(ConfigError):
    """A folder's checkpoint or completed record was made by another configuration."""


def strip(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` without the where-not-what keys (works on identities of older versions too)."""
    plain = copy.deepcopy(dict(config))
    for key in NON_IDENTITY_KEYS:
        plain.pop(key, None)
    for dotted in NON_IDENTITY_PATHS:
        group, key = dotted.split(".")
        if isinstance(plain.get(group), dict):
            plain[group].pop(key, None)
    return plain


def identity(cfg: DictConfig) -> dict[str, Any]:
    """The part of the resolved config that defines the run's results."""
    keep = [k for k in cfg if k not in NON_IDENTITY_KEYS]
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
        elif va != vb:
            out.append(f"{prefix}{key}")
    return out


def describe(keys: list[str], old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    def get(d, dotted):
        for part in dotted.split("."):
            d = d.get(part, "<unset>") if isinstance(d, Mapping) else "<unset>"
        return d
    shown = [f"{k}: {get(old, k)!r} -> {get(new, k)!r}" for k in keys[:8]]
    more = f" (and {len(keys) - 8} more)" if len(keys) > 8 else ""
    return "; ".join(shown) + more


def is_extension(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    """Only ``trainer.max_epochs`` differs, and it grew."""
    old, new = strip(old), strip(new)
    new_base = {k: v for k, v in new.items() if k != "continued_from"}
    old_base = {k: v for k, v in old.items() if k != "continued_from"}
    if differing_keys(old_base, new_base) != ["trainer.max_epochs"]:
        return False
    return int(new["trainer"]["max_epochs"]) > int(old["trainer"]["max_epochs"])


def extended(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The identity of ``old`` continued to ``new``'s epochs (its own hash, never a fresh run's)."""
    origin = old.get("continued_from") or {"epochs": int(old["trainer"]["max_epochs"]),
                                           "config_hash": identity_hash(old)}
    return {**strip(new), "continued_from": origin}


def new_folder(run_dir: Path, ident: Mapping[str, Any]) -> Path:
    return run_dir.with_name(f"{run_dir.name}+{identity_hash(ident)[:8]}")


def same_run(found: Mapping[str, Any], ident: Mapping[str, Any]) -> bool:
    """``found`` is this config's run: the same identity, or this config continuing an earlier run
    (``on_config_change=extend``, re-run after a stop or to skip it once completed)."""
    found_hash = identity_hash(found)
    return found_hash == identity_hash(ident) or (
        bool(found.get("continued_from"))
        and found_hash == identity_hash({**ident, "continued_from": found["continued_from"]}))


def as_found(found: Mapping[str, Any], ident: dict[str, Any]) -> dict[str, Any]:
    """The identity to run under when ``same_run(found, ident)``."""
    if found.get("continued_from"):
        return {**strip(ident), "continued_from": found["continued_from"]}
    return ident


def reconcile(ident: dict[str, Any], found: Mapping[str, Any], where: str, mode: str,
              run_dir: Path) -> tuple[dict[str, Any], Path]:
    """Decide what to do with a folder whose checkpoint or completed record (``where``) has the
    identity ``found``: returns the identity to run under and the folder to run in, or raises
    ``IdentityMismatch`` naming the keys that differ and the ways on."""
    if mode not in ON_CONFIG_CHANGE:
        raise ConfigError(f"on_config_change={mode!r}; choose one of {', '.join(ON_CONFIG_CHANGE)}")
    if same_run(found, ident):
        return as_found(found, ident), run_dir
    if mode == "extend" and is_extension(found, ident):
        return extended(found, ident), run_dir
    if mode == "new_folder":
        return ident, new_folder(run_dir, ident)
    keys = differing_keys(strip(found), strip(ident))
    hint = ("on_config_change=extend continues it for more epochs (the schedule becomes that of "
            "the new length); " if keys == ["trainer.max_epochs"] else "")
    raise IdentityMismatch(
        f"{where} was made by a different configuration ({describe(keys, strip(found), strip(ident))}); "
        f"resuming it would mix two runs. Its record and checkpoints were left as they are. To run this configuration fresh, use "
        f"another folder (hydra.run.dir=..., or hydra.sweep.dir=... for a sweep) or "
        f"on_config_change=new_folder (runs in {new_folder(run_dir, ident).name}); {hint}"
        f"to resume the original run, use the original settings.")


def stored_identity(checkpoint: Mapping[str, Any]) -> dict[str, Any] | None:
    return checkpoint.get(CHECKPOINT_KEY)


class Settled:
    """What ``settle`` decided: run ``identity`` in ``run_dir`` from ``ckpt_path`` (or from
    scratch), or return ``skip`` (the completed record of this very run)."""

    def __init__(self, identity: dict[str, Any], run_dir: Path, ckpt_path: str | None = None,
                 checkpoint: dict | None = None, skip: dict | None = None):
        self.identity, self.run_dir, self.skip = identity, run_dir, skip
        self.ckpt_path, self.checkpoint = ckpt_path, checkpoint

    @property
    def resume_step(self) -> int | None:
        return int(self.checkpoint.get("global_step", 0)) if self.checkpoint is not None else None

    def checkpoint_io(self):
        """The run's checkpoint IO, holding the checkpoint read here (Lightning reuses it)."""
        from .runtime import AtomicCheckpointIO
        io = AtomicCheckpointIO()
        if self.checkpoint is not None:
            io.preloaded = (self.ckpt_path, self.checkpoint)
        return io


def settle(cfg: DictConfig, run_dir: Path) -> Settled:
    """Check the folder's completed record and checkpoint against ``cfg`` (see the module
    docstring); the checkpoint is read once here, its step and identity checked before training."""
    from .lifecycle import read_record
    from .runtime import resolve_ckpt_path
    ident = identity(cfg)
    mode = str(cfg.get("on_config_change") or "refuse")
    run_dir = Path(run_dir)
    for _ in range(2):  # a second pass when a mismatch moved the run to a new folder
        previous = read_record(run_dir / "metrics.json")
        if previous and previous.get("status") == "completed":
            found = previous.get("config") if isinstance(previous.get("config"), dict) else {}
            if same_run(found, ident):
                return Settled(as_found(found, ident), run_dir, skip=previous)
            ident, moved = reconcile(ident, found, f"{run_dir}/metrics.json (completed)", mode, run_dir)
            if moved != run_dir:
                run_dir = moved
                continue
            if cfg.get("ckpt_path") in (None, "", "null", "none"):
                raise ConfigError("on_config_change=extend continues the run from its checkpoint: "
                                  "add ckpt_path=last")
        ckpt_path, checkpoint = resolve_ckpt_path(cfg.get("ckpt_path"), run_dir)
        if checkpoint is None:
            return Settled(ident, run_dir)
        found = stored_identity(checkpoint)
        if found is None:
            import logging
            logging.getLogger("sharpbench").warning(
                "%s has no stored run identity (written by an older sharpbench): its config "
                "cannot be checked against this one", ckpt_path)
            return Settled(ident, run_dir, ckpt_path, checkpoint)
        if same_run(found, ident):
            return Settled(as_found(found, ident), run_dir, ckpt_path, checkpoint)
        ident, moved = reconcile(ident, found, f"checkpoint {ckpt_path}", mode, run_dir)
        if moved == run_dir:
            return Settled(ident, run_dir, ckpt_path, checkpoint)
        run_dir = moved
    return Settled(ident, run_dir)

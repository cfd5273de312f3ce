"""A command line is checked whole before Hydra runs it: every job of a sweep, before any starts.

``python -m sharpbench.train <overrides>`` (and ``-m`` for a sweep) first composes each job's
config with Hydra's public compose API and checks it against the schema
(:func:`sharpbench.checks.check_config`). A command with a bad setting is refused as a whole:

- one paragraph per bad override (the key, the bad value, the accepted keys or options with the
  nearest one, an example override), exit code 2, no traceback, no run folder;
- a sweep names each refused job by its overrides, and no job starts (a sweep that would fail
  half-way through its grid is worth nothing);
- the refusal is appended to ``refused.jsonl`` beside the run folders (the parent of
  ``hydra.run.dir``, or the sweep folder), so a script can read why a command did nothing.

Checks that need the data (a subset larger than the data set …) still run in the job, which then
records ``status: invalid_config`` in its own folder.

Only Hydra's public API is used (``hydra.compose``, the override parser); the sweep grid is
expanded as the basic sweeper does (:mod:`sharpbench.grid`). A sweeper that draws its own values
(Optuna) gets the fixed part of its command line checked.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from . import grid, schema
from .schema import format_value

INFO_FLAGS = ("--cfg", "-c", "--info", "-i", "--shell-completion", "-sc", "--hydra-help",
              "--version", "--experimental-rerun")
HELP_FLAGS = ("--help", "-h")
VALUE_FLAGS = ("--config-name", "-cn", "--config-path", "-cp", "--config-dir", "-cd",
               "--package", "-p")
MULTIRUN_FLAGS = ("-m", "--multirun")
REFUSED_LOG = "refused.jsonl"
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


class Refused(Exception):
    """The command line has bad settings; ``str()`` is the message for the user."""


def entry_point(hydra_main: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate the ``hydra.main`` function: ``--help`` from the schema; a command line with bad
    settings refused (exit 2) before Hydra starts any job."""
    @functools.wraps(hydra_main)
    def run(*args: Any, **kwargs: Any) -> Any:
        argv = sys.argv[1:]
        if any(flag in argv for flag in HELP_FLAGS):
            print_help([a for a in argv if not a.startswith("-")])
            return None
        parsed = parse_argv(argv)
        if parsed is not None:
            overrides, multirun = parsed
            try:
                check_command(overrides, multirun)
            except Refused as err:
                print(str(err), file=sys.stderr)
                sys.exit(2)
            except Exception as err:  # noqa: BLE001 - a config file edited into invalid YAML
                message = invalid_yaml_message(err)
                if message is None:
                    raise
                log_refusal(refusal_folder(overrides, multirun), overrides, [(overrides, message)])
                print(message, file=sys.stderr)
                sys.exit(2)
            settled = read_only_folder(overrides, multirun)
            if settled is not None:
                return settled
        return hydra_main(*args, **kwargs)
    return run


def unwritable(folder: Path) -> bool:
    """Whether ``folder`` (or, while it does not exist, its nearest existing parent) cannot be
    written: permissions, or a read-only filesystem (which refuses root too)."""
    probe = Path(folder).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return not os.access(probe, os.W_OK)


def read_only_folder(overrides: list[str], multirun: bool) -> Any:
    """Before Hydra writes into the run (or sweep) folder: a read-only one ends the command here,
    with the run's completed record when it is this config's (skipped, exit 0), else with a
    message that says where to write instead (exit 2). ``None``: the folder can be written."""
    try:  # a sweep's fixed part (its lists, ranges and globs need the sweeper)
        from hydra.core.override_parser.overrides_parser import OverridesParser
        parser = OverridesParser.create()
        fixed = [o for o in overrides if not (multirun and parser.parse_override(o).is_sweep_override())]
        cfg = compose(fixed)
        folder = Path(str(cfg.hydra.sweep.dir if multirun else cfg.hydra.run.dir))
    except Exception:  # noqa: BLE001 - what cannot be composed here, Hydra reports itself
        return None
    if not unwritable(folder):
        return None
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    if not multirun and folder.is_dir():
        from .runtime import settle
        from .checks import config_errors
        try:
            settled = settle(without_hydra(cfg), folder)
        except config_errors() as err:  # another configuration's run: its own refusal
            print(f"invalid config: {err}", file=sys.stderr)
            sys.exit(2)
        if settled.skip is not None:
            print(f"[sharpbench] skipping {folder}: already completed (metrics.json, same config; "
                  "the folder is read-only)", file=sys.stderr)
            return settled.skip
    what = "sweep" if multirun else "run"
    print(f"invalid config: {folder} is read-only (or on a read-only filesystem), so the {what} "
          f"cannot write its log, checkpoints and record there. Write elsewhere with "
          f"{key}=<a writable folder>, or make it writable; nothing was run.", file=sys.stderr)
    sys.exit(2)


def invalid_yaml_message(err: BaseException) -> str | None:
    """One paragraph for a config file that is not valid YAML (``None`` for other errors)."""
    import yaml
    while err is not None and not isinstance(err, yaml.YAMLError):
        err = err.__cause__ or err.__context__
    if err is None:
        return None
    marks = [m for m in (getattr(err, "context_mark", None), getattr(err, "problem_mark", None)) if m]
    where = marks[0].name if marks else "a config file"
    lines = " to ".join(f"line {m.line + 1}, column {m.column + 1}" for m in marks)
    what = " ".join(x for x in (getattr(err, "context", None), getattr(err, "problem", None)) if x)
    return (f"invalid config: {where} is not valid YAML ({lines}: {what or err}). Fix that file "
            "(`git diff` shows what changed in the package's own configs); nothing was run.")


def parse_argv(argv: list[str]) -> tuple[list[str], bool] | None:
    """``(overrides, multirun)`` of a command line, or ``None`` when Hydra should see it as it is
    (``--cfg``, ``--info``, another config name …)."""
    overrides, multirun = [], False
    for arg in argv:
        if arg in INFO_FLAGS or arg in VALUE_FLAGS or arg.split("=", 1)[0] in VALUE_FLAGS:
            return None
        if arg in MULTIRUN_FLAGS:
            multirun = True
        elif arg.startswith("-") and "=" not in arg:
            return None  # a flag we do not know: Hydra's to judge
        else:
            overrides.append(arg)
    return overrides, multirun


# ---------------------------------------------------------------------------------------------
# Composing and checking


def compose(overrides: list[str]) -> Any:
    """The config Hydra would compose for ``overrides`` (with its ``hydra`` node)."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    if GlobalHydra.instance().is_initialized():
        return hydra_compose(config_name="train", overrides=overrides, return_hydra_config=True)
    with initialize_config_dir(config_dir=str(schema.CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides, return_hydra_config=True)


def problem(overrides: list[str]) -> str | None:
    """Why the job ``overrides`` cannot run (one paragraph per bad override), or ``None``."""
    from .checks import check_config, config_errors
    try:
        cfg = compose(overrides)
    except Exception as err:  # noqa: BLE001 - explained below, override by override
        if not is_composition_error(err):
            raise
        return explain_all(overrides)
    try:
        check_config(without_hydra(cfg))
    except config_errors() as err:
        return str(err)
    return None


def without_hydra(cfg: Any) -> Any:
    from omegaconf import open_dict
    plain = cfg.copy()
    with open_dict(plain):
        plain.pop("hydra", None)
    return plain


def is_composition_error(err: BaseException) -> bool:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException
    return isinstance(err, (HydraException, OmegaConfBaseException))


def check_command(overrides: list[str], multirun: bool) -> None:
    """Refuse (:class:`Refused`) a command line any of whose jobs has a bad setting."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    if GlobalHydra.instance().is_initialized():
        return _check_command(overrides, multirun)
    with initialize_config_dir(config_dir=str(schema.CONF_DIR), version_base="1.3"):
        return _check_command(overrides, multirun)


def _check_command(overrides: list[str], multirun: bool) -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    try:
        parsed = [OverridesParser.create().parse_override(o) for o in overrides]
    except Exception as err:  # noqa: BLE001 - an override Hydra cannot parse
        if not is_composition_error(err):
            raise
        message = explain_all(overrides)
        log_refusal(run_parent(overrides), overrides, [(overrides, message)])
        raise Refused(message) from None
    sweeps = [p for p in parsed if p.is_sweep_override()]
    if not multirun:
        if sweeps:
            return  # Hydra itself says that a list of values needs -m
        message = problem(overrides)
        if message is not None:
            log_refusal(run_parent(overrides), overrides, [(overrides, message)])
            raise Refused(message)
        return
    fixed = [o for o, p in zip(overrides, parsed) if not p.is_sweep_override()]
    try:
        cfg = compose(fixed)
    except Exception as err:  # noqa: BLE001 - the part every job shares cannot be composed
        if not is_composition_error(err):
            raise
        message = explain_all(fixed)
        log_refusal(None, overrides, [(fixed, message)])
        raise Refused(f"the sweep was refused before any job started:\n{message}") from None
    jobs = sweep_jobs(cfg, overrides, parsed)
    bad = [(job, why) for job, why in ((job, problem(job)) for job in jobs) if why is not None]
    if bad:
        log_refusal(Path(str(cfg.hydra.sweep.dir)), overrides, bad)
        lines = [f"the sweep was refused before any job started: {len(bad)} of {len(jobs)} jobs "
                 "have settings that cannot run (fix them, or leave those values out of the grid):"]
        for job, why in bad:
            varied = [o for o in job if o not in fixed]
            lines.append(f"- job {' '.join(varied) or ' '.join(job)}:")
            lines += [f"    {line}" for line in why.splitlines()]
        raise Refused("\n".join(lines))


def sweep_jobs(cfg: Any, overrides: list[str], parsed: list) -> list[list[str]]:
    """Every job's overrides, as Hydra's basic sweeper builds them: the config's
    ``hydra.sweeper.params``, then the command line's sweeps (a key given there wins)."""
    fixed = [o for o, p in zip(overrides, parsed) if not p.is_sweep_override()]
    sweeper = cfg.hydra.get("sweeper") or {}
    if sweeper.get("_target_") != BASIC_SWEEPER:
        return [fixed]  # another sweeper draws its own values: its fixed part is checked
    params = {str(k): str(v) for k, v in (sweeper.get("params") or {}).items()}
    for text, p in zip(overrides, parsed):
        if p.is_sweep_override():
            key, _, value = text.partition("=")
            params.pop(key, None)
            params[key] = value
    return [fixed + [f"{k}={v}" for k, v in job.items()] for job in grid.jobs(params)]


def run_parent(overrides: list[str]) -> Path | None:
    """The folder that holds the run folders (where a refused single run is logged)."""
    try:
        cfg = compose([o for o in overrides if o.lstrip("+~").startswith("hydra.")])
        return Path(str(cfg.hydra.run.dir)).parent
    except Exception:  # noqa: BLE001 - logging the refusal is a courtesy
        return None


def refusal_folder(overrides: list[str], multirun: bool) -> Path | None:
    """Where a refusal that no job's config could be composed for is logged: the sweep folder,
    or the folder that holds the run folders (from the ``hydra.*`` overrides alone)."""
    try:
        cfg = compose([o for o in overrides if o.lstrip("+~").startswith("hydra.")])
        return Path(str(cfg.hydra.sweep.dir)) if multirun else Path(str(cfg.hydra.run.dir)).parent
    except Exception:  # noqa: BLE001 - logging the refusal is a courtesy
        return None


def log_refusal(folder: Path | None, overrides: list[str], jobs: list[tuple[list[str], str]]) -> None:
    """Append the refusal to ``<folder>/refused.jsonl`` (``outputs/runs`` by default)."""
    folder = folder or Path("outputs") / "runs"
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "status": "invalid_config",
             "command": ["python", "-m", "sharpbench.train", *overrides],
             "jobs": [{"overrides": job, "error": why} for job, why in jobs]}
    # In a read-only place the log is skipped: the message on the console is what matters.
    with contextlib.suppress(OSError):
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / REFUSED_LOG, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")


# ---------------------------------------------------------------------------------------------
# Explaining the overrides Hydra cannot compose


def explain_all(overrides: list[str]) -> str:
    """Compose with every override that works; one paragraph for each of the others."""
    good: list[str] = []
    bad: list[tuple[str, BaseException]] = []
    for text in sorted(overrides, key=_compose_order):
        try:
            compose(good + [text])
            good.append(text)
        except Exception as err:  # noqa: BLE001 - each failure is explained below
            if not is_composition_error(err):
                raise
            bad.append((text, err))
    cfg = compose(good)
    # Keys of a group whose option was refused are not judged against the default option's keys.
    refused = {_group_choice(t)[0] for t, _ in bad if _compose_order(t) == 1}
    explained = [(t, e) for t, e in bad
                 if _compose_order(t) != 2 or t.lstrip("+~").split(".", 1)[0] not in refused]
    return "\n".join(explain(text, err, cfg) for text, err in explained) or \
        "the command line could not be composed: " + _one_line(bad and bad[0][1])


def _compose_order(text: str) -> int:
    """Group choices first (``optimizer=sam`` decides which ``optimizer.*`` keys exist)."""
    key = text.lstrip("+~").split("=", 1)[0]
    return 0 if key.startswith("hydra") else 1 if "." not in key else 2


def _group_choice(text: str) -> tuple[str, str]:
    key, _, value = text.lstrip("+~").partition("=")
    return key, value


def _one_line(err: Any) -> str:
    text = " ".join(str(err).split()) if err else ""
    cause = getattr(err, "__cause__", None)
    if cause is not None and str(cause):
        text += " (" + " ".join(str(cause).split()) + ")"
    return text


def explain(text: str, err: BaseException, cfg: Any) -> str:
    """One paragraph for an override Hydra refused, using the config composed without it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf
    from .checks import unknown_key_message
    try:
        override = OverridesParser.create().parse_overrides([text])[0]
    except Exception as parse_err:  # noqa: BLE001
        return (f"{text}: not a valid override ({_one_line(parse_err).split(' See ')[0]}); write "
                "key=value, e.g. trainer.max_epochs=10, and quote values with spaces, commas or "
                "brackets ('dataset.root=\"/my data\"').")
    key = override.key_or_group
    value = override.value() if not override.is_delete() else None
    if override.is_hydra_override():
        return f"{text}: Hydra refused it: {_one_line(err)}"
    if "." not in key and "/" not in key and schema.group_options(key) and not override.is_delete():
        options = schema.group_options(key)
        nearest = schema.did_you_mean(str(value), options)
        default = nearest or (schema.option_of(key, cfg.get(key)) if key in schema.GROUPS else None) or options[0]
        hint = f"; did you mean {key}={nearest}?" if nearest else "."
        return (f"{key}={format_value(value)}: group {key} has no option {str(value)!r}{hint} "
                f"Options: {', '.join(options)}. Example: {key}={default}.")
    missing = object()
    exists = OmegaConf.select(cfg, key, default=missing) is not missing
    if override.is_add() and exists:
        return (f"{text}: {key} already exists, so + cannot add it; set it without the +. "
                f"Example: {text.lstrip('+')}.")
    group, _, name = key.partition(".")
    if exists and group in schema.GROUPS and "." not in name and OmegaConf.is_dict(cfg.get(group)):
        # a typed config's key (sharpbench.train_configs): Hydra refused the value's type
        from .checks import value_message
        node = OmegaConf.to_container(cfg[group], resolve=False)
        option = schema.option_of(group, node)
        spec = schema.accepted_keys(group, node).get(name)
        if spec is not None and override.is_delete():
            example = format_value(schema.example_value(group, option, name, spec))
            return (f"{key} is missing: a key of a typed config cannot be removed ({key} accepts "
                    f"{spec.spec}: {spec.meaning}); set it instead, e.g. {key}={example}.")
        if spec is not None:
            return value_message(group, name, value, spec, spec.problem(value) or "type", option)
    if not exists and not override.is_delete():
        if not name:
            accepted = {**schema.TOP, **{g: schema.Key("dict", "config group") for g in schema.GROUPS}}
            return unknown_key_message("", key, value, accepted, None)
        if group in schema.GROUPS and "." not in name and OmegaConf.is_dict(cfg.get(group)):
            node = OmegaConf.to_container(cfg[group], resolve=False)
            accepted = schema.accepted_keys(group, node)
            option = schema.option_of(group, node)
            if name in accepted:  # a valid key that this option's YAML does not set
                return (f"{text}: {group}={option} accepts {key} ({accepted[name].spec}: "
                        f"{accepted[name].meaning}) but its YAML does not set it, so add it with +: "
                        f"+{text.lstrip('+')}.")
            return unknown_key_message(group, name, value, accepted, option)
    return f"{text}: {_one_line(err)}"


# ---------------------------------------------------------------------------------------------
# --help


def print_help(overrides: list[str]) -> None:
    """Print every group's options and keys (for the options the overrides select)."""
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf
    GlobalHydra.instance().clear()
    try:
        cfg = compose(overrides)
    except Exception as err:  # noqa: BLE001
        if not is_composition_error(err):
            raise
        print(explain_all(overrides), file=sys.stderr)
        sys.exit(2)
    choices = dict(cfg.hydra.runtime.choices)
    plain = OmegaConf.to_container(cfg, resolve=False)
    plain.pop("hydra", None)
    print(schema.render_help(plain, choices))

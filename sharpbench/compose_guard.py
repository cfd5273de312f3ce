"""Hydra's own failures (unknown key, unknown group option, unparsable override) as ordinary
invalid configurations, and ``--help`` generated from the schema.

Hydra refuses such a command line while it composes the config, before the task function runs,
so it prints its own message, exits 1 and leaves no ``metrics.json``; in a sweep one such job
stops the whole sweep. :func:`entry_point` (around ``hydra.main``) turns that around: when a
composition fails, the config is composed again without the overrides that fail, the failure is
explained in one paragraph (the key, the bad value, the accepted keys or options with the
nearest one, an example override) and stored in the config, and the task function records it
like any other invalid setting (exit code 2, ``status: invalid_config``; in a sweep the job is
recorded and the sweep goes on).

The hook wraps Hydra's ``ConfigLoaderImpl.load_configuration`` (hydra-core 1.3), which every
composition goes through: the single run, each sweep job in every launcher, and ``--cfg``. It is
active only while the entry point runs (and in the sweep workers it starts), so composing the
config from Python (``hydra.compose``) keeps Hydra's behaviour.
"""
from __future__ import annotations

import functools
import os
import sys
from typing import Any, Callable

from . import schema
from .schema import format_value

ENV = "SHARPBENCH_COMPOSE_GUARD"   # "record": explain and record; "report": explain and exit 2
MARK = "_invalid_config_"          # top-level key of a config that Hydra could not compose
INFO_FLAGS = ("--cfg", "-c", "--info", "-i", "--shell-completion", "-sc", "--hydra-help")
HELP_FLAGS = ("--help", "-h")


def install() -> None:
    """Wrap Hydra's config loader (once per process; inactive until :func:`entry_point` runs)."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    original = ConfigLoaderImpl.load_configuration
    if getattr(original, "_sharpbench_guard", False):
        return

    @functools.wraps(original)
    def load_configuration(self, config_name, overrides, run_mode, from_shell=True,
                           validate_sweep_overrides=True):
        try:
            return original(self, config_name, overrides, run_mode, from_shell,
                            validate_sweep_overrides)
        except Exception as err:
            mode = os.environ.get(ENV)
            if mode not in ("record", "report") or not _is_composition_error(err):
                raise

            def compose(subset):
                return original(self, config_name, subset, run_mode, from_shell,
                                validate_sweep_overrides)
            return fallback(compose, list(overrides), mode)

    load_configuration._sharpbench_guard = True
    ConfigLoaderImpl.load_configuration = load_configuration


def _is_composition_error(err: BaseException) -> bool:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException
    return isinstance(err, (HydraException, OmegaConfBaseException))


def entry_point(hydra_main: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate the ``hydra.main`` function: ``--help`` from the schema, composition failures
    recorded as invalid configurations."""
    @functools.wraps(hydra_main)
    def run(*args: Any, **kwargs: Any) -> Any:
        argv = sys.argv[1:]
        if any(flag in argv for flag in HELP_FLAGS):
            print_help([a for a in argv if not a.startswith("-")])
            return None
        previous = os.environ.get(ENV)
        os.environ[ENV] = "report" if any(f in argv for f in INFO_FLAGS) else "record"
        try:
            return hydra_main(*args, **kwargs)
        finally:
            if previous is None:
                os.environ.pop(ENV, None)
            else:
                os.environ[ENV] = previous
    return run


def raise_if_failed(cfg: Any) -> None:
    """Raise the stored explanation if Hydra could not compose this job's command line."""
    from omegaconf import open_dict
    from .checks import ConfigError
    if MARK in cfg:
        message = str(cfg[MARK])
        with open_dict(cfg):
            del cfg[MARK]
        raise ConfigError(message)


# ---------------------------------------------------------------------------------------------
# Composing without the failing overrides, and explaining them


def fallback(compose: Callable[[list[str]], Any], overrides: list[str], mode: str) -> Any:
    """Compose with every override that works; explain the others; mark the config invalid."""
    from omegaconf import open_dict
    good: list[str] = []
    bad: list[tuple[str, BaseException]] = []
    for text in sorted(overrides, key=_compose_order):
        try:
            compose(good + [text])
            good.append(text)
        except Exception as err:  # noqa: BLE001 - each failure is explained below
            if not _is_composition_error(err):
                raise
            bad.append((text, err))
    cfg = compose(good)
    # Keys of a group whose option was refused are not judged against the default option's keys.
    refused = {_group_choice(t)[0] for t, _ in bad if _compose_order(t) == 1}
    explained = [(t, e) for t, e in bad
                 if _compose_order(t) != 2 or t.lstrip("+~").split(".", 1)[0] not in refused]
    message = "\n".join(explain(text, err, cfg) for text, err in explained) or \
        "the command line could not be composed: " + _one_line(bad and bad[0][1])
    if mode == "report":
        print(message, file=sys.stderr)
        sys.exit(2)
    with open_dict(cfg):
        cfg[MARK] = message
        for text, _ in bad:   # the record names the requested option, not the default's
            group, value = _group_choice(text)
            if group in schema.GROUPS and schema.GROUPS[group].named:
                cfg[group] = {"name": value}
        _record_all_overrides(cfg, overrides)
    return cfg


def _compose_order(text: str) -> int:
    """Group choices first (``optimizer=sam`` decides which ``optimizer.*`` keys exist)."""
    key = text.lstrip("+~").split("=", 1)[0]
    return 0 if key.startswith("hydra") else 1 if "." not in key else 2


def _group_choice(text: str) -> tuple[str, str]:
    key, _, value = text.lstrip("+~").partition("=")
    return key, value


def _record_all_overrides(cfg: Any, overrides: list[str]) -> None:
    """The job keeps every override it was given: in its record and in its sweep folder name."""
    from hydra._internal.config_loader_impl import get_overrides_dirname
    from hydra.core.override_parser.overrides_parser import OverridesParser
    parser = OverridesParser.create()
    parsed = []
    for text in overrides:
        try:
            parsed += parser.parse_overrides([text])
        except Exception:  # noqa: BLE001 - an unparsable override cannot name a folder
            continue
    task = [o for o in parsed if not o.is_hydra_override()]
    cfg.hydra.overrides.task = [o.input_line for o in task]
    naming = cfg.hydra.job.config.override_dirname
    cfg.hydra.job.override_dirname = get_overrides_dirname(
        overrides=task, kv_sep=naming.kv_sep, item_sep=naming.item_sep,
        exclude_keys=naming.exclude_keys)


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
    exists = OmegaConf.select(cfg, key, default=MARK) is not MARK
    if override.is_add() and exists:
        return (f"{text}: {key} already exists, so + cannot add it; set it without the +. "
                f"Example: {text.lstrip('+')}.")
    group, _, name = key.partition(".")
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
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf
    GlobalHydra.instance().clear()
    previous = os.environ.get(ENV)
    os.environ[ENV] = "report"
    try:
        with initialize_config_dir(config_dir=str(schema.CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    finally:
        if previous is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = previous
    choices = dict(cfg.hydra.runtime.choices)
    plain = OmegaConf.to_container(cfg, resolve=False)
    plain.pop("hydra", None)
    print(schema.render_help(plain, choices))


# Installed on import: a sweep worker (joblib/loky, submitit) unpickles the task function, which
# imports this module, before it composes its job's config; the hook acts only under ENV.
install()

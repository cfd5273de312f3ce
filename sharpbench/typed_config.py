"""Typed configs: a command's keys as dataclasses, each key's type, default, range and meaning once.

A dataclass registered with Hydra's ``ConfigStore`` (``store``) is a structured config: Hydra
checks every override's type against it when composing and refuses keys it does not declare.
What a type cannot say (a range, a set of words) is the field's metadata, written with ``key``::

    k: int = key(3, "top-k Hessian eigenvalues", low=1)
    method: str = key("lanczos", "how the eigenvalues are found", choices=("lanczos", "power"))

``problems`` checks those ranges on a composed config; ``rows`` lists every key (dotted) with its
type, default and meaning, for ``--help`` (``render_help``) and the docs (``markdown_table``).
"""
import dataclasses
import math
import typing
from dataclasses import MISSING, field, fields, is_dataclass
from typing import Any, Iterator, Mapping, NamedTuple, Sequence


def key(default: Any = MISSING, meaning: str = "", *, factory: Any = None, low: float | None = None,
        high: float | None = None, low_open: bool = False, choices: Sequence[Any] | None = None,
        values: type | None = None, spec: str | None = None):
    """A dataclass field with its one-line ``meaning`` and accepted range (``low``/``high``,
    inclusive unless ``low_open``) or ``choices``. ``factory``: a default built per instance.
    ``values``: for a ``Dict[str, Any]`` field, the dataclass each entry follows (checked by
    ``problems``, listed by ``rows``; Hydra could not add an entry to a typed dict from the
    command line). ``spec``: the accepted values in the training schema's value language
    (:mod:`sharpbench.schema`, e.g. ``"null | int >= 1 | float in (0, 1]"``), where a Python type
    cannot say them; the training checks apply it."""
    metadata = {"meaning": meaning, "low": low, "high": high, "low_open": low_open,
                "choices": tuple(choices) if choices is not None else None, "values": values,
                "spec": spec}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def store(name: str, node: type, group: str | None = None) -> None:
    """Register ``node`` with Hydra's ConfigStore (a YAML file uses it as its first default)."""
    from hydra.core.config_store import ConfigStore
    ConfigStore.instance().store(name=name, node=node, group=group)


def type_text(tp: Any) -> str:
    """``Optional[int]`` → ``int | null``; ``List[str]`` → ``list[str]``."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        parts = [type_text(a) for a in typing.get_args(tp)]
        return " | ".join(p for p in parts if p != "null") + (" | null" if "null" in parts else "")
    if tp is type(None):
        return "null"
    if origin in (list, Sequence):
        return f"list[{type_text(typing.get_args(tp)[0])}]"
    if origin in (dict, Mapping):
        return "dict"
    if is_dataclass(tp):
        return tp.__name__
    return getattr(tp, "__name__", str(tp))


def range_text(meta: Mapping[str, Any]) -> str:
    if meta.get("choices"):
        return " | ".join(str(c) for c in meta["choices"])
    low, high = meta.get("low"), meta.get("high")
    if low is not None and high is not None:
        return f"in {'(' if meta.get('low_open') else '['}{low}, {high}]"
    if low is not None:
        return f"{'>' if meta.get('low_open') else '>='} {low}"
    if high is not None:
        return f"<= {high}"
    return ""


class Row(NamedTuple):
    key: str        # dotted
    type: str       # with its range, e.g. "int >= 1", "str: lanczos | power"
    default: Any
    meaning: str


def _default(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
        return dataclasses.asdict(value) if is_dataclass(value) else value
    return "???"


def defaults(cls: type) -> dict[str, Any]:
    """The keys of ``cls`` that have a default, with it (a required key, e.g. an option's
    ``name`` that its YAML file sets, is left out)."""
    return {f.name: _default(f) for f in fields(cls)
            if f.default is not MISSING or f.default_factory is not MISSING}  # type: ignore[misc]


def rows(cls: type, prefix: str = "") -> Iterator[Row]:
    """Every key of ``cls``, nested dataclasses expanded into dotted keys."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        tp = hints[f.name]
        if is_dataclass(tp):
            yield from rows(tp, f"{prefix}{f.name}.")
            continue
        text = f.metadata.get("spec") or type_text(tp)
        value_type = f.metadata.get("values")
        if value_type is not None:  # name -> a dataclass's keys
            default = _default(f)
            shown = {k: _show(v) for k, v in default.items()} if isinstance(default, dict) else {}
            yield Row(prefix + f.name, f"dict of {value_type.__name__.lower()}s",
                      "; ".join(f"{k}: {v}" for k, v in shown.items()) or "{}",
                      f.metadata.get("meaning", ""))
            yield from rows(value_type, f"{prefix}{f.name}.<name>.")
            continue
        if not f.metadata.get("spec") and (rng := range_text(f.metadata)):
            text = f"{text}: {rng}" if f.metadata.get("choices") else f"{text} {rng}"
        yield Row(prefix + f.name, text, _default(f), f.metadata.get("meaning", ""))


def problems(cfg: Mapping[str, Any], cls: type, prefix: str = "") -> list[str]:
    """``key=value: what it accepts`` for each value of ``cfg`` outside its field's range."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        value = cfg.get(f.name) if isinstance(cfg, Mapping) or hasattr(cfg, "get") else None
        if is_dataclass(hints[f.name]):
            if value is not None:
                out += problems(value, hints[f.name], f"{prefix}{f.name}.")
            continue
        meta = f.metadata
        if meta.get("values") is not None and isinstance(value, Mapping):
            entry_keys = {g.name for g in fields(meta["values"])}
            for name, entry in value.items():
                where = f"{prefix}{f.name}.{name}"
                if not isinstance(entry, Mapping):
                    out.append(f"{where}={entry}: accepted a mapping of {', '.join(entry_keys)}")
                    continue
                out += [f"{where}.{k}: not a key (accepted: {', '.join(sorted(entry_keys))})"
                        for k in entry if k not in entry_keys]
                out += problems(entry, meta["values"], f"{where}.")
            continue
        if value is None or isinstance(value, bool):
            continue
        bad = False
        if meta.get("choices") is not None:
            bad = value not in meta["choices"]
        elif isinstance(value, (int, float)):
            low, high = meta.get("low"), meta.get("high")
            bad = (isinstance(value, float) and not math.isfinite(value)) or (
                low is not None and (value <= low if meta.get("low_open") else value < low)) or (
                high is not None and value > high)
        if bad:
            out.append(f"{prefix}{f.name}={value}: accepted {range_text(meta)} "
                       f"({meta.get('meaning', '')})")
    return out


def render_help(cls: type, usage: Sequence[str]) -> str:
    """A command's ``--help``: its usage lines, then every key with type, default and meaning."""
    table = list(rows(cls))
    width = max(len(r.key) for r in table)
    lines = [*usage, "", "Keys (override with key=value; nested keys with dots):", ""]
    for r in table:
        lines.append(f"  {r.key:<{width}}  {r.type} (default {_show(r.default)})")
        if r.meaning:
            lines.append(f"  {'':<{width}}    {r.meaning}")
    return "\n".join(lines)


def markdown_table(cls: type) -> str:
    """The keys of ``cls`` as a Markdown table (docs; checked against the code by a test)."""
    out = ["| key | accepts | default | meaning |", "|---|---|---|---|"]
    def cell(text: str) -> str:
        return text.replace("|", "\\|")
    for r in rows(cls):
        out.append(f"| `{r.key}` | {cell(r.type)} | `{cell(_show(r.default))}` | {cell(r.meaning)} |")
    return "\n".join(out)


def _show(value: Any) -> str:
    if is_dataclass(value) and not isinstance(value, type):
        return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in dataclasses.asdict(value).items()) + "}"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value)


def check_command(config_name: str, overrides: Sequence[str], cls: type, command: str) -> str | None:
    """Why ``sharpbench <command> <overrides>`` cannot run (one paragraph), or ``None``: the
    config ``config_name`` composed with Hydra's public compose API, every override's key and
    type checked against ``cls``, then every range (``problems``)."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(Path(__file__).resolve().parent / "conf"),
                                   version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=list(overrides))
    except Exception as err:  # noqa: BLE001 - Hydra's override and type errors, explained
        return explain(err, overrides, cls, command)
    finally:
        GlobalHydra.instance().clear()
    known = {r.key: r for r in rows(cls)}
    missing = [f"{k} ({known[k].meaning})" if k in known else k
               for k in sorted(OmegaConf.missing_keys(cfg))]
    if missing:
        return (f"sharpbench {command}: nothing to work on: give " + "; ".join(missing) +
                f". `sharpbench {command} --help` shows how.")
    bad = problems(OmegaConf.to_container(cfg), cls)
    return f"sharpbench {command}: " + "; ".join(bad) if bad else None


def explain(err: Exception, overrides: Sequence[str], cls: type, command: str) -> str:
    """Hydra's refusal of an override, with what the key accepts or the nearest key."""
    import difflib
    known = {r.key: r for r in rows(cls)}
    groups = {k.rsplit(".", 1)[0] for k in known if "." in k}
    reason = err.__cause__ if err.__cause__ is not None and "Error merging" in str(err) else err
    lines = [line.strip() for line in str(reason).strip().splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Error merging override"):
        lines = lines[1:]  # the reason, not the restated override
    first = lines[0].rstrip(".") if lines else type(err).__name__
    for text in overrides:
        name = text.split("=", 1)[0].lstrip("+~")
        covered = name in groups or any(name == k or name.startswith(k + ".") for k in known)
        if name and not covered and "=" in text:
            near = difflib.get_close_matches(name, list(known), n=1, cutoff=0.5)
            hint = f" Did you mean {near[0]}?" if near else ""
            return (f"sharpbench {command}: {name} is not a key of this command.{hint} "
                    f"`sharpbench {command} --help` lists every key.")
    for text in overrides:
        name = text.split("=", 1)[0].lstrip("+~")
        if name in known and name in str(err):
            r = known[name]
            return (f"sharpbench {command}: {text}: {first}. {name} accepts {r.type}"
                    f"{f' ({r.meaning})' if r.meaning else ''}.")
    return (f"sharpbench {command}: {' '.join(overrides)}: {first}. `sharpbench {command} --help` "
            "lists every key.")


def with_defaults(entry: Mapping[str, Any], cls: type) -> dict[str, Any]:
    """A ``values=`` dict entry with the keys it leaves out taken from ``cls``'s defaults."""
    return {**dataclasses.asdict(cls()), **dict(entry)}

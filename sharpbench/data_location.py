"""Where a run's data came from, and finding it again for ``eval`` and ``analyze``.

Where the data lie (``dataset.root``), how they are stored (``dataset.format``) and whether they
may be downloaded do not change a run's results, so they are not part of its identity
(:mod:`sharpbench.run_identity`). They are recorded *beside* it: ``metrics.json`` and every
checkpoint carry ``data_source = {root, format, download, cache, cache_dir}`` with ``root`` made
absolute. ``eval`` and ``analyze`` rebuild the run's dataset from its identity plus this record;
``dataset.root=`` / ``dataset.format=`` on their command line override it (data that moved), and a
run recorded without it (older versions) is looked for in ``$SHARPBENCH_DATA``, then ``data/``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

# The dataset keys that say where and how the data are read: recorded, not part of the identity.
SOURCE_KEYS = ("root", "format", "download", "cache", "cache_dir")
DEFAULT_ROOT = "data"


def _absolute(path: Any) -> str | None:
    return None if path is None else str(Path(str(path)).expanduser().resolve())


def data_source(dataset: Mapping[str, Any]) -> dict[str, Any]:
    """The record of where a run's data came from (``dataset``: the run's resolved dataset group)."""
    source = {key: dataset.get(key) for key in SOURCE_KEYS if key in dataset}
    for key in ("root", "cache_dir"):
        if key in source:
            source[key] = _absolute(source[key])
    return source


def candidate_roots(source: Mapping[str, Any] | None) -> list[str]:
    """Where to look for a run's data when no root is given: the recorded root, then
    ``$SHARPBENCH_DATA``, then ``data/`` (the training default)."""
    out = []
    if source and source.get("root"):
        out.append(str(source["root"]))
    if os.environ.get("SHARPBENCH_DATA"):
        out.append(_absolute(os.environ["SHARPBENCH_DATA"]))
    out.append(_absolute(DEFAULT_ROOT))
    return list(dict.fromkeys(out))


def dataset_for_evaluation(dataset: Mapping[str, Any], source: Mapping[str, Any] | None, *,
                           root: str | None = None, format: str | None = None) -> dict[str, Any]:
    """The dataset group to rebuild a trained run's data with.

    ``dataset``: the run's recorded dataset group (its identity part); ``source``: its recorded
    ``data_source`` (``None`` for runs of older versions); ``root`` / ``format``: the user's
    overrides. Never downloads: the data must be the run's own."""
    out = {k: v for k, v in dict(dataset).items() if k not in SOURCE_KEYS}
    source = dict(source or {})
    for key in ("format", "cache", "cache_dir"):
        if source.get(key) is not None:
            out[key] = source[key]
    if format is not None:
        out["format"] = str(format)
    if out.get("name") != "synthetic":
        if root is not None:
            out["root"] = _absolute(root)
        else:
            roots = candidate_roots(source)
            out["root"] = next((r for r in roots if Path(r).is_dir()), roots[0])
    out["download"] = False
    return out


def describe(dataset: Mapping[str, Any]) -> str:
    """``'<root> (format folder)'`` for messages."""
    if dataset.get("name") == "synthetic":
        return "synthetic data"
    return f"{dataset.get('root')} (dataset.format={dataset.get('format', 'python')})"


def recorded_source(run_dir: Path, hyper_parameters: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """Where training read a run's data: its checkpoint's ``data_source`` (``hyper_parameters``,
    when the caller has the checkpoint), else ``metrics.json``'s; ``None`` for older runs."""
    source = (hyper_parameters or {}).get("data_source")
    if source:
        return dict(source)
    from .record import read_metrics
    source = (read_metrics(run_dir) or {}).get("data_source")
    return dict(source) if source else None


def open_run_data(dataset: Mapping[str, Any], source: Mapping[str, Any] | None, *, seed: int,
                  stage: str, root: str | None = None, format: str | None = None,
                  eval_batch_size: int | None = None):
    """A trained run's data module, set up for ``stage``, read where training read them unless
    ``root``/``format`` say otherwise; data that cannot be found is a ``DatasetUnavailableError``
    saying where it was looked for and how to point at it."""
    from .data import CIFARDataModule, DataConfigError, DatasetUnavailableError
    dataset = dataset_for_evaluation(dataset, source, root=root, format=format)
    if eval_batch_size is not None:
        dataset["eval_batch_size"] = int(eval_batch_size)
    data = CIFARDataModule(**dataset, seed=int(seed))
    try:
        data.prepare_data()
        data.setup(stage)
    except DataConfigError as err:
        where = "at" if root is not None else "where training read them,"
        raise DatasetUnavailableError(
            f"the run's data were not found {where} {describe(dataset)}. {err} (On this "
            "command, dataset.root= and dataset.format= say where they are now.)") from err
    return data

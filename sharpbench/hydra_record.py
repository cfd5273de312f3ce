"""Keep a run folder's Hydra record (``.hydra/config.yaml``, ``overrides.yaml``, ``hydra.yaml``)
describing the run that lives there.

Hydra writes those files into the job's folder before sharpbench sees the config, so a command
that is then refused (a changed config meeting a checkpoint, a folder held by another process),
or that moves to a new folder (``on_config_change=new_folder``), or that finds the run already
completed, would leave the folder's record describing a run that never happened there. Once a run
is accepted into a folder its record is copied to ``.hydra/accepted/``; the other outcomes put
that copy back (and a moved run takes the record Hydra wrote with it).
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

RECORD_DIR = ".hydra"
ACCEPTED = "accepted"
log = logging.getLogger(__name__)


def _files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.yaml")) if folder.is_dir() else []


def _copy_atomic(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _rank_zero() -> bool:
    """Only the process that owns the folder touches its record (DDP's other ranks share it)."""
    from .lifecycle import is_rank_zero
    return is_rank_zero()


def accept(run_dir: Path) -> None:
    """The run in ``run_dir`` is going ahead: its Hydra record becomes the accepted one."""
    if not _rank_zero():
        return
    record = Path(run_dir) / RECORD_DIR
    for f in _files(record):
        _copy_atomic(f, record / ACCEPTED / f.name)


def restore(run_dir: Path, warn: bool = True) -> bool:
    """Put the accepted record back over what this (refused) command's Hydra wrote; ``False``
    when the folder has none (made before sharpbench kept one: its record stays as Hydra left it)."""
    if not _rank_zero():
        return False
    record = Path(run_dir) / RECORD_DIR
    kept = _files(record / ACCEPTED)
    for f in kept:
        _copy_atomic(f, record / f.name)
    if warn and not kept and _files(record):
        log.warning("%s/%s now describes this refused command: the folder has no accepted copy "
                    "of its own run's record (made by an older sharpbench)", run_dir, RECORD_DIR)
    return bool(kept)


def move(from_dir: Path, to_dir: Path) -> None:
    """The run moved to ``to_dir`` (``on_config_change=new_folder``): it takes the record Hydra
    wrote for it, and ``from_dir`` gets its own back."""
    if not _rank_zero():
        return
    for f in _files(Path(from_dir) / RECORD_DIR):
        _copy_atomic(f, Path(to_dir) / RECORD_DIR / f.name)
    restore(from_dir)

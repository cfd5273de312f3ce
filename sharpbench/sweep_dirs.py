"""Names of sweep job folders: one path component, readable, never too long for the file system.

``hydra.sweep.subdir`` is ``${sharpbench_job_dir:${hydra:job.override_dirname}}``: Hydra joins the
job's overrides (``dataset=cifar10,optimizer=sam,seed=0``; where-not-what keys such as
``dataset.root`` are left out by ``hydra.job.config.override_dirname.exclude_keys``) and this
resolver makes a folder name of it:

- a ``/`` inside a value would nest folders: it becomes ``_``;
- a name longer than :data:`MAX_NAME_BYTES` (file systems allow 255 bytes per component; the
  margin leaves room for the temporary files written beside it) keeps a readable prefix, cut at
  an override boundary, plus ``-`` and 12 hex digits of the full name's SHA-256. The hash makes
  the name unique and stable, so a re-run sweep finds the same folder again.
"""
from __future__ import annotations

import hashlib

from omegaconf import OmegaConf

RESOLVER = "sharpbench_job_dir"
MAX_NAME_BYTES = 200
HASH_CHARS = 12


def job_dir_name(override_dirname: str, max_bytes: int = MAX_NAME_BYTES) -> str:
    """The folder name of a sweep job whose overrides Hydra joined into ``override_dirname``."""
    name = str(override_dirname).replace("/", "_").replace("\\", "_")
    if name in (".", ".."):
        name = name.replace(".", "_")
    if len(name.encode()) <= max_bytes:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:HASH_CHARS]
    budget = max_bytes - len(digest) - 1
    prefix = name.encode()[:budget].decode(errors="ignore")
    if "," in prefix:  # end the readable part at a whole override
        prefix = prefix[:prefix.rindex(",")]
    return f"{prefix}-{digest}"


def register_resolver() -> None:
    """Make ``${sharpbench_job_dir:...}`` available to the configs (idempotent)."""
    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, job_dir_name)

"""DDP jobs inside a Hydra sweep: start the extra ranks for *this* job, and clean up after it.

Lightning's subprocess launcher (``strategy=ddp``) starts ranks 1..N-1 by re-running the
command line, ``sys.argv`` plus ``hydra.run.dir=<run.dir>`` (a private builder of Lightning's,
replaced through ``sharpbench.compat``). In a multirun that goes wrong:

- ``sys.argv`` holds ``-m`` and the sweep lists, so every child runs the *whole sweep* again, as
  rank 1, and pairs with the parent's job only if both happen to walk the jobs in the same
  order with the same skip decisions (a ``${now:}`` sweep name even gives the child a second
  sweep folder); otherwise ranks train different configurations in one process group or hang;
- ``hydra.run.dir`` is not where a sweep job writes (that is the sweep subdir);
- under the joblib launcher ``__main__``/``sys.argv`` are loky's worker bootstrap, under
  submitit they are submitit's, so the child command is not even ours;
- the parent keeps ``LOCAL_RANK``/``WORLD_SIZE``/``MASTER_PORT``/``NODE_RANK`` in its
  environment and its process group (destroyed only at exit): the next DDP job in the same
  process believes its ranks are started externally and reuses the stale group (it hangs).

``sweep_job_scope()`` fixes all four around one job: children are started as
``python -m sharpbench.train <this job's overrides> hydra.mode=RUN hydra.run.dir=<job dir>``,
and the environment and process group are restored afterwards.
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Iterator, Sequence

from . import compat

DDP_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
ENTRY_MODULE = "sharpbench.train"


def hydra_quote(value: str) -> str:
    """Quote an override value for Hydra's parser (paths with ``=`` and ``,``)."""
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def job_subprocess_cmd(local_rank: int) -> tuple[Sequence[str], str]:
    """The command and cwd that start rank ``local_rank`` of the current Hydra job only."""
    from hydra.core.hydra_config import HydraConfig
    hc = HydraConfig.get()
    cmd = [sys.executable, "-m", ENTRY_MODULE]
    for source in hc.runtime.config_sources:
        if source.get("provider") == "command-line" and source.get("schema") == "file":
            cmd += ["--config-dir", str(source.path)]
    cmd += ["--config-name", str(hc.job.config_name)]
    cmd += list(hc.overrides.task)
    cmd += ["hydra.mode=RUN", f"hydra.run.dir={hydra_quote(hc.runtime.output_dir)}",
            "hydra.output_subdir=null", f"hydra.job.name=train_ddp_process_{local_rank}"]
    return cmd, str(hc.runtime.cwd)


@contextmanager
def sweep_job_scope() -> Iterator[None]:
    """Run one (possibly DDP) job of a sweep so that it cannot disturb the next one."""
    saved = {k: os.environ.get(k) for k in DDP_ENV}
    patched = compat.replace_child_command(job_subprocess_cmd) if in_multirun() else {}
    try:
        yield
    finally:
        compat.restore_child_command(patched)
        destroy_process_group()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def destroy_process_group() -> None:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

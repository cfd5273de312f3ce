"""The private Lightning internals sharpbench cannot do without, in one place.

Everything else uses the libraries' public APIs. ``tests/test_compat.py`` checks each use below
against the installed versions and fails, naming it, when a release changes it.

1. ``request_graceful_stop``: Lightning stops ``fit`` in an orderly way (the exception every
   callback's ``on_exception`` sees, ``SIGTERMException``, raised *after* the current batch's
   bookkeeping or the epoch's end) only when its signal connector's ``received_sigterm`` is set;
   ``trainer.received_sigterm`` is a read-only view of it, and ``trainer.should_stop`` would run
   the end-of-epoch hooks (and checkpoint) mid-epoch. Used at the safe points of
   ``runtime.StopAtSafePoint``.
2. ``child_command_builder``: under a Hydra multirun, Lightning's subprocess launcher
   (``strategy=ddp``) starts ranks 1..N-1 with the command ``_hydra_subprocess_cmd`` builds, which
   re-runs the whole sweep; ``sharpbench.ddp_launch`` points it at this job's command.

Not private, but checked here too: ``is_logging_step`` restates, on public trainer values, the
rule by which Lightning decides that a training step's logged values are written (its own test is
that both agree on every step of a run, a resumed one included).
"""
from __future__ import annotations

import importlib
from typing import Any, Callable

# (1) the flag behind ``trainer.received_sigterm``
SIGNAL_CONNECTOR = "_signal_connector"
# (2) Lightning's launcher modules and the name each imported the child-command builder under
LAUNCHER_MODULES = ("lightning.fabric.strategies.launchers.subprocess_script",
                    "lightning.pytorch.strategies.launchers.subprocess_script")
CHILD_COMMAND = "_hydra_subprocess_cmd"


def request_graceful_stop(trainer) -> None:
    """Make Lightning stop ``fit`` at its next check, as if it had received SIGTERM."""
    getattr(trainer, SIGNAL_CONNECTOR).received_sigterm = True


def replace_child_command(builder: Callable[[int], Any]) -> dict:
    """Point Lightning's DDP child-command builder at ``builder(local_rank) -> (cmd, cwd)``;
    returns what ``restore_child_command`` needs."""
    patched = {}
    for name in LAUNCHER_MODULES:
        module = importlib.import_module(name)
        patched[module] = getattr(module, CHILD_COMMAND)
        setattr(module, CHILD_COMMAND, builder)
    return patched


def restore_child_command(patched: dict) -> None:
    for module, original in patched.items():
        setattr(module, CHILD_COMMAND, original)


def is_logging_step(trainer) -> bool:
    """Whether Lightning writes the values logged for the training batch that just ended (asked
    in ``on_train_batch_end``, or in ``training_step`` after the optimizer step): every
    ``log_every_n_steps`` optimizer steps, and when the trainer is stopping. sharpbench counts
    one optimizer step per batch, so ``global_step`` is Lightning's count of batches stepped."""
    every = trainer.log_every_n_steps
    return bool(every) and (trainer.global_step % every == 0 or bool(trainer.should_stop))

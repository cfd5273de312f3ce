"""Hydra configs of sharpbench (a package so that Hydra finds them as pkg://sharpbench.conf).

Importing it registers the typed configs (``sharpbench.train_configs``) that the YAML files name
as ``/schema/...`` defaults; ``sharpbench.train``, ``eval`` and ``analyze`` import them too. Code
that composes these configs itself (``hydra.compose``) imports ``sharpbench.train_configs``
first."""
import sharpbench.train_configs  # noqa: F401

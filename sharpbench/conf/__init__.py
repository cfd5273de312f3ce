"""Hydra configs of sharpbench (a package so that Hydra finds them as pkg://sharpbench.conf)."""

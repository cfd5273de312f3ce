"""The typed configs of ``sharpbench eval`` and ``sharpbench analyze`` (Hydra structured configs).

Each key's type, default, accepted range and meaning live here once; ``conf/eval.yaml`` and
``conf/analyze.yaml`` only name these as their first default and set Hydra's own options.
``--help`` and the key tables of ``docs/outputs.md`` and ``docs/analysis.md`` are generated from
them (:mod:`sharpbench.typed_config`; the docs are checked by ``tests/test_docs.py``).
"""
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

from .typed_config import key, store


@dataclass
class DataLocation:
    """Where a trained run's data are now (both null: where training read them)."""
    root: Optional[str] = key(None, "where the run's data are now (null: where training read "
                                    "them, else $SHARPBENCH_DATA, else data/)")
    format: Optional[str] = key(None, "how they are stored (null: as in training)",
                                choices=("python", "folder"))


@dataclass
class EvalConfig:
    ckpt: str = key(MISSING, "a run folder (its checkpoints/last.ckpt), a sweep job folder or a "
                             ".ckpt file; also the first positional argument")
    out: Optional[str] = key(None, "where eval.json goes: a folder or a .json path (null: the "
                                   "run folder)")
    dataset: DataLocation = key(factory=DataLocation, meaning="")
    data_root: Optional[str] = key(None, "older spelling of dataset.root")
    eval_batch_size: Optional[int] = key(None, "images per evaluation batch (null: the run's "
                                               "dataset.eval_batch_size)", low=1)
    accelerator: str = key("auto", "where to evaluate; auto: a CUDA GPU when one is visible",
                           choices=("auto", "cpu", "gpu", "cuda"))
    progress_bar: bool = key(True, "show a progress bar")


@dataclass
class Subset:
    size: int = key(1024, "un-augmented training images every measure uses (the run's "
                          "training labels)", low=1)
    seed: int = key(0, "draws the subset", low=0)
    batch_size: int = key(256, "samples per forward pass (memory only: results do not depend "
                               "on it)", low=1)


@dataclass
class Eigen:
    k: int = key(3, "top-k Hessian eigenvalues", low=1)
    method: str = key("lanczos", "how they are found", choices=("lanczos", "power"))
    num_iters: Optional[int] = key(None, "Lanczos steps (null: max(2k+10, 20)) or power "
                                         "iterations (null: 50)", low=1)
    dtype: str = key("float64", "Lanczos basis precision (float32: half the memory, num_iters "
                                "x #params)", choices=("float64", "float32"))
    angle: bool = key(True, "also the angle between the full gradient and the top eigenvector")


@dataclass
class Trace:
    n_samples: int = key(100, "Hutchinson probes (Rademacher)", low=1)


@dataclass
class Density:
    num_iters: int = key(80, "Lanczos steps per probe (stochastic Lanczos quadrature)", low=2)
    num_runs: int = key(3, "probes", low=1)
    sigma_rel: float = key(0.01, "Gaussian broadening, relative to the spectrum's extent",
                           low=0, low_open=True)


@dataclass
class Measure:
    kind: str = key("worst", "worst case (projected gradient ascent) or average (Gaussian "
                             "draws)", choices=("worst", "average"))
    norm: str = key("l2", "the ball's norm", choices=("l2", "linf"))
    adaptive: bool = key(False, "scale the ball by |w| (ASAM's adaptive sharpness)")
    rho: float = key(0.05, "the ball's radius", low=0, low_open=True)


def _default_measures() -> Dict[str, Any]:
    return {"worst_l2": asdict(Measure("worst", "l2", False, 0.05)),
            "worst_adaptive_l2": asdict(Measure("worst", "l2", True, 0.5)),
            "worst_adaptive_linf": asdict(Measure("worst", "linf", True, 0.002)),
            "average_adaptive": asdict(Measure("average", "l2", True, 0.05))}


@dataclass
class Sharpness:
    m: Optional[int] = key(128, "samples per perturbation, worst case (null: all at once)", low=1)
    steps: int = key(20, "projected gradient ascent steps", low=1)
    n_samples: int = key(20, "Gaussian draws (average case)", low=1)
    measures: Dict[str, Any] = key(factory=_default_measures, values=Measure,
                                       meaning="the measures taken, by name (add one with "
                                               "+sharpness.measures.<name>={kind: ..., rho: ...})")


@dataclass
class Landscape:
    grid: int = key(21, "points per axis (Feldman 2025, Fig. 9: 21 x 21)", low=2)
    span: float = key(1.0, "alpha, beta in [-span, span] (filter-normalised directions)",
                      low=0, low_open=True)
    seed: int = key(0, "the directions' seed: the same for every run (comparable surfaces)", low=0)


@dataclass
class Line:
    to: str = key("init", "init (the run's re-created initialisation) or another run's folder")
    points: int = key(31, "points along the line", low=2)
    t_min: float = key(-0.25, "start (t=0: the start point, t=1: the trained run)")
    t_max: float = key(1.25, "end")


MEASURES = ("eigen", "trace", "density", "sharpness", "landscape", "line")


@dataclass
class AnalyzeConfig:
    run_dir: str = key(MISSING, "a run folder, or a sweep folder (every completed run below "
                                "it, then a comparison); also the first positional argument")
    what: List[str] = key(factory=lambda: ["eigen", "trace", "density", "sharpness", "landscape"],
                          meaning="measures, comma-separated: " + ", ".join(MEASURES))
    device: str = key("auto", "auto (a GPU when present) | cpu | cuda | cuda:N")
    progress: bool = key(True, "show progress")
    dataset: DataLocation = key(factory=DataLocation, meaning="")
    subset: Subset = key(factory=Subset, meaning="")
    label_smoothing: float = key(0.0, "of the measured cross-entropy (0: the plain loss)",
                                 low=0, high=1)
    eigen: Eigen = key(factory=Eigen, meaning="")
    trace: Trace = key(factory=Trace, meaning="")
    density: Density = key(factory=Density, meaning="")
    sharpness: Sharpness = key(factory=Sharpness, meaning="")
    landscape: Landscape = key(factory=Landscape, meaning="")
    line: Line = key(factory=Line, meaning="")


store("eval_schema", EvalConfig)
store("analyze_schema", AnalyzeConfig)

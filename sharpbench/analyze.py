"""Sharpness diagnostics of finished runs, one command:

    python -m sharpbench.analyze <run dir> [what=eigen,trace,density,sharpness,landscape,line] [key=value ...]
    python -m sharpbench.analyze <sweep dir> ...      # every completed run below it, then a comparison

Hydra-configured (``conf/analyze.yaml``; overrides compose as in training). For each run it reads
``metrics.json`` (the resolved config) and ``checkpoints/last.ckpt``, rebuilds the model and the
training data, takes a fixed, un-augmented subset of the training set (``subset.size`` images,
drawn by ``subset.seed``) and writes

    <run>/sharpness.json                 every result, with the settings that produced it
    <run>/sharpness/density.png          Hessian eigenvalue density (log scale)
    <run>/sharpness/landscape.npz        21×21 loss/accuracy surface; landscape_contour.png, landscape_3d.png
    <run>/sharpness/line.npz, line.png   loss along initialisation → final (or run → run)

On a sweep dir it also writes ``<sweep>/sharpness/landscapes_contour.png`` and
``landscapes_3d.png``: every run's surface side by side on one colour scale, and
``lambda_max.png`` when the runs measured λ_max during training. sharpness.json is updated
(not replaced) per measure, so ``what=landscape`` later keeps the eigenvalues.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from .command_configs import MEASURES, AnalyzeConfig, Measure  # registers the typed config with Hydra
from .fileio import atomic_write_text
from .typed_config import check_command, problems, render_help, with_defaults
from .data import DataConfigError
from .data_location import open_run_data, recorded_source
from .models import build_model
from .sharpness import (gradient_eigenvector_angle, hessian_density, hessian_eigenvalues,
                        hessian_trace, loss_line, loss_surface, sharpness)
from .sharpness.monitor import read_history
from .optim.registry import label as method_label  # the names the report uses
from .record import read_metrics
from .sharpness import plots
from .sharpness.landscape import load_surface, save_line, save_surface

log = logging.getLogger("sharpbench.analyze")

RESULT_FILE = "sharpness.json"
FIGURE_DIR = "sharpness"
DTYPES = {"float64": torch.float64, "float32": torch.float32}


class AnalyzeError(ValueError):
    """Bad input to analyze; the message says what to change."""


# ------------------------------------------------------------------------------ the run
def run_config(run_dir: Path) -> dict[str, Any]:
    """The run's resolved config (from metrics.json, else .hydra/config.yaml)."""
    record = read_metrics(run_dir) or {}
    if record.get("config"):
        cfg = dict(record["config"])
        cfg.setdefault("seed", record.get("seed", 0))
        return cfg
    hydra_cfg = run_dir / ".hydra" / "config.yaml"
    if hydra_cfg.exists():
        cfg = OmegaConf.load(hydra_cfg)
        return {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
                for k in ("dataset", "model", "seed", "label_smoothing") if k in cfg}
    raise AnalyzeError(f"{run_dir}: neither metrics.json nor .hydra/config.yaml: not a sharpbench run dir")


def build_network(cfg: dict[str, Any], num_classes: int) -> torch.nn.Module:
    model_cfg = dict(cfg["model"])
    return build_model(model_cfg.pop("name"), num_classes=num_classes, **model_cfg)


def initial_state(cfg: dict[str, Any], num_classes: int) -> dict[str, torch.Tensor]:
    """The run's initialisation, re-created: training seeds every generator with ``seed`` and then
    builds the model (data loading draws only from its own seeded generators), so the same two
    steps give the same initial weights (tested against a training run)."""
    import lightning as L
    L.seed_everything(int(cfg.get("seed", 0)), workers=True, verbose=False)
    return build_network(cfg, num_classes).state_dict()


def load_trained(run_dir: Path, cfg: dict[str, Any], num_classes: int, device: torch.device) -> torch.nn.Module:
    ckpt_path = run_dir / "checkpoints" / "last.ckpt"
    if not ckpt_path.exists():
        raise AnalyzeError(f"{run_dir}: no checkpoints/last.ckpt (did the run finish? trainer checkpoints are "
                           "written at every epoch end)")
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    model = build_network(cfg, num_classes)
    model.load_state_dict(state)
    return model.to(device).eval()


def fixed_subset(data, size: int, seed: int, batch_size: int, device: torch.device) -> list:
    """``size`` training images chosen by ``seed`` (no augmentation, normalised), in batches."""
    n = len(data.train_y)
    if size < 1:
        raise AnalyzeError(f"subset.size={size} must be >= 1")
    size = min(int(size), n)
    gen = torch.Generator().manual_seed(int(seed))
    idx = torch.randperm(n, generator=gen)[:size].sort().values
    x, y = data.fisher_batch(idx, device)
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, size, batch_size)]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AnalyzeError(f"device={name} but no CUDA GPU is visible: use device=auto or device=cpu")
    return device


# --------------------------------------------------------------------------- measures
def measure_eigen(model, loss_fn, batches, c) -> dict[str, Any]:
    if str(c.dtype) not in DTYPES:
        raise AnalyzeError(f"eigen.dtype={c.dtype}: choose float64 or float32")
    eig = hessian_eigenvalues(model, loss_fn, batches, k=int(c.k), method=str(c.method),
                              num_iters=c.num_iters, return_vectors=bool(c.angle), dtype=DTYPES[str(c.dtype)])
    out = {"eigenvalues": eig.eigenvalues, "lambda_max": eig.eigenvalues[0], "method": eig.method,
           "k": int(c.k), "num_iters": c.num_iters, "batch_hvps": eig.num_hvps}
    if c.angle:
        ang = gradient_eigenvector_angle(model, loss_fn, batches, eigenvector=eig.eigenvectors[:, 0],
                                         lambda_max=eig.eigenvalues[0])
        out.update(grad_eigvec_angle_deg=ang.angle_deg, grad_norm=ang.grad_norm)
    return out


def measure_trace(model, loss_fn, batches, c) -> dict[str, Any]:
    tr = hessian_trace(model, loss_fn, batches, n_samples=int(c.n_samples))
    return {"trace": tr.trace, "trace_stderr": tr.stderr, "n_samples": tr.n_samples}


def measure_density(model, loss_fn, batches, c, out_dir: Path, eigenvalues=(), run: str = "",
                    method: str | None = None) -> dict[str, Any]:
    d = hessian_density(model, loss_fn, batches, num_iters=int(c.num_iters), num_runs=int(c.num_runs),
                        sigma_rel=float(c.sigma_rel))
    png = plots.plot_density(d.grid, d.density, out_dir / "density.png",
                             title=f"Hessian eigenvalue density of {run or 'the run'}\n(SLQ: {int(c.num_runs)} "
                                   f"probe(s) × {int(c.num_iters)} Lanczos steps)",
                             eigenvalues=eigenvalues, method=method)
    return {"nodes": d.nodes.tolist(), "weights": d.weights.tolist(), "sigma": d.sigma,
            "min_node": float(d.nodes.min()), "max_node": float(d.nodes.max()), "figure": png.name}


def measure_sharpness(model, loss_fn, batches, c, batch_size: int) -> dict[str, Any]:
    out = {}
    for name, spec in c.measures.items():
        spec = SimpleNamespace(**with_defaults(spec, Measure))  # keys left out: Measure's defaults
        r = sharpness(model, loss_fn, batches, rho=float(spec.rho), kind=str(spec.kind), norm=str(spec.norm),
                      adaptive=bool(spec.adaptive), m=c.m, steps=int(c.steps), n_samples=int(c.n_samples),
                      batch_size=batch_size)
        out[name] = {"value": r.value, "stderr": r.stderr, "kind": r.kind, "norm": r.norm,
                     "adaptive": r.adaptive, "rho": r.rho, "m": r.m, "loss": r.loss}
    return out


def measure_landscape(model, loss_fn, batches, c, out_dir: Path, title: str, progress: bool) -> dict[str, Any]:
    s = loss_surface(model, loss_fn, batches, grid=int(c.grid), span=float(c.span), seed=int(c.seed),
                     progress=progress)
    save_surface(out_dir / "landscape.npz", s)
    plots.plot_surface_contour(s, out_dir / "landscape_contour.png", title=title)
    plots.plot_surface_3d(s, out_dir / "landscape_3d.png", title=title)
    centre = s.loss[len(s.betas) // 2, len(s.alphas) // 2]
    return {"grid": int(c.grid), "span": float(c.span), "directions_seed": int(c.seed),
            "center_loss": float(centre), "min_loss": float(s.loss.min()), "max_loss": float(s.loss.max()),
            "file": "sharpness/landscape.npz",
            "figures": ["sharpness/landscape_contour.png", "sharpness/landscape_3d.png"]}


def measure_line(model, loss_fn, batches, c, out_dir: Path, cfg, num_classes, device, title, progress,
                 method: str | None = None):
    if str(c.to) == "init":
        other, label = initial_state(cfg, num_classes), "initialisation"
    else:
        other_dir = Path(str(c.to))
        other_cfg = run_config(other_dir)
        if other_cfg.get("model") != cfg.get("model"):
            raise AnalyzeError(f"line.to={other_dir}: a different model ({other_cfg.get('model')}), "
                               "the line needs the same architecture")
        other, label = load_trained(other_dir, other_cfg, num_classes, torch.device("cpu")).state_dict(), str(other_dir)
    line = loss_line(model, loss_fn, batches, start=other, end=model.state_dict(), points=int(c.points),
                     t_range=(float(c.t_min), float(c.t_max)), progress=progress)
    line.meta["start"] = label
    save_line(out_dir / "line.npz", line)
    plots.plot_lines([(title, line)], out_dir / "line.png", title=f"{label} (t=0) → trained (t=1)",
                     methods=[method] if method else None)
    return {"start": label, "points": int(c.points), "t": line.t.tolist(), "loss": line.loss.tolist(),
            "acc": line.acc.tolist(), "file": "sharpness/line.npz", "figure": "sharpness/line.png"}


# ------------------------------------------------------------------------------ drivers
def run_label(run_cfg: dict[str, Any]) -> str:
    """e.g. 'sam seed 0 (tiny_cnn, synthetic)'."""
    return (f"{run_cfg.get('optimizer', {}).get('name', '?')} seed {run_cfg.get('seed', '?')} "
            f"({run_cfg.get('model', {}).get('name', '?')}, {run_cfg.get('dataset', {}).get('name', '?')})")


def parse_what(what) -> list[str]:
    items = [what] if isinstance(what, str) else list(what)
    items = [w.strip() for item in items for w in str(item).split(",") if w.strip()]
    unknown = [w for w in items if w not in MEASURES]
    if unknown or not items:
        raise AnalyzeError(f"what={','.join(items)}: choose from {', '.join(MEASURES)} (comma-separated)")
    return items


def analyze_run(run_dir: Path, cfg: DictConfig) -> dict[str, Any]:
    """Measure one run; returns the updated sharpness.json content."""
    what = parse_what(cfg.what)
    run_cfg = run_config(run_dir)
    device = resolve_device(str(cfg.device))
    data = open_run_data(run_cfg["dataset"], recorded_source(run_dir), seed=int(run_cfg.get("seed", 0)),
                         stage="fit", root=cfg.dataset.root, format=cfg.dataset.format)
    model = load_trained(run_dir, run_cfg, data.num_classes, device)
    batch_size = int(cfg.subset.batch_size)
    batches = fixed_subset(data, int(cfg.subset.size), int(cfg.subset.seed), batch_size, device)
    smoothing = float(cfg.label_smoothing)

    def loss_fn(logits, y):
        return F.cross_entropy(logits.float(), y, label_smoothing=smoothing)

    out_dir = run_dir / FIGURE_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / RESULT_FILE
    result = json.loads(path.read_text()) if path.exists() else {}
    title = run_label(run_cfg)
    result["conventions"] = {
        "subset_size": sum(len(y) for _, y in batches), "subset_seed": int(cfg.subset.seed),
        "split": "train (un-augmented, training labels)", "mode": "eval", "accumulation": "float64",
        "loss": f"cross_entropy(label_smoothing={smoothing})", "device": str(device),
        "checkpoint": "checkpoints/last.ckpt", "torch_version": torch.__version__}
    result.update({k: run_cfg.get(k) for k in ("seed",)})
    result["method"] = run_cfg.get("optimizer", {}).get("name")
    for name in what:
        t0 = time.perf_counter()
        log.info("%s: %s", run_dir, name)
        if name == "eigen":
            value = measure_eigen(model, loss_fn, batches, cfg.eigen)
        elif name == "trace":
            value = measure_trace(model, loss_fn, batches, cfg.trace)
        elif name == "density":
            value = measure_density(model, loss_fn, batches, cfg.density, out_dir,
                                    result.get("eigen", {}).get("eigenvalues", ()), title, result["method"])
        elif name == "sharpness":
            value = measure_sharpness(model, loss_fn, batches, cfg.sharpness, batch_size)
        elif name == "landscape":
            value = measure_landscape(model, loss_fn, batches, cfg.landscape, out_dir, title, bool(cfg.progress))
        else:
            value = measure_line(model, loss_fn, batches, cfg.line, out_dir, run_cfg, data.num_classes,
                                 device, title, bool(cfg.progress), result["method"])
        value["seconds"] = round(time.perf_counter() - t0, 3)
        result[name] = value
        atomic_write_text(path, json.dumps(result, indent=2, sort_keys=True) + "\n")  # after each measure
    return result


def completed_runs(root: Path) -> list[Path]:
    """Run dirs below ``root`` whose metrics.json says completed and that have a checkpoint."""
    runs = []
    for metrics in sorted(root.rglob("metrics.json")):
        record = read_metrics(metrics.parent) or {}
        if record.get("status") == "completed" and (metrics.parent / "checkpoints" / "last.ckpt").exists():
            runs.append(metrics.parent)
    return runs


def compare_runs(runs: list[Path], out_dir: Path) -> list[Path]:
    """Side-by-side landscapes (one shared colour scale) and λ_max histories of several runs."""

    written = []
    items, methods = [], []
    for run in runs:
        npz = run / FIGURE_DIR / "landscape.npz"
        if npz.exists():
            record = read_metrics(run) or {}
            method = str(record.get("method", run.name))
            items.append((f"{method_label(method)} seed {record.get('seed', '?')}", load_surface(npz)))
            methods.append(method)
    if items:
        written.append(plots.plot_surfaces(items, out_dir / "landscapes_contour.png", "contour",
                                           "loss surfaces, filter-normalised directions (same seed)",
                                           methods=methods))
        written.append(plots.plot_surfaces(items, out_dir / "landscapes_3d.png", "3d", methods=methods))
    series, methods = [], []
    for r in runs:
        if (h := read_history(r)) is not None:
            record = read_metrics(r) or {}
            method = str(record.get("method", r.name))
            series.append((f"{method_label(method)} seed {record.get('seed', '?')}", *h))
            methods.append(method)
    if series:
        written.append(plots.plot_lambda_history(series, out_dir / "lambda_max.png", methods=methods))
    return written


def analyze(cfg: DictConfig) -> list[Path]:
    bad = problems(cfg, AnalyzeConfig)
    m, size = cfg.sharpness.m, int(cfg.subset.size)
    if "sharpness" in parse_what(cfg.what) and m is not None and int(m) > size:
        bad.append(f"sharpness.m={m} is more than the subset.size={size} images measured: set "
                   f"sharpness.m to at most {size} (or null: all at once), or raise subset.size")
    if bad:
        raise AnalyzeError("; ".join(bad))
    root = Path(str(cfg.run_dir)).expanduser()
    if not root.is_dir():
        raise AnalyzeError(f"run_dir={root}: no such folder")
    parse_what(cfg.what)
    if (root / "metrics.json").exists() or (root / "checkpoints").exists():
        record = read_metrics(root) or {}
        if record.get("status") not in (None, "completed"):
            log.warning("%s: status %s (analysing its last checkpoint anyway)", root, record.get("status"))
        analyze_run(root, cfg)
        print(f"[sharpbench] analyzed {root}: {root / RESULT_FILE}")
        return [root]
    runs = completed_runs(root)
    if not runs:
        raise AnalyzeError(f"{root}: no completed run (metrics.json with status completed and "
                           "checkpoints/last.ckpt) below it")
    for i, run in enumerate(runs, 1):
        log.info("run %d/%d: %s", i, len(runs), run)
        analyze_run(run, cfg)
    written = compare_runs(runs, root / FIGURE_DIR)
    print(f"[sharpbench] analyzed {len(runs)} runs below {root}" +
          (f"; comparison: {', '.join(str(p) for p in written)}" if written else ""))
    return runs


def hydra_argv(argv: list[str]) -> list[str]:
    """``<dir>`` (first argument: an existing path, or one without "=") → ``run_dir='<dir>'``; ``what=a,b`` → ``what=[a,b]`` (Hydra
    would read an unbracketed comma list as a sweep; one name is a list of one)."""
    out = []
    for i, arg in enumerate(argv):
        if i == 0 and not arg.startswith("-") and ("=" not in arg or Path(arg).exists()):
            # quoted: sweep job folders are named by their overrides ("optimizer=sam,seed=0")
            quote = "'" if "'" not in arg else '"'
            arg = f"run_dir={quote}{arg}{quote}"
        elif arg.startswith("what=") and not arg[5:].startswith("["):
            arg = f"what=[{arg[5:]}]"
        out.append(arg)
    return out


def _hydra_main() -> None:
    import hydra

    @hydra.main(config_path="conf", config_name="analyze", version_base="1.3")
    def entry(cfg: DictConfig) -> None:
        try:
            analyze(cfg)
        except (AnalyzeError, DataConfigError) as err:  # bad settings, or data not found
            log.error("%s", err)
            sys.exit(2)
    entry()


def help_text() -> str:
    return render_help(AnalyzeConfig, [
        "sharpbench analyze: sharpness diagnostics of finished runs.", "",
        "  sharpbench analyze <run folder | sweep folder> [what=eigen,trace,...] [key=value ...]",
        "  (also python -m sharpbench.analyze ...)", "",
        "Writes <run>/sharpness.json and figures in <run>/sharpness/; on a sweep folder, also",
        "side-by-side landscapes and lambda_max histories in <sweep>/sharpness/ (docs/analysis.md)."])


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``python -m sharpbench.analyze <run dir> [overrides]``."""
    args = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in args):
        print(help_text())
        return
    sys.argv = [sys.argv[0]] + hydra_argv(args)
    overrides = [a for a in sys.argv[1:] if not a.startswith("-")]
    if (problem := check_command("analyze", overrides, AnalyzeConfig, "analyze")) is not None:
        print(problem, file=sys.stderr)
        sys.exit(2)
    _hydra_main()


if __name__ == "__main__":
    main()

"""Evaluate a trained run: ``sharpbench eval <run folder or .ckpt>`` (or ``ckpt=<path>``) (``python -m sharpbench.eval``).

checkpoint → module (``SharpnessModule.load_from_checkpoint``) → data from the run's saved config
→ test set (and validation split, if the run had one) → ``eval.json`` beside the run's metrics.

The data are rebuilt exactly as in training (same seed, subsets, split), so on an unchanged
dataset ``test_acc`` equals the run's ``metrics.json``. They are read where training read them
(the run's recorded ``data_source``: root and format); ``dataset.root=`` and ``dataset.format=``
point at data that moved (:mod:`sharpbench.data_location`); ``out`` writes eval.json elsewhere.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from . import checks
from .command_configs import EvalConfig  # registers the typed config with Hydra
from .typed_config import check_command, problems, render_help
from .console import quiet_libraries
from .data_location import open_run_data, recorded_source
from .module import SharpnessModule
from .run_logging import EvalProgressBar
from .fileio import atomic_write_text

log = logging.getLogger("sharpbench")

EVAL_FILE = "eval.json"
CKPT_IN_RUN = Path("checkpoints") / "last.ckpt"


class EvalInputError(checks.ConfigError):
    """The checkpoint or run folder given to ``sharpbench eval`` cannot be used."""


def locate(ckpt: str | Path) -> tuple[Path, Path]:
    """``(checkpoint file, run folder)`` for a run folder or a checkpoint path."""
    path = Path(str(ckpt)).expanduser()
    if path.is_dir():
        file = path / CKPT_IN_RUN
        if not file.is_file():
            raise EvalInputError(f"ckpt={ckpt}: no checkpoint at {file}. Give a run folder that has "
                                 "checkpoints/last.ckpt, or the path of a .ckpt file")
        return file, path
    if not path.is_file():
        raise EvalInputError(f"ckpt={ckpt}: no such file or folder. Give a run folder "
                             "(outputs/runs/<run>) or the path of a .ckpt file")
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return path, run_dir


def load_checkpoint(file: Path) -> dict[str, Any]:
    try:
        return torch.load(file, map_location="cpu", weights_only=False)
    except Exception as err:
        raise EvalInputError(f"cannot read the checkpoint {file} ({type(err).__name__}: {err}); "
                             "is it a complete sharpbench .ckpt file?") from err


def run_config(checkpoint: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """The run's resolved config: saved in the checkpoint, else the run folder's metrics.json."""
    config = (checkpoint.get("hyper_parameters") or {}).get("run_config")
    if config:
        return dict(config)
    metrics = run_dir / "metrics.json"
    if metrics.is_file():
        config = json.loads(metrics.read_text()).get("config")
        if config:
            return dict(config)
    raise EvalInputError(f"no run configuration in the checkpoint nor in {metrics}: the checkpoint "
                         "was not written by `sharpbench train`")


def evaluate(ckpt: str | Path, *, out: str | Path | None = None, data_root: str | None = None,
             data_format: str | None = None, eval_batch_size: int | None = None,
             accelerator: str = "auto", progress_bar: bool = True) -> dict[str, Any]:
    """Evaluate a checkpoint on the run's test set (and validation split); write and return
    eval.json. ``data_root`` / ``data_format``: where the data are now, if not where training
    read them."""
    import lightning as L


    file, run_dir = locate(ckpt)
    checkpoint = load_checkpoint(file)
    if "model_cfg" not in (checkpoint.get("hyper_parameters") or {}):
        raise EvalInputError(f"{file} does not carry the model's configuration (written by an older "
                             "sharpbench): re-run training, or load its weights by hand")
    config = run_config(checkpoint, run_dir)
    data = open_run_data(config["dataset"],
                         recorded_source(run_dir, checkpoint.get("hyper_parameters")),
                         seed=int(config["seed"]), stage="validate", root=data_root,
                         format=data_format, eval_batch_size=eval_batch_size)
    module = SharpnessModule.load_from_checkpoint(file, map_location="cpu", weights_only=False)
    trainer = L.Trainer(accelerator=accelerator, devices=1, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, enable_progress_bar=progress_bar,
                        callbacks=[EvalProgressBar()] if progress_bar else [],  # "Test", not "Validation"
                        precision="32-true", default_root_dir=str(run_dir))
    started = time.time()
    trainer.validate(module, datamodule=data, verbose=False)
    result: dict[str, Any] = {
        "checkpoint": str(file.resolve()), "run_dir": str(run_dir.resolve()),
        "method": config["optimizer"]["name"], "dataset": config["dataset"]["name"],
        "model": config["model"]["name"], "seed": config["seed"],
        "epoch": checkpoint.get("epoch"), "global_step": checkpoint.get("global_step"),
        "device": str(module.device), "precision": module.precision_name,
        "eval_time_s": time.time() - started,
        "evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "data_source": {"root": data.config.root, "format": data.config.format},
    }
    for split in ("test", "val"):
        res = module.eval_results.get(split)
        if res:
            result.update({f"{split}_acc": res["acc"], f"{split}_loss": res["loss"],
                           f"{split}_images": int(sum(res["count"])),
                           f"{split}_per_class_acc": res["per_class_acc"]})
    path = Path(out) if out is not None else run_dir
    if path.suffix != ".json":
        path = path / EVAL_FILE
    atomic_write_text(path, json.dumps(result, indent=2, sort_keys=True) + "\n")
    result["eval_file"] = str(path)
    return result


def one_line(result: dict[str, Any]) -> str:
    parts = [f"[sharpbench] eval: {result['method']} on {result['dataset']}/{result['model']} "
             f"seed {result['seed']} (epoch {result['epoch']})"]
    for split in ("test", "val"):
        if f"{split}_acc" in result:
            parts.append(f"{split} acc {result[f'{split}_acc']:.2f}% loss {result[f'{split}_loss']:.4f}")
    parts.append(result["eval_file"])
    return " | ".join(parts)


def quote_override_value(text: str) -> str:
    """``text`` as a quoted Hydra override value: a sweep job folder's name holds ``=`` and ``,``,
    which the override grammar would read as syntax."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def positional_ckpt(argv: list[str]) -> list[str]:
    """``sharpbench eval <run folder or .ckpt>``: an argument that names an existing path becomes
    ``ckpt='<path>'`` (quoted, so any folder name works)."""
    out = []
    for arg in argv:
        if not arg.startswith("-") and not arg.startswith("ckpt=") and Path(arg).expanduser().exists():
            arg = f"ckpt={quote_override_value(arg)}"
        out.append(arg)
    return out


def help_text() -> str:
    return render_help(EvalConfig, [
        "sharpbench eval: evaluate a trained run on its test set (and validation split).", "",
        "  sharpbench eval <run folder | sweep job folder | .ckpt file> [key=value ...]",
        "  (also python -m sharpbench.eval ..., or ckpt=<path>)", "",
        "Rebuilds the model from the checkpoint and the data from the run's record (where",
        "training read them), and writes eval.json into the run folder (docs/outputs.md)."])


def main() -> dict[str, Any] | None:
    """``sharpbench eval <run folder or .ckpt> [key=value ...]`` (or ``ckpt=<path>``)."""
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(help_text())
        return None
    sys.argv = [sys.argv[0], *positional_ckpt(sys.argv[1:])]
    overrides = [a for a in sys.argv[1:] if not a.startswith("-")]
    if (problem := check_command("eval", overrides, EvalConfig, "eval")) is not None:
        print(problem, file=sys.stderr)
        sys.exit(2)
    return hydra_main()


@hydra.main(config_path="conf", config_name="eval", version_base="1.3")
def hydra_main(cfg: DictConfig) -> dict[str, Any] | None:
    quiet_libraries()
    try:
        if bad := problems(cfg, EvalConfig):
            raise EvalInputError("; ".join(bad))
        result = evaluate(cfg.ckpt, out=cfg.out,
                          data_root=cfg.dataset.root if cfg.dataset.root is not None else cfg.data_root,
                          data_format=cfg.dataset.format, eval_batch_size=cfg.eval_batch_size, accelerator=str(cfg.accelerator),
                          progress_bar=bool(cfg.progress_bar))
    except checks.config_errors() as err:
        log.error("%s: %s", checks.failure_status(err).replace("_", " "), err)
        sys.exit(2)
    log.info("%s", one_line(result))
    return result


if __name__ == "__main__":
    main()

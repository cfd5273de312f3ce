"""Measure forward/backward passes (and Hessian-vector products) per step for every optimizer.

    python scripts/measure_passes.py [--steps 100] [--methods sam ssam_f] [--out passes.md]

Trains the tiny CNN on synthetic data for ``--steps`` steps per method through the same Lightning
module as every run, and prints the counts the module's closure measured (metrics.json's
``passes_per_step`` / ``hvps_per_step``). Extra passes (SSAM-F's Fisher samples, A²SAM/X-SAM's
Hessian loss) are counted too, so the numbers depend on the refresh intervals in conf/optimizer.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from hydra import compose, initialize_config_dir

from sharpbench.train import train

CONF = Path(__file__).resolve().parents[1] / "sharpbench" / "conf"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--methods", nargs="*", default=None, help="config names (default: all)")
    args = ap.parse_args()
    methods = args.methods or sorted(p.stem for p in (CONF / "optimizer").glob("*.yaml"))
    rows = ["| config | passes/step | HVPs/step |", "|---|---|---|"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for name in methods:
            overrides = ["experiment=smoke", f"optimizer={name}", "trainer.max_epochs=1",
                         f"dataset.train_subset={args.steps * args.batch}",
                         f"dataset.batch_size={args.batch}", "dataset.test_subset=128",
                         "trainer.enable_progress_bar=false", "logger=none"]
            if name == "imb_sam":
                overrides.append("dataset.imbalance_factor=10")
            with tempfile.TemporaryDirectory() as tmp:
                r = train(compose("train", overrides=overrides), Path(tmp), overrides)
            hvps = r.get("hvps_per_step")
            rows.append(f"| `{name}` | {r['passes_per_step']:.2f} | {hvps:.2f} |" if hvps is not None
                        else f"| `{name}` | {r['passes_per_step']:.2f} | – |")
            print(rows[-1], flush=True)
    text = "\n".join(rows)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()

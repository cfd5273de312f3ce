"""Measure forward/backward passes, Hessian-vector products and the FLOP-priced cost per step.

    python scripts/measure_passes.py [--steps 200] [--methods sam a2sam] [--out passes.md]
                                     [--set optimizer.interval=100 ...]

Trains the tiny CNN on synthetic data for exactly ``--steps`` steps per method through the same
Lightning module as every run, and prints what metrics.json records: ``passes_per_step`` and
``hvps_per_step`` (counted), ``cost_per_step`` (SGD-step equivalents, each HVP and each Hessian
graph priced by its FLOPs, see ``sharpbench.cost``), and for A²SAM / X-SAM the mean iterations of
their eigen-solves and the host reads per refresh. Extra passes (SSAM-F's Fisher samples,
A²SAM/X-SAM's Hessian loss) are counted too, so the numbers depend on the refresh intervals in
conf/optimizer: choose ``--steps`` as a multiple of them so the refreshes amortise fairly.
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
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--methods", nargs="*", default=None, help="config names (default: all)")
    ap.add_argument("--set", nargs="*", default=[], help="extra overrides, e.g. optimizer.interval=100")
    args = ap.parse_args()
    methods = args.methods or sorted(p.stem for p in (CONF / "optimizer").glob("*.yaml"))
    rows = ["| config | passes/step | HVPs/step | cost/step (FLOPs, SGD = 1) | eigen-solve iterations "
            "(mean) | host reads per refresh |", "|---|---|---|---|---|---|"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for name in methods:
            overrides = ["experiment=smoke", f"optimizer={name}", "trainer.max_epochs=1",
                         f"dataset.num_train={args.steps * args.batch}",
                         f"dataset.train_subset={args.steps * args.batch}",
                         f"dataset.batch_size={args.batch}", "dataset.test_subset=128",
                         "trainer.enable_progress_bar=false", "logger=none"]
            if name == "imb_sam":
                overrides.append("dataset.imbalance_factor=10")
            overrides += args.set  # applied to every method listed: pick --methods that have the keys
            with tempfile.TemporaryDirectory() as tmp:
                r = train(compose("train", overrides=overrides), Path(tmp), overrides)
            if r["status"] != "completed" or r["steps"] != args.steps:
                raise SystemExit(f"{name}: {r['status']} after {r['steps']} steps: {r.get('error')}")

            def cell(key, fmt="{:.2f}"):
                return "–" if r.get(key) is None else fmt.format(r[key])
            rows.append(f"| `{name}` | {cell('passes_per_step')} | {cell('hvps_per_step')} | "
                        f"{cell('cost_per_step')} | {cell('eigen_iterations_mean', '{:.1f}')} | "
                        f"{cell('host_syncs_per_refresh', '{:.1f}')} |")
            print(rows[-1], flush=True)
    text = "\n".join(rows)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()

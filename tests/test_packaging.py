"""The wheel: built offline, installed into a fresh virtual environment, run from another folder."""
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP_LEVEL_SKIP = {".git", ".venv", "outputs", "multirun", "data", "build", "wandb", "lightning_logs"}


def skip(folder, names):
    """What not to copy: run outputs and environments at the top, caches everywhere."""
    top = Path(folder) == ROOT
    return [n for n in names if (top and n in TOP_LEVEL_SKIP) or n in ("__pycache__", ".pytest_cache")
            or n.endswith(".egg-info")]


def run(cmd, cwd, env=None, timeout=300):
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, (cmd, out.stdout[-3000:], out.stderr[-3000:])
    return out


@pytest.mark.slow
def test_wheel_installs_and_runs_from_any_folder(tmp_path):
    # 1. build the wheel offline from a copy of the sources (the checkout stays clean)
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=skip, symlinks=True)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "-w", str(tmp_path / "dist"), str(src)], cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("sharpbench-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    packaged = {n.split("sharpbench/conf/", 1)[1] for n in names if n.startswith("sharpbench/conf/")}
    in_repo = {str(p.relative_to(ROOT / "sharpbench" / "conf"))
               for p in (ROOT / "sharpbench" / "conf").rglob("*") if p.suffix in (".yaml", ".py")}
    assert in_repo <= packaged, in_repo - packaged
    assert any(n.endswith("entry_points.txt") for n in names)

    # 2. a fresh venv with only the wheel installed; the dependencies come from this interpreter's
    #    site-packages through a .pth line (no download; sharpbench itself is the wheel's copy)
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    py = venv / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index",
         str(wheel)], cwd=tmp_path)
    purelib = Path(run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                       cwd=tmp_path).stdout.strip())
    (purelib / "_deps_from_the_test_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = run([str(py), "-c", "import sharpbench; print(sharpbench.__file__)"], elsewhere, env).stdout
    assert where.startswith(str(purelib)), where

    # 3. the console script: help, a smoke run (configs found inside the package), eval
    sharpbench = str(venv / "bin" / "sharpbench")
    assert "eval" in run([sharpbench, "--help"], elsewhere, env).stdout
    out = run([sharpbench, "train", "experiment=smoke", "trainer.max_epochs=1", "dataset.train_subset=256",
               "dataset.test_subset=128", "trainer.enable_progress_bar=false"], elsewhere, env)
    assert "[sharpbench] completed" in out.stdout
    run_dir = next((elsewhere / "outputs" / "runs").iterdir())
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "completed"
    run([sharpbench, "eval", f"ckpt={run_dir}", "progress_bar=false"], elsewhere, env)
    assert (run_dir / "eval.json").is_file()
    # python -m keeps working from the installed package too
    run([str(py), "-m", "sharpbench.train", "--help"], elsewhere, env)

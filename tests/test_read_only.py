"""A read-only run or sweep folder (or a read-only filesystem) ends the command before Hydra
writes anything: a completed run of the same config is skipped (exit 0), anything else is
refused with the way out (exit 2), never a Hydra traceback. A config file edited into invalid
YAML is refused in one paragraph too."""
import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e  # runs sharpbench end to end (make test-quick leaves it out)

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="offline", PYTHONPATH=str(ROOT))
TINY = ["experiment=smoke", "trainer.max_epochs=1", "dataset.train_subset=128",
        "dataset.test_subset=64", "trainer.enable_progress_bar=false"]


def train(*args, cwd):
    code = "import sys; from sharpbench.cli import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, "train", *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=300)


@contextlib.contextmanager
def read_only_view(src: Path, dst: Path):
    """``dst``: ``src`` on a read-only filesystem (a read-only bind mount, which refuses root
    too), or with its write permissions removed where the tests do not run as root."""
    dst.mkdir()
    if os.geteuid() != 0:
        os.rmdir(dst)
        os.rename(src, dst)
        modes = {p: p.stat().st_mode for p in [dst, *dst.rglob("*")]}
        for p in modes:
            p.chmod(modes[p] & ~0o222)
        try:
            yield dst
        finally:
            for p, m in modes.items():
                p.chmod(m)
        return
    bind = subprocess.run(["mount", "--bind", str(src), str(dst)], capture_output=True)
    if bind.returncode != 0:
        pytest.skip(f"cannot make a read-only mount here: {bind.stderr.decode().strip()}")
    try:
        if subprocess.run(["mount", "-o", "remount,ro,bind", str(dst)], capture_output=True).returncode:
            pytest.skip("cannot remount read-only here")
        yield dst
    finally:
        subprocess.run(["umount", str(dst)], capture_output=True)


def test_a_read_only_folder_is_skipped_when_completed_else_refused(tmp_path):
    out = train(*TINY, f"hydra.run.dir={tmp_path / 'src' / 'run'}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    with read_only_view(tmp_path / "src", tmp_path / "ro") as ro:
        before = sorted(p.name for p in (ro / "run").iterdir())
        out = train(*TINY, f"hydra.run.dir={ro / 'run'}", cwd=tmp_path)
        assert out.returncode == 0 and "already completed" in out.stderr, out.stderr[-2000:]
        out = train(*TINY, "seed=3", f"hydra.run.dir={ro / 'run'}", cwd=tmp_path)
        assert out.returncode == 2 and "seed: 0 -> 3" in out.stderr, out.stderr[-2000:]
        for args, key in (([f"hydra.run.dir={ro / 'new'}"], "hydra.run.dir="),
                          (["-m", "seed=0,1", f"hydra.sweep.dir={ro / 'sweep'}"], "hydra.sweep.dir=")):
            out = train(*TINY, *args, cwd=tmp_path)
            text = out.stdout + out.stderr
            assert out.returncode == 2 and "read-only" in text and key in text, text[-2000:]
            assert "Traceback" not in text
        assert sorted(p.name for p in (ro / "run").iterdir()) == before


def test_a_config_file_of_invalid_yaml_is_refused_in_one_paragraph(tmp_path):
    conf = tmp_path / "myconf" / "experiment"
    conf.mkdir(parents=True)
    (conf / "broken.yaml").write_text("# @package _global_\noptimizer:\n  lr: [0.1\n")
    for args in ([f"hydra.run.dir={tmp_path / 'runs' / 'a'}"],
                 ["-m", "seed=0,1", f"hydra.sweep.dir={tmp_path / 'sweep'}"]):
        out = train(f"hydra.searchpath=[file://{tmp_path / 'myconf'}]", "experiment=broken", *args,
                    cwd=tmp_path)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
        assert "broken.yaml is not valid YAML (line 3, column 7" in out.stderr
    assert (tmp_path / "runs" / "refused.jsonl").is_file()
    assert (tmp_path / "sweep" / "refused.jsonl").is_file() and not (tmp_path / "runs" / "a").exists()

"""eval's and analyze's typed configs: --help lists every key with its meaning, a bad value or
key is refused in one paragraph (exit 2) before anything runs, ranges and dict entries checked."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sharpbench import analyze, eval as eval_cmd
from sharpbench.command_configs import AnalyzeConfig, EvalConfig
from sharpbench.typed_config import check_command, problems, rows

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT))


def sharpbench(*args, cwd):
    code = "import sys; from sharpbench.cli import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.e2e
@pytest.mark.parametrize("command,cls", [("eval", EvalConfig), ("analyze", AnalyzeConfig)])
def test_help_lists_every_key_with_its_meaning(command, cls, tmp_path):
    out = sharpbench(command, "--help", cwd=tmp_path)
    assert out.returncode == 0 and not list(tmp_path.iterdir()), out.stderr
    for row in rows(cls):
        assert row.key in out.stdout and row.meaning.split("(")[0].strip() in out.stdout, row
    assert "dataset.format" in out.stdout and "python | folder" in out.stdout


@pytest.mark.parametrize("command,cls,override,expected", [
    ("eval", EvalConfig, "eval_batch_size=abc", "could not be converted to Integer"),
    ("eval", EvalConfig, "eval_batch_size=0", "eval_batch_size=0: accepted >= 1"),
    ("eval", EvalConfig, "accelerator=tpu", "accepted auto | cpu | gpu | cuda"),
    ("eval", EvalConfig, "dataset.rot=/x", "Did you mean dataset.root?"),
    ("analyze", AnalyzeConfig, "eigen.kk=2", "Did you mean eigen.k?"),
    ("analyze", AnalyzeConfig, "density.sigma_rel=0", "accepted > 0"),
    ("analyze", AnalyzeConfig, "eigen.dtype=float16", "accepted float64 | float32"),
    ("analyze", AnalyzeConfig, "+sharpness.measures.x={kind: worst, rh: 1}", "x.rh: not a key"),
    ("analyze", AnalyzeConfig, "+sharpness.measures.x={norm: l3}", "x.norm=l3: accepted l2 | linf"),
])
def test_bad_values_and_keys_are_refused_with_what_they_accept(command, cls, override, expected, tmp_path):
    target = "ckpt=x" if command == "eval" else "run_dir=x"
    message = check_command(command, [target, override], cls, command)
    assert message is not None and expected in message, message
    assert check_command(command, [target], cls, command) is None


@pytest.mark.e2e
@pytest.mark.parametrize("command", ["eval", "analyze"])
def test_a_refused_command_exits_2_without_a_traceback_or_a_folder(command, tmp_path):
    out = sharpbench(command, str(tmp_path), "eigen.k=0" if command == "analyze" else "eval_batch_size=0",
                     cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "accepted >= 1" in out.stderr
    assert not list(tmp_path.iterdir())
    out = sharpbench(command, cwd=tmp_path)  # nothing to work on
    assert out.returncode == 2 and "nothing to work on: give" in out.stderr, out.stderr


def test_typed_defaults_compose_and_one_measure_is_a_list():
    from hydra import compose, initialize_config_dir
    with initialize_config_dir(config_dir=str(ROOT / "sharpbench" / "conf"), version_base="1.3"):
        cfg = compose(config_name="analyze", overrides=analyze.hydra_argv(["runs/x", "what=eigen"]))
        ev = compose(config_name="eval", overrides=["ckpt=x"])
    assert list(cfg.what) == ["eigen"] and cfg.eigen.k == 3 and cfg.sharpness.measures.worst_l2.rho == 0.05
    assert ev.dataset.root is None and ev.accelerator == "auto"
    assert problems(cfg, AnalyzeConfig) == [] and problems(ev, EvalConfig) == []


def test_sharpness_m_larger_than_the_subset_is_refused(tmp_path):
    from hydra import compose, initialize_config_dir
    with initialize_config_dir(config_dir=str(ROOT / "sharpbench" / "conf"), version_base="1.3"):
        cfg = compose(config_name="analyze", overrides=[f"run_dir={tmp_path}", "subset.size=16",
                                                        "what=[sharpness]"])
    with pytest.raises(analyze.AnalyzeError, match="sharpness.m=128 is more than the subset.size=16"):
        analyze.analyze(cfg)

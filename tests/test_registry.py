"""The method registry: one declaration per method, from which every list of methods derives."""
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sharpbench.optim import registry
from sharpbench.optim.registry import MethodInfo, RegistryError

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sharpbench"


def test_every_method_class_is_registered_and_every_entry_has_a_config():
    import sharpbench.optim as optim
    infos = registry.methods()
    classes = {info.cls for info in infos.values() if info.cls is not None}
    public = {getattr(optim, n) for n in optim.__all__ if isinstance(getattr(optim, n), type)
              and issubclass(getattr(optim, n), __import__("torch").optim.Optimizer)}
    assert public - {optim.SharpnessAwareOptimizer, optim.SparseSAM} <= classes
    conf = {p.stem for p in (PACKAGE / "conf" / "optimizer").glob("*.yaml")}
    assert conf == set(infos)
    for name, info in infos.items():
        assert info.label and info.paper and info.passes >= 1, name
        assert re.search(r"(19|20)\d\d|unpublished", info.paper), f"{name}: the citation gives no year"
        if info.cls is not None:
            doc = info.cls.__doc__ or ""
            assert "::" in doc or "<-" in doc or "=" in doc, f"{name}: docstring states no update rule"


def test_every_method_has_a_typed_config_that_its_yaml_composes(compose_cfg):
    """Each built-in method declares a dataclass beside its class; the registry stores it as
    /schema/optimizer/<name>, the method's YAML takes its keys from it, every key has a meaning
    and an accepted range, and the composed node is the dataclass's defaults plus the name."""
    from dataclasses import fields, is_dataclass

    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from sharpbench.optim.step_config import MethodConfig
    from sharpbench.schema import typed_node_of
    from sharpbench.typed_config import defaults
    store = ConfigStore.instance()
    for name, info in registry.methods().items():
        assert is_dataclass(info.config) and issubclass(info.config, MethodConfig), name
        assert store.load(f"schema/optimizer/{name}.yaml") is not None, name
        assert typed_node_of("optimizer", name) == f"optimizer/{name}", name
        for f in fields(info.config):
            assert f.metadata.get("meaning") and f.metadata.get("spec"), (name, f.name)
        node = OmegaConf.to_container(compose_cfg([f"optimizer={name}"]).optimizer)
        assert node == {**defaults(info.config), "name": name}, name


def test_a_typed_method_config_refuses_a_wrong_type_at_compose(compose_cfg):
    from hydra.errors import ConfigCompositionException
    with pytest.raises(ConfigCompositionException):
        compose_cfg(["optimizer=ssam_f", "optimizer.num_samples=many"])
    with pytest.raises(ConfigCompositionException):  # SGD has no radius to set
        compose_cfg(["optimizer=sgd", "optimizer.rho=0.1"])
    cfg = compose_cfg(["optimizer=sam", "optimizer.base=adam", "+optimizer.betas=[0.9,0.99]"])
    assert cfg.optimizer.betas == [0.9, 0.99] and cfg.optimizer.rho == 0.05


def test_every_list_of_methods_derives_from_the_registry():
    from sharpbench import bench, schema
    from sharpbench.optim import METHODS
    names = registry.names()
    assert list(METHODS) == names
    assert schema.OPTIMIZER["name"].choices == names
    assert set(bench.METHODS) == {n for n, i in registry.methods().items() if i.bench}
    assert bench.baseline_of("hatam") == "adamw" and bench.baseline_of("sam") == "sgd"


def test_a_need_no_step_offers_is_refused():
    with pytest.raises(RegistryError, match="no step offers"):
        registry.register(MethodInfo(name="bad_needs", label="x", cls=None, paper="x 2020",
                                     passes=1, needs=("telepathy",)))
    assert "bad_needs" not in registry.methods()


def test_a_name_declared_twice_by_different_classes_is_refused():
    class Other:
        pass
    with pytest.raises(RegistryError, match="declared twice"):
        registry.register(MethodInfo(name="sam", label="SAM", cls=Other, paper="x 2020", passes=2))
    assert registry.method("sam").cls.__name__ == "SAM"


def test_unknown_method_names_the_registered_ones():
    with pytest.raises(RegistryError, match="registered: .*sam"):
        registry.method("no_such_method")


def test_methods_command_prints_the_table(capsys):
    from sharpbench.methods import main
    assert main(["--markdown"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == registry.method_table()
    for info in registry.methods().values():
        assert f"`{info.name}`" in out


def copy_package(dest: Path) -> Path:
    """A copy of the sharpbench package (without caches), importable from ``dest``."""
    shutil.copytree(PACKAGE, dest / "sharpbench",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest / "sharpbench"


def run(args, cwd, extra_env=None, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(cwd), WANDB_MODE="offline", PYTHONUNBUFFERED="1",
               **(extra_env or {}))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


SMOKE = ["experiment=smoke", "trainer.max_epochs=1", "dataset.train_subset=128",
         "dataset.test_subset=64", "trainer.enable_progress_bar=false", "logger=none"]


@pytest.mark.e2e
def test_a_copied_method_file_and_yaml_train_with_no_other_edit(tmp_path):
    """The contract: copy sam.py to a new file with the class and registered name changed, plus a
    copied YAML with the new name; it trains, records its name and appears in the report."""
    pkg = copy_package(tmp_path)
    source = (pkg / "optim" / "sam.py").read_text()
    source = source.replace('register_method("sam", label="SAM"',
                            'register_method("dummy_sam", label="DummySAM"')
    source = source.replace("class SAM(", "class DummySAM(")
    assert 'register_method("dummy_sam"' in source and "class DummySAM(" in source
    (pkg / "optim" / "dummy_sam.py").write_text(source)
    yaml = (pkg / "conf" / "optimizer" / "sam.yaml").read_text().replace("name: sam", "name: dummy_sam")
    (pkg / "conf" / "optimizer" / "dummy_sam.yaml").write_text(yaml)

    out = tmp_path / "sweep" / "dummy"
    res = run(["-m", "sharpbench.train", "optimizer=dummy_sam", *SMOKE, f"hydra.run.dir={out}"],
              cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    record = json.loads((out / "metrics.json").read_text())
    assert record["status"] == "completed" and record["method"] == "dummy_sam"
    assert record["passes_per_step"] == 2.0

    res = run(["-m", "sharpbench.report", str(tmp_path / "sweep"), "--no-curves"], cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    tables = "".join(p.read_text() for p in (tmp_path / "sweep").glob("*.md"))
    assert "DummySAM" in tables

    res = run(["-m", "sharpbench.methods"], cwd=tmp_path)
    assert "dummy_sam" in res.stdout and "DummySAM" in res.stdout


@pytest.mark.e2e
def test_a_method_in_the_users_own_package_is_found(tmp_path):
    """A user's module named in SHARPBENCH_METHODS registers its method; its YAML comes through
    Hydra's search path."""
    pkg = tmp_path / "my_methods"
    (pkg / "conf" / "optimizer").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "conf" / "__init__.py").write_text("")
    (pkg / "half_sam.py").write_text(textwrap.dedent('''
        """SAM at half the radius: a user's method."""
        from sharpbench.optim import SAM, register_method


        @register_method("half_sam", label="HalfSAM", passes=2,
                         paper="A user's variant of Foret et al., ICLR 2021")
        class HalfSAM(SAM):
            """SAM with rho/2: e = (rho/2) g/||g||, then the base step at w with the gradient at w+e."""

            def __init__(self, params, base_optimizer=None, rho=0.05, p=2.0, **kw):
                import torch
                super().__init__(params, base_optimizer or torch.optim.SGD, rho=rho / 2, p=p, **kw)
        '''))
    (pkg / "conf" / "optimizer" / "half_sam.yaml").write_text(
        (PACKAGE / "conf" / "optimizer" / "sam.yaml").read_text().replace("name: sam", "name: half_sam"))
    out = tmp_path / "run"
    env = {"SHARPBENCH_METHODS": "my_methods.half_sam",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    res = subprocess.run([sys.executable, "-m", "sharpbench.train", "optimizer=half_sam", *SMOKE,
                          f"hydra.run.dir={out}", "hydra.searchpath=[pkg://my_methods.conf]"],
                         cwd=tmp_path, env=dict(os.environ, WANDB_MODE="offline", **env),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    record = json.loads((out / "metrics.json").read_text())
    assert record["method"] == "half_sam" and record["status"] == "completed"


def test_an_unimportable_module_in_the_environment_is_a_clear_error(tmp_path):
    res = run(["-c", "from sharpbench.optim import registry; registry.methods()"], cwd=ROOT,
              extra_env={"SHARPBENCH_METHODS": "no_such_module_xyz"})
    assert res.returncode != 0 and "SHARPBENCH_METHODS names 'no_such_module_xyz'" in res.stderr

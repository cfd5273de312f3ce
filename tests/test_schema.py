"""Every bad setting is refused before anything runs: exit code 2, no traceback, a message naming
the key, ``status: invalid_config`` recorded (in refused.jsonl beside the run folders when the
command line itself is refused; in metrics.json when the data shows the problem). The cases run the real entry point
(``sharpbench.train.main``: Hydra composition, the schema, the data checks) in this process;
tests/test_validation.py runs one case per failure family as a subprocess."""
import json
import sys

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from sharpbench import checks, schema
from sharpbench.data import DataConfigError, build_splits

BASE = ["experiment=smoke", "trainer.max_epochs=1", "trainer.enable_progress_bar=false"]


def run_entry_point(tmp_path, monkeypatch, capfd, *overrides):
    """``python -m sharpbench.train <BASE> <overrides>`` in this process, through Hydra's own
    main (two compositions): (exit code, output, record)."""
    from sharpbench import train
    GlobalHydra.instance().clear()
    monkeypatch.setattr(sys, "argv", ["sharpbench.train", *BASE, f"hydra.run.dir={tmp_path}", *overrides])
    code = 0
    try:
        train.main()
    except SystemExit as exit_:
        code = exit_.code
    finally:
        GlobalHydra.instance().clear()
    return code, *_output_and_record(tmp_path, capfd)


def run_task(tmp_path, monkeypatch, capfd, caplog, *overrides):
    """The same with one composition: the entry point's check of the command line, then (if it
    passes) the task function as Hydra's ``run_job`` calls it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict
    from sharpbench import preflight, train
    line = [*BASE, f"hydra.run.dir={tmp_path}", *overrides]
    with initialize_config_dir(config_dir=str(schema.CONF_DIR), version_base="1.3"):
        try:
            preflight.check_command(line, multirun=False)
        except preflight.Refused as err:
            print(err, file=sys.stderr)
            return (2, *_output_and_record(tmp_path, capfd))
        cfg = compose(config_name="train", overrides=line, return_hydra_config=True)
    cfg.hydra.runtime.output_dir = str(tmp_path)
    HydraConfig.instance().set_config(cfg)
    task_cfg = cfg.copy()
    with open_dict(task_cfg):
        del task_cfg["hydra"]
    code = 0
    try:
        train.main.__wrapped__.__wrapped__(task_cfg)   # entry point -> hydra.main -> task function
    except SystemExit as exit_:
        code = exit_.code
    out, record = _output_and_record(tmp_path, capfd)
    return code, out + caplog.text, record   # the log (Hydra's run sends it to the console)


def _output_and_record(tmp_path, capfd):
    """The output, and the run's record: its metrics.json, or the refusal logged beside the run
    folders (``refused.jsonl``) when the command was refused before the run began."""
    captured = capfd.readouterr()
    metrics = tmp_path / "metrics.json"
    record = json.loads(metrics.read_text()) if metrics.exists() else refusal(tmp_path)
    return captured.out + captured.err, record


def refusal(run_dir):
    log = run_dir.parent / "refused.jsonl"
    if not log.exists():
        return None
    for line in reversed(log.read_text().splitlines()):
        entry = json.loads(line)
        if f"hydra.run.dir={run_dir}" in entry["command"]:
            return {"status": entry["status"], "error": entry["jobs"][0]["error"]}
    return None


# (overrides, text the message must contain: the key and what is wrong)
CASES = [
    # were a traceback and exit 1
    (["trainer.max_epochs=abc"], "trainer.max_epochs=abc has the wrong type"),
    (["trainer.max_epochs=1.5"], "trainer.max_epochs=1.5 has the wrong type"),
    (["dataset.batch_size=abc"], "dataset.batch_size=abc has the wrong type"),
    (["seed=abc"], "seed=abc has the wrong type"),
    (["seed=-1"], "seed=-1 is out of range"),
    (["seed=2**40"], "seed=2**40 has the wrong type"),
    (["seed=1099511627776"], "seed=1099511627776 is out of range"),
    (["label_smoothing=2"], "label_smoothing=2 is out of range"),
    (["trainer.accelerator=tpu9"], "trainer.accelerator=tpu9 is not an accepted value"),
    (["trainer.devices=0"], "trainer.devices=0 is out of range"),
    (["trainer.strategy=foo"], "trainer.strategy=foo is not an accepted value"),
    (["trainer.num_nodes=0"], "trainer.num_nodes=0 is out of range"),
    (["trainer.check_val_every_n_epoch=0"], "trainer.check_val_every_n_epoch=0 is out of range"),
    (["trainer.limit_train_batches=1.5"], "trainer.limit_train_batches=1.5 is out of range"),
    (["optimizer=adam", "optimizer.betas=[0.9]"], "optimizer.betas=[0.9] is out of range"),
    (["model=wrn28_10", "model.dropout=2"], "model.dropout=2.0 is out of range"),
    # were Hydra's message, exit 1, no metrics.json
    (["foo=1"], "unknown key foo=1"),
    (["optimizer=sam", "optimizer.rhoo=0.1"], "did you mean optimizer.rho?"),
    (["optimizer.rho=0.1"], "rho is a key of optimizer="),
    (["model=nonexistent"], "group model has no option 'nonexistent'"),
    (["optimizer=nonexistent"], "group optimizer has no option 'nonexistent'"),
    (["optimizer=sma"], "did you mean optimizer=sam?"),
    (["dataset.decode_workers=-1"], "decode_workers is a key of dataset=cifar10, cifar100"),
    (["dataset=cifar10", "dataset.decode_workers=-1"], "dataset.decode_workers=-1 is out of range"),
    (["+seed=3"], "seed already exists, so + cannot add it"),
    (["trainer.max_epochs=[1,"], "not a valid override"),
    # were accepted silently
    (["dataset.imbalance_factor=1e9"], "dataset.imbalance_factor=1e+09 would leave the smallest class with 0"),
    (["dataset.train_subset=100000"], "dataset.train_subset=100000 is larger than the synthetic training set, which has 2048 images"),
    (["dataset.train_subset=5"], "dataset.train_subset=5 is smaller than the number of classes"),
    (["dataset.num_classes=1"], "dataset.num_classes=1 is out of range"),
    (["trainer.gradient_clip_val=-1"], "trainer.gradient_clip_val=-1 is out of range"),
    (["schedule=multistep", "schedule.milestones=[0]", "schedule.gamma=-1"], "schedule.gamma=-1.0 is out of range"),
    (["schedule.gamma=-1"], "gamma is a key of schedule=multistep"),
    (["schedule.min_lr_ratio=-2"], "schedule.min_lr_ratio=-2.0 is out of range"),
    (["trainer.log_every_n_steps=0"], "trainer.log_every_n_steps=0 is out of range"),
    (["trainer.checkpoint_every_n_steps=-1"], "trainer.checkpoint_every_n_steps=-1 is out of range"),
    (["+trainer.max_epoch=5"], "did you mean trainer.max_epochs?"),
    (["++trainer.max_epoch=5"], "did you mean trainer.max_epochs?"),
    (["+dataset.num_train=5", "dataset=cifar10"], "num_train is a key of dataset=synthetic"),
    (["~trainer.max_epochs"], "trainer.max_epochs is missing"),
    (["optimizer=sgd", "optimizer.base=adam"], "optimizer.base=adam with optimizer=sgd"),
    (["dataset.val_split=0.5", "dataset.imbalance_factor=200"], "without a training image"),
    # type errors that did not name the key
    (["optimizer.lr=abc"], "optimizer.lr=abc has the wrong type"),
    (["optimizer.lr=inf"], "optimizer.lr=inf is out of range"),
    (["optimizer=sam", "optimizer.rho=abc"], "optimizer.rho=abc has the wrong type"),
    # already refused before the schema; must stay so
    (["optimizer=sam", "optimizer.rho=0"], "optimizer.rho=0.0 is out of range"),
    (["optimizer=sam", "optimizer.rho=-0.1"], "optimizer.rho=-0.1 is out of range"),
    (["optimizer=sam", "optimizer.p=0.5"], "optimizer.p=0.5 is out of range"),
    (["optimizer=ssam_f", "optimizer.sparsity=1.0"], "optimizer.sparsity=1.0 is out of range"),
    (["optimizer=ssam_d", "optimizer.sparsity=-0.1"], "optimizer.sparsity=-0.1 is out of range"),
    (["optimizer=sam", "optimizer.base=lbfgs"], "optimizer.base=lbfgs is not an accepted value"),
    (["dataset.batch_size=4096"], "dataset.batch_size=4096 is larger than the training set"),
    (["schedule=multistep", "schedule.milestones=[1,5]"], "milestones [1, 5] are not before the last epoch"),
    (["optimizer=a2sam", "optimizer.alpha=-1"], "optimizer.alpha=-1.0 is out of range"),
    (["logger=nonexistent"], "group logger has no option 'nonexistent'"),
]
if not torch.cuda.is_available():
    CASES.append((["trainer=gpu"], "no CUDA GPU is visible"))


@pytest.mark.parametrize("overrides, message", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_setting_is_refused_before_anything_runs(tmp_path, monkeypatch, capfd, caplog, overrides, message):
    code, out, record = run_task(tmp_path, monkeypatch, capfd, caplog, *overrides)
    assert code == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert message in out, out[-3000:]
    assert record is not None and record["status"] == "invalid_config", out[-3000:]
    assert message in record["error"]
    assert "Example:" in record["error"] or "e.g." in record["error"] or "use " in record["error"]
    assert not (tmp_path / "checkpoints").exists()  # nothing trained


def case(first):
    return next(c for c in CASES if c[0][0] == first)


@pytest.mark.parametrize("overrides, message", [case("trainer.max_epochs=abc"), case("foo=1"),
                                                case("model=nonexistent"), case("+trainer.max_epoch=5")],
                         ids=["type", "unknown key", "unknown option", "plus typo"])
def test_through_hydras_own_main(tmp_path, monkeypatch, capfd, overrides, message):
    code, out, record = run_entry_point(tmp_path, monkeypatch, capfd, *overrides)
    assert code == 2 and "Traceback" not in out and message in out, out[-3000:]
    assert record["status"] == "invalid_config" and message in record["error"]


def test_a_good_setting_still_runs(tmp_path, monkeypatch, capfd):
    code, out, record = run_entry_point(tmp_path, monkeypatch, capfd, "dataset.train_subset=128",
                                        "dataset.test_subset=64", "dataset.batch_size=32",
                                        "trainer.limit_train_batches=2")
    assert code == 0 and record["status"] == "completed", out[-3000:]


def test_help_lists_every_groups_keys_with_their_meaning(monkeypatch, capsys):
    from sharpbench import train
    monkeypatch.setattr(sys, "argv", ["sharpbench.train", "optimizer=sam", "--help"])
    train.main()
    out = capsys.readouterr().out
    for name, key in schema.TOP.items():
        assert f"  {name}" in out and key.meaning in out
    for group in schema.GROUPS:
        assert f"\n{group}" in out, group
    sam = schema.accepted_keys("optimizer", {"name": "sam", "base": "sgd"})
    for name in ("rho", "p", "lr", "momentum"):
        assert sam[name].meaning in out and sam[name].spec in out
    for name, key in schema.TRAINER.items():
        assert f"  {name}" in out and key.meaning in out
    assert schema.OPTIMIZER["xsam.alpha"].meaning in out    # other options' keys are listed too
    assert schema.MODEL["dropout"].meaning in out


def test_help_with_a_bad_option_explains_it_and_exits_2(monkeypatch, capsys):
    from sharpbench import train
    monkeypatch.setattr(sys, "argv", ["sharpbench.train", "model=resnet81", "--help"])
    with pytest.raises(SystemExit) as exit_:
        train.main()
    assert exit_.value.code == 2
    assert "did you mean model=resnet18?" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The schema itself


def all_options():
    for group, g in schema.GROUPS.items():
        if g.named:
            for option in schema.group_options(group):
                yield group, option


@pytest.mark.parametrize("group, option", list(all_options()))
def test_every_yaml_key_is_described_and_its_default_accepted(group, option):
    defaults = schema.yaml_defaults(group, option)
    accepted = schema.accepted_keys(group, {**defaults, "name": option})
    for name, value in defaults.items():
        key = schema.GROUPS[group].key(name, option)
        assert key is not None, f"{group}/{option}.yaml sets {name}: add a line for it to sharpbench/schema.py"
        assert name in accepted, f"{group}={option} does not accept {name}, which its YAML sets"
        if not (isinstance(value, str) and "${" in value):
            assert key.problem(value) is None, f"{group}/{option}.yaml: {name}={value} not accepted by {key.spec!r}"


def test_every_trainer_and_top_level_default_is_accepted():
    for option in schema.group_options("trainer"):
        for name, value in schema.yaml_defaults("trainer", option).items():
            assert name in schema.TRAINER, f"trainer/{option}.yaml sets {name}: describe it in schema.TRAINER"
            assert schema.TRAINER[name].problem(value) is None, (option, name, value)
    train_yaml = schema.yaml_defaults("", None) or schema._yaml("", "train")
    for name, value in train_yaml.items():
        if name in schema.GROUPS or name in schema.FOREIGN:
            continue
        assert name in schema.TOP, f"train.yaml sets {name}: describe it in schema.TOP"


def test_every_parameter_of_the_projects_constructors_is_described():
    """Optimizer and model keys come from the constructors; their meanings from the tables."""
    from sharpbench.models import MODELS
    from sharpbench.optim import METHODS
    for method, cls in METHODS.items():
        if cls is None:
            continue
        for name in set(schema._parameters(cls)) - set(schema.SUPPLIED_BY_DRIVER):
            assert schema.GROUPS["optimizer"].key(name, method) is not None, \
                f"{cls.__name__}({name}=...): describe it in schema.OPTIMIZER"
    for model, fn in MODELS.items():
        for name in schema._parameters(fn, ("num_classes",)):
            assert name in schema.MODEL, f"{model}({name}=...): describe it in schema.MODEL"


def test_a_new_constructor_parameter_is_accepted_without_editing_the_schema(monkeypatch):
    from sharpbench.optim import SAM
    original = SAM.__init__

    def with_new_switch(self, params, base_optimizer=torch.optim.SGD, rho=0.05, p=2.0,
                        new_switch: bool = False, **kw):
        original(self, params, base_optimizer, rho=rho, p=p, **kw)
    monkeypatch.setattr(SAM, "__init__", with_new_switch)
    schema.constructor_of.cache_clear()
    try:
        keys = schema.accepted_keys("optimizer", {"name": "sam", "base": "sgd"})
        assert "new_switch" in keys and keys["new_switch"].problem(True) is None
        assert keys["new_switch"].problem("yes") == "type"
    finally:
        schema.constructor_of.cache_clear()


@pytest.mark.parametrize("group, option", list(all_options()) + [("trainer", o) for o in schema.group_options("trainer")]
                         + [("experiment", o) for o in schema.group_options("experiment")])
def test_every_option_composes_and_passes_the_schema(compose_cfg, group, option):
    cfg = compose_cfg([f"{group}={option}"])
    assert checks.schema_problems(cfg) == []


@pytest.mark.parametrize("experiment", ["table1", "table1_full", "rho_sweep"])
def test_every_optimizer_a_sweep_selects_passes_the_schema(compose_cfg, experiment):
    cfg = compose_cfg([f"experiment={experiment}"])
    from sharpbench import grid
    for method in grid.values("optimizer", cfg.hydra.sweeper.params.optimizer):
        assert checks.schema_problems(compose_cfg([f"experiment={experiment}", f"optimizer={method}"])) == [], method


@pytest.mark.parametrize("spec, good, bad", [
    ("int >= 1", [1, 80], [0, 1.5, "1", True, None]),
    ("float in [0, 1)", [0, 0.5], [1, 1.0, -0.1, float("nan"), "x"]),
    ("float > 0", [1e-8, 1e30], [0, float("inf"), float("nan")]),
    ("null | int >= 0 | float in [0, 1)", [None, 0, 5000, 0.1], [-1, 1.5, "a"]),
    ("auto | 32 | bf16-mixed", ["auto", 32, "32", "bf16-mixed"], ["16", 16, None, True]),
    ("list[float in [0, 1)] of 2", [[0.9, 0.999], (0.5, 0)], [[0.9], [0.9, 1.0], "ab"]),
    ("int >= 1 | -1 | auto | list[int >= 0]", [1, -1, "auto", [0, 1]], [0, -2, [-1], "all"]),
    ("float >= 1 | inf", [1, 2.5, "inf"], [0.5, "infinity"]),
])
def test_the_value_language(spec, good, bad):
    key = schema.Key(spec, "test")
    for value in good:
        assert key.problem(value) is None, (spec, value)
    for value in bad:
        assert key.problem(value) is not None, (spec, value)


def test_an_unset_key_of_another_method_is_allowed_only_as_null(compose_cfg):
    cfg = compose_cfg(["experiment=table1_full", "optimizer=sgd"])
    assert "rho" not in cfg.optimizer and checks.schema_problems(cfg) == []
    assert checks.schema_problems(compose_cfg(["optimizer=sgd", "+optimizer.rho=null"])) == []
    problems = checks.schema_problems(compose_cfg(["optimizer=sgd", "+optimizer.rho=0.1"]))
    assert len(problems) == 1 and "rho is a key of optimizer=" in problems[0]


def test_an_interpolation_that_cannot_resolve_names_its_key(compose_cfg):
    cfg = compose_cfg(["dataset.root=${oc.env:SHARPBENCH_NO_SUCH_VARIABLE}"])
    with pytest.raises(checks.ConfigError, match=r"dataset\.root=\$\{oc\.env:SHARPBENCH_NO_SUCH_VARIABLE\}"):
        checks.check_config(cfg)


# ---------------------------------------------------------------------------------------------
# Data sanity, in the data layer


SYNTH = dict(name="synthetic", num_train=500, num_test=100, num_classes=10, seed=0)


def test_subset_larger_than_the_data_names_both_sizes():
    with pytest.raises(DataConfigError, match=r"train_subset=600 is larger than the synthetic training set, which has 500 images"):
        build_splits(**SYNTH, train_subset=600)
    with pytest.raises(DataConfigError, match=r"after the validation split, which has 400 images"):
        build_splits(**SYNTH, val_split=100, train_subset=450)
    with pytest.raises(DataConfigError, match=r"test_subset=101 is larger than the synthetic test set, which has 100"):
        build_splits(**SYNTH, test_subset=101)
    assert len(build_splits(**SYNTH, train_subset=500).train_y) == 500  # all of it is fine


def test_long_tail_that_empties_a_class_names_the_smallest_class_size():
    with pytest.raises(DataConfigError, match=r"smallest class with 0 training images \(50/1e\+09"):
        build_splits(**SYNTH, imbalance_factor=1e9)
    splits = build_splits(**SYNTH, imbalance_factor=50)  # 50 -> 1 image: every class kept
    assert int(splits.train_class_counts.min()) == 1


def test_every_class_must_be_in_the_training_set():
    with pytest.raises(DataConfigError, match=r"train_subset=60 leaves \d+ of 10 classes without a training image"):
        build_splits(**SYNTH, imbalance_factor=40, train_subset=60)
    counts = build_splits(**SYNTH, train_subset=10).train_class_counts
    assert counts.tolist() == [1] * 10


def test_a_node_train_yaml_adds_is_checked_before_the_schema_describes_it(compose_cfg, monkeypatch):
    """Parallel work adds keys to the YAML files first: they run (typed by their defaults), and a
    typo in them is still refused."""
    from omegaconf import open_dict
    original = schema._yaml

    def with_probe(group, option):
        out = dict(original(group, option))
        if group == "":
            out["probe"] = {"every_n_epochs": 0, "subset": 512}
        return out
    monkeypatch.setattr(schema, "_yaml", with_probe)
    cfg = compose_cfg([])
    with open_dict(cfg):
        cfg.probe = {"every_n_epochs": 2, "subset": 512}
    assert checks.schema_problems(cfg) == []
    cfg.probe.every_n_epochs = "often"
    assert "probe.every_n_epochs=often has the wrong type" in checks.schema_problems(cfg)[0]
    with open_dict(cfg):
        cfg.probe = {"every_n_epoch": 2}
    assert "did you mean probe.every_n_epochs?" in checks.schema_problems(cfg)[0]

"""eval and analyze find the data of a run trained on image folders: the run records where its
data came from (beside its identity), and both commands take ``dataset.root``/``dataset.format``
for data that moved."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sharpbench.data_location import candidate_roots, data_source, dataset_for_evaluation
from sharpbench.record import RECORD_VERSION
from sharpbench.run_identity import identity_hash, strip
from cifar_fixtures import write_image_folder

pytestmark = pytest.mark.e2e  # runs sharpbench end to end (make test-quick leaves it out)

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="offline", PYTHONPATH=str(ROOT))
ENV.pop("SHARPBENCH_DATA", None)
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
ANALYZE = ["what=eigen,landscape", "subset.size=32", "subset.batch_size=32", "eigen.k=1",
           "eigen.num_iters=3", "eigen.angle=false", "landscape.grid=3", "progress=false"]


def sharpbench(*args, cwd, env=ENV, timeout=300):
    code = "import sys; from sharpbench.cli import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def ok(out):
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def folder_sweep(tmp_path_factory):
    """A one-job sweep on a CIFAR-10 image-folder tree, launched from another folder."""
    base = tmp_path_factory.mktemp("folder_run")
    tree = base / "cifar10-images"
    write_image_folder(tree, CLASSES, {"train": 8, "test": 4})
    cwd = base / "launched_here"
    cwd.mkdir()
    ok(sharpbench("train", "-m", "experiment=smoke", "dataset=cifar10", "dataset.format=folder",
                  "dataset.root=../cifar10-images", "dataset.train_subset=null",
                  "dataset.test_subset=null", "dataset.batch_size=16", "trainer.max_epochs=1",
                  "trainer.enable_progress_bar=false", "seed=0", f"hydra.sweep.dir={base / 'sweep'}",
                  cwd=cwd))
    (job,) = [p.parent for p in (base / "sweep").rglob("metrics.json")]
    return base, tree, job


def test_the_record_keeps_where_the_data_came_from_beside_the_identity(folder_sweep):
    base, tree, job = folder_sweep
    record = json.loads((job / "metrics.json").read_text())
    assert record["status"] == "completed" and record["record_version"] == RECORD_VERSION
    assert record["data_source"]["root"] == str(tree.resolve())  # absolute: eval runs anywhere
    assert record["data_source"]["format"] == "folder"
    assert "root" not in record["config"]["dataset"] and "format" not in record["config"]["dataset"]
    import torch
    hparams = torch.load(job / "checkpoints" / "last.ckpt", map_location="cpu",
                         weights_only=False)["hyper_parameters"]
    assert hparams["data_source"] == record["data_source"]


def test_eval_and_analyze_a_folder_format_sweep_job_given_as_a_path(folder_sweep, tmp_path):
    base, tree, job = folder_sweep
    record = json.loads((job / "metrics.json").read_text())
    out = ok(sharpbench("eval", str(job), "progress_bar=false", cwd=tmp_path))
    result = json.loads((job / "eval.json").read_text())
    assert result["test_acc"] == pytest.approx(record["test_acc"])
    assert result["test_images"] == 40
    assert result["data_source"] == {"root": str(tree.resolve()), "format": "folder"}
    assert "Traceback" not in out.stdout + out.stderr
    ok(sharpbench("analyze", str(job), *ANALYZE, cwd=tmp_path))
    measured = json.loads((job / "sharpness.json").read_text())
    assert measured["eigen"]["eigenvalues"] and (job / "sharpness" / "landscape.npz").is_file()


def test_data_that_moved_is_refused_with_the_way_out_then_found_by_dataset_root(folder_sweep, tmp_path):
    base, tree, job = folder_sweep
    moved = tmp_path / "moved"
    shutil.copytree(tree, moved)
    shutil.move(str(tree), str(base / "elsewhere"))
    try:
        for command in (["eval", str(job), "progress_bar=false"], ["analyze", str(job), *ANALYZE]):
            out = sharpbench(*command, cwd=tmp_path)
            text = out.stdout + out.stderr
            assert out.returncode == 2 and "Traceback" not in text, text[-3000:]
            assert "dataset.root=" in text and str(tree.resolve()) in text
        record = json.loads((job / "metrics.json").read_text())
        ok(sharpbench("eval", str(job), f"dataset.root={moved}", "progress_bar=false", "out=e.json",
                      cwd=tmp_path))
        assert json.loads((tmp_path / "e.json").read_text())["test_acc"] == pytest.approx(record["test_acc"])
        ok(sharpbench("analyze", str(job), f"dataset.root={moved}", *ANALYZE, cwd=tmp_path))
    finally:
        shutil.move(str(base / "elsewhere"), str(tree))


def test_a_run_recorded_without_its_source_is_looked_for_in_sharpbench_data(folder_sweep, tmp_path):
    """Records of older versions have no data_source: $SHARPBENCH_DATA, then data/, with the
    format given on the command line."""
    base, tree, job = folder_sweep
    old = tmp_path / "old_job"
    shutil.copytree(job, old)
    record = json.loads((old / "metrics.json").read_text())
    record.pop("data_source")
    (old / "metrics.json").write_text(json.dumps(record))
    import torch
    ckpt = torch.load(old / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    ckpt["hyper_parameters"].pop("data_source")
    torch.save(ckpt, old / "checkpoints" / "last.ckpt")
    env = dict(ENV, SHARPBENCH_DATA=str(tree))
    ok(sharpbench("eval", str(old), "dataset.format=folder", "progress_bar=false", cwd=tmp_path, env=env))
    assert json.loads((old / "eval.json").read_text())["test_acc"] == pytest.approx(record["test_acc"])


def test_dataset_for_evaluation_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("SHARPBENCH_DATA", raising=False)
    recorded = tmp_path / "recorded"
    recorded.mkdir()
    ident = {"name": "cifar10", "batch_size": 16}
    source = data_source({"root": str(recorded), "format": "folder", "download": True})
    assert source == {"root": str(recorded.resolve()), "format": "folder", "download": True}
    got = dataset_for_evaluation(ident, source)
    assert got["root"] == str(recorded.resolve()) and got["format"] == "folder"
    assert got["download"] is False  # evaluation never downloads
    got = dataset_for_evaluation(ident, source, root=str(tmp_path / "x"), format="python")
    assert got["root"] == str((tmp_path / "x").resolve()) and got["format"] == "python"
    env_root = tmp_path / "env"
    env_root.mkdir()
    monkeypatch.setenv("SHARPBENCH_DATA", str(env_root))
    assert candidate_roots(None)[0] == str(env_root.resolve())
    assert dataset_for_evaluation(ident, None)["root"] == str(env_root.resolve())
    shutil.rmtree(recorded)  # the recorded root is gone: the environment's is used
    assert dataset_for_evaluation(ident, source)["root"] == str(env_root.resolve())
    assert "root" not in dataset_for_evaluation({"name": "synthetic"}, None)


def test_where_the_data_lie_does_not_change_the_identity():
    a = {"dataset": {"name": "cifar10", "root": "/a", "format": "python"}, "seed": 0}
    b = {"dataset": {"name": "cifar10", "root": "/b", "format": "folder"}, "seed": 0}
    assert identity_hash(a) == identity_hash(b) and "root" not in strip(a)["dataset"]

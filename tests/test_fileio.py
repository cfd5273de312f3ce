"""The one atomic writer (sharpbench.fileio): all or nothing, the usual file mode, and no
temporary file left behind for good by a killed write."""
import os
import stat
import time

import pytest
import torch

from sharpbench import fileio


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_write_replaces_the_file_whole_with_open_s_mode(tmp_path):
    old = os.umask(0o022)
    try:
        path = tmp_path / "a.json"
        fileio.atomic_write_json(path, {"b": 1, "a": [1, 2]})
        assert path.read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'
        assert mode(path) == 0o644
        fileio.atomic_write_bytes(path, b"x")
        assert path.read_bytes() == b"x" and mode(path) == 0o644
        ckpt = tmp_path / "last.ckpt"
        fileio.atomic_torch_save({"w": torch.ones(2)}, ckpt, fsync=True)
        fileio.atomic_torch_save({"w": torch.zeros(2)}, ckpt, previous=tmp_path / "last.prev.ckpt")
        assert torch.load(tmp_path / "last.prev.ckpt")["w"].sum() == 2
        assert torch.load(ckpt)["w"].sum() == 0 and mode(ckpt) == 0o644
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "last.ckpt", "last.prev.ckpt"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "table.md"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with fileio.atomic_file(path, "w") as f:
            f.write("half")
            raise RuntimeError("killed")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["table.md"]


def test_temporaries_of_killed_writes_are_removed_by_the_next_writer(tmp_path):
    stale = tmp_path / ".runs.csv.k3j_x9ab.tmp"    # what a kill -9 during atomic_file leaves
    fresh = tmp_path / ".table.md.a1b2c3d4.tmp"   # another process writing right now
    unrelated = [tmp_path / "notes.tmp", tmp_path / ".hidden", tmp_path / "runs.csv"]
    for p in (stale, fresh, *unrelated):
        p.write_text("x")
    hour_ago = time.time() - 3600
    os.utime(stale, (hour_ago, hour_ago))
    assert fileio.remove_stale_temporaries(tmp_path, min_age_s=600) == [stale]
    assert fresh.exists() and all(p.exists() for p in unrelated)
    assert fileio.remove_stale_temporaries(tmp_path) == [fresh]  # a folder no one else writes


def test_a_report_removes_what_a_killed_report_left(tmp_path):
    from sharpbench import report
    out = tmp_path / "sweep"
    out.mkdir()
    stale = out / ".sweep.md.zz81qk3u.tmp"
    stale.write_text("half a table")
    hour_ago = time.time() - 3600
    os.utime(stale, (hour_ago, hour_ago))
    df = report.runs_frame([{"status": "completed", "method": "sgd", "dataset": "cifar10",
                             "seed": 0, "test_acc": 90.0, "run_dir": str(out / "job")}])
    report.write_outputs(df, out, curves=False)
    assert not stale.exists() and (out / "sweep.md").exists()
    assert not list(out.glob(".*.tmp"))

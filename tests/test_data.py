"""Tests of the data layer: sources, caching, modifications, DeviceLoader and the data module."""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tempfile
import time
import urllib.error
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import sharpbench.data as data
from sharpbench.data import (
    CIFARDataModule,
    DataConfig,
    DataConfigError,
    DatasetUnavailableError,
    DeviceLoader,
    add_label_noise,
    build_splits,
    class_groups,
    load_raw,
    long_tail_counts,
    long_tail_indices,
    make_loaders,
    split_validation,
    stratified_subset,
)
from sharpbench.data import cifar_python, image_folder
from sharpbench.data.augment import crop_flip

try:
    from cifar_fixtures import CIFAR10_CLASSES, write_cifar_python, write_image_folder
except ImportError:  # tests/ imported as a package
    from tests.cifar_fixtures import CIFAR10_CLASSES, write_cifar_python, write_image_folder

# A CIFAR-10 copy stored as train/<class>/*.jpg and test/<class>/*.jpg in a .tar.xz, for the slow
# real-data test: SHARPBENCH_CIFAR10_JPEG=/path/to/cifar10-jpeg.tar.xz make test-slow
JPEG_ARCHIVE = Path(os.environ.get("SHARPBENCH_CIFAR10_JPEG", "cifar10-jpeg.tar.xz"))


# ----------------------------------------------------------------------------- python archives
@pytest.mark.parametrize("name, n_train, n_test", [("cifar10", 23, 7), ("cifar100", 30, 9)])
def test_python_archive_round_trip(tmp_path, name, n_train, n_test):
    written = write_cifar_python(tmp_path, name, n_train, n_test, seed=1)
    raw = load_raw(name, tmp_path, format="python")
    assert raw.train_x.shape == (n_train, 3, 32, 32) and raw.train_x.dtype == torch.uint8
    assert raw.test_x.shape == (n_test, 3, 32, 32) and raw.test_y.dtype == torch.int64
    assert torch.equal(raw.train_x, torch.from_numpy(written["train_x"]))
    assert torch.equal(raw.test_x, torch.from_numpy(written["test_x"]))
    assert raw.train_y.tolist() == written["train_y"].tolist()
    assert raw.test_y.tolist() == written["test_y"].tolist()
    assert raw.class_names == written["class_names"]
    assert raw.num_classes == (10 if name == "cifar10" else 100)


def test_python_archive_channel_layout(tmp_path):
    """Row layout is channel-major: the first 1024 values are the red plane, row by row."""
    written = write_cifar_python(tmp_path, "cifar10", 5, 2)
    row = written["train_x"][0].reshape(-1)
    raw = load_raw("cifar10", tmp_path, cache=False)
    assert raw.train_x[0, 0, 0, 5] == row[5]  # red, row 0, column 5
    assert raw.train_x[0, 1, 2, 3] == row[1024 + 2 * 32 + 3]  # green, row 2, column 3


def test_python_archive_is_cached_and_reused(tmp_path, monkeypatch):
    write_cifar_python(tmp_path, "cifar10", 10, 4)
    first = load_raw("cifar10", tmp_path)
    cache = tmp_path / ".sharpbench_cache"
    assert sorted(p.name for p in cache.iterdir()) == ["cifar10-python-test.pt", "cifar10-python-train.pt"]

    def no_reading(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(cifar_python, "read_batches", no_reading)
    second = load_raw("cifar10", tmp_path)
    assert torch.equal(first.train_x, second.train_x) and first.class_names == second.class_names


def test_corrupt_archive_gives_clear_error(tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not really a tarball")
    with pytest.raises(DatasetUnavailableError, match=r"(?i)corrupt archive.*delete it and re-download"):
        load_raw("cifar10", tmp_path, download=False)


def test_missing_dataset_names_paths_and_fixes(tmp_path):
    with pytest.raises(DatasetUnavailableError) as err:
        load_raw("cifar100", tmp_path, download=False)
    msg = str(err.value)
    assert str(tmp_path / "cifar-100-python") in msg and str(tmp_path / "cifar-100-python.tar.gz") in msg
    assert "dataset.root" in msg and "dataset.download=true" in msg and "dataset.format=folder" in msg


def test_offline_download_says_how_to_place_files(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(cifar_python.tv_utils, "download_and_extract_archive", offline)
    with pytest.raises(DatasetUnavailableError) as err:
        load_raw("cifar10", tmp_path, download=True)
    msg = str(err.value)
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in msg and "could not reach" in msg
    assert "dataset.download=false" in msg and f"dataset.root={tmp_path}" in msg


def test_download_uses_official_url_and_md5(tmp_path, monkeypatch):
    calls = []

    def fake_download(url, download_root, filename=None, md5=None, **kwargs):
        calls.append((url, filename, md5))
        write_cifar_python(Path(download_root), "cifar10", 5, 2)

    monkeypatch.setattr(cifar_python.tv_utils, "download_and_extract_archive", fake_download)
    raw = load_raw("cifar10", tmp_path, download=True)
    assert len(raw.train_y) == 5
    assert calls == [(
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a",
    )]


def test_intact_archive_is_extracted(tmp_path, monkeypatch):
    src = tmp_path / "src"
    written = write_cifar_python(src, "cifar100", 6, 3)
    archive = tmp_path / "data" / "cifar-100-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(written["folder"], arcname="cifar-100-python")
    md5 = cifar_python.tv_utils.calculate_md5(str(archive))
    monkeypatch.setitem(cifar_python.ARCHIVES, "cifar100", replace(cifar_python.ARCHIVES["cifar100"], md5=md5))
    raw = load_raw("cifar100", archive.parent, download=False)
    assert torch.equal(raw.train_x, torch.from_numpy(written["train_x"]))


# ----------------------------------------------------------------------------- image folders
def test_image_folder_labels_pixels_and_cache(tmp_path, monkeypatch):
    shuffled_names = list(reversed(CIFAR10_CLASSES))  # creation order must not matter
    written = write_image_folder(tmp_path, shuffled_names, {"train": 3, "test": 2}, jpeg_every=3)
    raw = load_raw("cifar10", tmp_path, format="folder", decode_workers=1)
    assert raw.class_names == sorted(CIFAR10_CLASSES)
    for split, x, y in (("train", raw.train_x, raw.train_y), ("test", raw.test_x, raw.test_y)):
        ref_x, ref_y, is_png = written[split]
        assert x.shape == (len(ref_y), 3, 32, 32) and x.dtype == torch.uint8
        assert y.tolist() == ref_y.tolist()
        png = torch.from_numpy(is_png)
        assert torch.equal(x[png], torch.from_numpy(ref_x)[png])  # PNG is lossless
    # JPEG images come back exactly as Pillow decodes them
    jpg = tmp_path / "train" / "airplane" / "0002.jpg"
    expected = np.asarray(Image.open(jpg).convert("RGB")).transpose(2, 0, 1)
    assert torch.equal(raw.train_x[2], torch.from_numpy(expected.copy()))

    cache = tmp_path / ".sharpbench_cache"
    assert (cache / "cifar10-folder-train.pt").is_file() and (cache / "cifar10-folder-test.pt").is_file()

    def no_decoding(path):
        raise AssertionError("decoded although the cache is valid")

    monkeypatch.setattr(image_folder, "decode_image", no_decoding)
    again = load_raw("cifar10", tmp_path, format="folder", decode_workers=1)
    assert torch.equal(again.train_x, raw.train_x) and torch.equal(again.test_y, raw.test_y)

    # adding an image invalidates the cache: the split is decoded again
    monkeypatch.undo()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(tmp_path / "train" / "truck" / "9999.png")
    grown = load_raw("cifar10", tmp_path, format="folder", decode_workers=1)
    assert len(grown.train_y) == len(raw.train_y) + 1
    assert grown.train_x[-1, :, 0, 0].tolist() == [1, 2, 3] and grown.train_y[-1] == 9


def test_image_folder_rejects_wrong_size(tmp_path):
    write_image_folder(tmp_path, CIFAR10_CLASSES, {"train": 1, "test": 1})
    Image.new("RGB", (40, 40)).save(tmp_path / "train" / "cat" / "big.png")
    with pytest.raises(DataConfigError, match=r"40x40.*32x32"):
        load_raw("cifar10", tmp_path, format="folder", cache=False, decode_workers=1)


def test_image_folder_rejects_undecodable_file(tmp_path):
    write_image_folder(tmp_path, CIFAR10_CLASSES, {"train": 1, "test": 1})
    (tmp_path / "test" / "dog" / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(DataConfigError, match=r"Could not decode the image .*broken\.jpg"):
        load_raw("cifar10", tmp_path, format="folder", cache=False, decode_workers=1)


def test_process_pool_decoding_matches_serial(tmp_path, monkeypatch):
    written = write_image_folder(tmp_path, ["a", "b"], {"train": 6})
    paths = sorted((tmp_path / "train").glob("*/*.png"))
    monkeypatch.setattr(image_folder, "POOL_MIN_IMAGES", 0)
    pooled = image_folder.decode_images(paths, workers=2)
    assert torch.equal(pooled, torch.from_numpy(written["train"][0]))


def test_image_folder_missing_names_path(tmp_path):
    with pytest.raises(DatasetUnavailableError, match=str(tmp_path / "train")):
        load_raw("cifar10", tmp_path, format="folder")


def test_read_only_cache_dir_only_warns(tmp_path):
    write_image_folder(tmp_path, CIFAR10_CLASSES, {"train": 1, "test": 1})
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the cache folder should go")
    with pytest.warns(UserWarning, match="Could not write the data cache"):
        raw = load_raw("cifar10", tmp_path, format="folder", cache_dir=blocker, decode_workers=1)
    assert len(raw.train_y) == 10


# ----------------------------------------------------------------------------- synthetic
def test_synthetic_is_deterministic_and_shaped():
    a = load_raw("synthetic", num_train=64, num_test=32, num_classes=4, seed=3)
    b = load_raw("synthetic", num_train=64, num_test=32, num_classes=4, seed=3)
    c = load_raw("synthetic", num_train=64, num_test=32, num_classes=4, seed=4)
    assert a.train_x.shape == (64, 3, 32, 32) and a.train_x.dtype == torch.uint8
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(a.train_x, c.train_x)
    assert torch.bincount(a.train_y).tolist() == [16] * 4
    assert a.class_names == ["class_0", "class_1", "class_2", "class_3"]


def test_synthetic_is_learnable_by_a_tiny_cnn():
    torch.manual_seed(0)
    splits = build_splits(name="synthetic", num_train=512, num_test=256, seed=0)
    train = make_loaders(splits, DataConfig(name="synthetic", batch_size=32))["train"]
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(4),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(32, 10),
    )
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    losses = []
    for _ in range(2):
        for x, y in train:
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert np.mean(losses[-4:]) < 0.8 * np.mean(losses[:2])


# ----------------------------------------------------------------------------- modifications
def test_long_tail_profile_cifar10_lt_100():
    counts = long_tail_counts(5000, 10, 100)
    assert counts == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert counts == [int(5000 * (1 / 100) ** (i / 9)) for i in range(10)]
    assert sum(long_tail_counts(500, 100, 100)) == 10847  # CIFAR-100-LT, factor 100


def test_long_tail_indices_on_balanced_labels():
    y = torch.arange(50_000) % 10
    keep, counts = long_tail_indices(y, 10, 100, seed=0)
    assert counts.tolist() == long_tail_counts(5000, 10, 100)
    assert torch.equal(torch.bincount(y[keep], minlength=10), counts)
    assert len(keep.unique()) == len(keep)
    again, _ = long_tail_indices(y, 10, 100, seed=0)
    assert torch.equal(keep, again)
    with pytest.raises(DataConfigError, match="imbalance_factor"):
        long_tail_counts(5000, 10, 0.5)


def test_class_groups_thresholds():
    groups = class_groups([5000, 101, 100, 20, 19, 1])
    assert groups["many"].tolist() == [0, 1]
    assert groups["medium"].tolist() == [2, 3]
    assert groups["few"].tolist() == [4, 5]
    lt = class_groups(long_tail_counts(500, 100, 100))
    assert sum(len(v) for v in lt.values()) == 100 and all(v.dtype == torch.int64 for v in lt.values())


@pytest.mark.parametrize("rate, n", [(0.37, 1000), (0.2, 333), (0.25, 10)])
def test_label_noise_flips_exactly_round_rn_to_other_classes(rate, n):
    y = torch.arange(n) % 7
    noisy, mask = add_label_noise(y, 7, rate, seed=5)
    assert int(mask.sum()) == round(rate * n) == int((noisy != y).sum())
    assert torch.equal(mask, noisy != y)  # every picked label changed, nothing else did
    assert int(noisy.min()) >= 0 and int(noisy.max()) < 7
    again, _ = add_label_noise(y, 7, rate, seed=5)
    other, _ = add_label_noise(y, 7, rate, seed=6)
    assert torch.equal(noisy, again) and not torch.equal(noisy, other)


def test_label_noise_rate_must_be_below_one():
    with pytest.raises(DataConfigError, match=r"label_noise=1.0 must be in \[0, 1\)"):
        add_label_noise(torch.zeros(5, dtype=torch.int64), 2, 1.0, seed=0)


def test_validation_split_fraction_and_count():
    tr, va = split_validation(100, 0.1, seed=0)
    assert len(va) == 10 and len(tr) == 90
    assert sorted(torch.cat([tr, va]).tolist()) == list(range(100))
    tr2, va2 = split_validation(100, 25, seed=0)
    assert len(va2) == 25 and torch.equal(split_validation(100, 25, seed=0)[1], va2)
    with pytest.raises(DataConfigError, match="val_split=100"):
        split_validation(100, 100, seed=0)


def test_stratified_subset_keeps_class_profile():
    y = torch.cat([torch.zeros(600), torch.ones(300), torch.full((100,), 2)]).long()
    keep = stratified_subset(y, 3, 100, seed=0)
    assert torch.bincount(y[keep]).tolist() == [60, 30, 10]
    assert len(keep.unique()) == 100


def test_build_splits_order_of_operations():
    cfg = dict(name="synthetic", num_train=2000, num_test=300, num_classes=10, seed=1)
    splits = build_splits(**cfg, imbalance_factor=10, val_split=0.1, train_subset=500, label_noise=0.2)
    pool = sum(long_tail_counts(200, 10, 10))  # after the long tail
    assert len(splits.val_y) == round(0.1 * pool)  # validation taken before the subset
    assert len(splits.train_y) == 500
    assert int(splits.train_noise_mask.sum()) == round(0.2 * 500)
    assert int((splits.train_y != splits.train_y_clean).sum()) == 100
    assert splits.train_class_counts.tolist() == torch.bincount(splits.train_y_clean, minlength=10).tolist()
    assert splits.train_class_counts[0] > 5 * splits.train_class_counts[9]
    assert len(splits.test_y) == 300 and torch.bincount(splits.test_y).tolist() == [30] * 10
    # validation labels are clean: the same split without noise gives identical validation data
    clean = build_splits(**cfg, imbalance_factor=10, val_split=0.1, train_subset=500)
    assert torch.equal(clean.val_y, splits.val_y) and torch.equal(clean.train_y, splits.train_y_clean)


@pytest.mark.parametrize(
    "settings, pattern",
    [
        (dict(name="imagenet"), "Unknown dataset.name='imagenet'"),
        (dict(format="lmdb"), "Unknown dataset.format='lmdb'"),
        (dict(imbalance_factor=0.5), "imbalance_factor=0.5 must be >= 1"),
        (dict(label_noise=1.0), "label_noise=1.0 must be in"),
        (dict(val_split=1.5), "val_split=1.5"),
        (dict(batch_sise=32), "Unknown data setting.*batch_sise"),
        (dict(name="cifar100", num_classes=10), "num_classes=10 does not match cifar100"),
        (dict(train_subset=0), "train_subset=0 must be at least 1"),
        (dict(root=None), "dataset.root is null"),
    ],
)
def test_bad_settings_say_what_to_change(settings, pattern):
    with pytest.raises(DataConfigError, match=pattern):
        DataConfig.from_kwargs(settings)


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "sharpbench" / "conf" / "dataset").glob("*.yaml")))
def test_dataset_config_files_are_accepted(path, compose_cfg):
    """Each dataset option, composed by Hydra (its typed config's defaults, then its own keys),
    is a valid data-layer config."""
    from omegaconf import OmegaConf

    node = OmegaConf.to_container(compose_cfg([f"dataset={path.stem}"]).dataset, resolve=True)
    cfg = DataConfig.from_kwargs(node, seed=0, channels_last=False)
    assert cfg.name == path.stem


def test_val_split_too_large_for_data():
    with pytest.raises(DataConfigError, match="val_split=500"):
        build_splits(name="synthetic", num_train=100, num_test=10, val_split=500)


# ----------------------------------------------------------------------------- DeviceLoader
def _toy(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    return x, torch.arange(n)  # labels = sample index, to trace the order


def _batches(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def test_loader_same_seed_same_batches_and_epochs_differ():
    x, y = _toy()
    kw = dict(shuffle=True, augment=True, drop_last=True, seed=7)
    a, b = DeviceLoader(x, y, 8, **kw), DeviceLoader(x, y, 8, **kw)
    ea, eb = _batches(a), _batches(b)
    assert len(ea) == len(a) == 5
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(ea, eb))
    assert a.epoch == 1
    second = _batches(a)
    assert not torch.equal(torch.cat([y for _, y in ea]), torch.cat([y for _, y in second]))
    b.set_epoch(1)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(second, _batches(b)))
    c = DeviceLoader(x, y, 8, **{**kw, "seed": 8})
    assert not torch.equal(torch.cat([y for _, y in _batches(c)]), torch.cat([y for _, y in ea]))


def test_loader_sample_ids_name_each_batchs_samples():
    """SAF keys its record by these: the ids of batch b of epoch e are the dataset positions of
    that batch's samples, on every rank, for the epoch being served and for another."""
    x, y = _toy()
    y = torch.arange(len(y))                      # labels = positions, so a batch names its samples
    for rank in (0, 1):
        loader = DeviceLoader(x, y, 8, shuffle=True, drop_last=True, seed=3, rank=rank,
                              world_size=2)
        for epoch in range(2):
            for b, (_, yb) in enumerate(loader):
                assert torch.equal(loader.sample_ids(epoch, b), yb)
        fresh = DeviceLoader(x, y, 8, shuffle=True, drop_last=True, seed=3, rank=rank, world_size=2)
        first = [yb for _, yb in fresh]
        assert torch.equal(loader.sample_ids(0, 1), first[1])     # an epoch other than the cached


def test_loader_without_augmentation_normalises_exactly():
    x, y = _toy(10)
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    loader = DeviceLoader(x, y, 4, mean=mean, std=std)
    out = torch.cat([xb for xb, _ in loader])
    ref = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert out.dtype == torch.float32 and len(loader) == 3
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.cat([yb for _, yb in loader]), y)


def _reference_crop_flip(x, dy, dx, flip, pad=4):
    padded = F.pad(x, (pad, pad, pad, pad))
    out = []
    for i in range(len(x)):
        crop = padded[i, :, dy[i] : dy[i] + 32, dx[i] : dx[i] + 32]
        out.append(crop.flip(-1) if flip[i] else crop)
    return torch.stack(out)


def test_crop_and_flip_match_reference():
    x, _ = _toy(16)
    g = torch.Generator().manual_seed(0)
    dy, dx = torch.randint(0, 9, (16,), generator=g), torch.randint(0, 9, (16,), generator=g)
    flip = torch.randint(0, 2, (16,), generator=g).bool()
    assert torch.equal(crop_flip(x, dy, dx, flip), _reference_crop_flip(x, dy, dx, flip))
    centre = torch.full((16,), 4)
    assert torch.equal(crop_flip(x, centre, centre, torch.zeros(16, dtype=torch.bool)), x)
    assert torch.equal(crop_flip(x, centre, centre, torch.ones(16, dtype=torch.bool)), x.flip(-1))


def test_crop_shows_zero_border():
    x = torch.full((1, 3, 32, 32), 255, dtype=torch.uint8)
    out = crop_flip(x, torch.tensor([0]), torch.tensor([8]), torch.tensor([False]))
    assert out.shape == x.shape
    assert (out[0, :, :4] == 0).all() and (out[0, :, 4:, :28] == 255).all()  # top rows: padding
    assert (out[0, :, :, 28:] == 0).all()  # offset 8 to the right: last 4 columns are padding
    # through the loader (normalising with mean 0, std 1): padded pixels are exactly 0.0
    loader = DeviceLoader(x.repeat(64, 1, 1, 1), torch.zeros(64, dtype=torch.int64), 64, augment=True, shuffle=True)
    xb, _ = next(iter(loader))
    assert xb.shape == (64, 3, 32, 32) and (xb == 0).any() and (xb == 1).any()
    assert set(xb.unique().tolist()) <= {0.0, 1.0}


def test_known_image_flips_left_right():
    x = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    x[0, :, :, 0] = 200  # bright left column
    out = crop_flip(x, torch.tensor([4]), torch.tensor([4]), torch.tensor([True]))
    assert (out[0, :, :, 31] == 200).all() and (out[0, :, :, :31] == 0).all()


def test_state_dict_mid_epoch_resumes_identically():
    x, y = _toy(50)
    kw = dict(shuffle=True, augment=True, drop_last=True, seed=3)
    full = DeviceLoader(x, y, 8, **kw)
    _batches(full)  # epoch 0
    reference = _batches(full)  # epoch 1
    run = DeviceLoader(x, y, 8, **kw)
    _batches(run)
    it = iter(run)
    for _ in range(2):
        next(it)
    state = run.state_dict()
    assert state["epoch"] == 1 and state["batches_yielded"] == 2
    fresh = DeviceLoader(x, y, 8, **kw)
    fresh.load_state_dict(state)
    rest = _batches(fresh)
    assert len(rest) == len(reference) - 2
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(rest, reference[2:]))
    assert fresh.state_dict()["epoch"] == 2 and fresh.state_dict()["batches_yielded"] == 0
    with pytest.raises(ValueError, match="batch_size=8"):
        DeviceLoader(x, y, 5, **kw).load_state_dict(state)


def test_iter_without_batches_does_not_advance_but_abandoned_pass_does():
    x, y = _toy(32)
    loader = DeviceLoader(x, y, 8, shuffle=True, drop_last=True)
    iter(loader)  # Lightning calls iter() for checks without taking batches
    assert loader.epoch == 0
    first = next(iter(loader))[1]
    assert loader.state_dict()["batches_yielded"] == 1
    second_pass = next(iter(loader))[1]  # previous pass abandoned: this is epoch 1
    assert loader.epoch == 1 and not torch.equal(first, second_pass)


def test_lightning_set_epoch_hook_reaches_the_loader():
    from lightning.fabric.utilities.data import _set_sampler_epoch
    from lightning.pytorch.utilities.data import _is_dataloader_shuffled

    x, y = _toy(32)
    loader = DeviceLoader(x, y, 8, shuffle=True, drop_last=True, seed=1)
    next(iter(loader))  # a pass cut short, as with limit_train_batches
    _set_sampler_epoch(loader, 1)
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["batches_yielded"] == 0
    reference = DeviceLoader(x, y, 8, shuffle=True, drop_last=True, seed=1)
    reference.set_epoch(1)
    assert torch.equal(torch.cat([b for _, b in loader]), torch.cat([b for _, b in reference]))
    # a restored mid-epoch position survives Lightning's set_epoch for the same epoch
    loader.load_state_dict({**reference.state_dict(), "epoch": 4, "batches_yielded": 2})
    _set_sampler_epoch(loader, 4)
    assert loader.state_dict()["batches_yielded"] == 2
    assert _is_dataloader_shuffled(loader) is False  # Lightning's eval-loader check does not break


def test_sharding_gives_disjoint_equal_shards():
    x, y = _toy(45)
    kw = dict(shuffle=True, augment=True, drop_last=True, seed=2, world_size=2)
    shards = [torch.cat([yb for _, yb in DeviceLoader(x, y, 4, rank=r, **kw)]) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 20
    assert not set(shards[0].tolist()) & set(shards[1].tolist())
    # without drop_last every sample is seen, the shorter shard padded by wrapping around
    ev = [torch.cat([yb for _, yb in DeviceLoader(x, y, 4, rank=r, world_size=2)]) for r in range(2)]
    assert len(ev[0]) == len(ev[1]) == 23 and set(torch.cat(ev).tolist()) == set(range(45))


def test_loader_rejects_batch_larger_than_data():
    x, y = _toy(10)
    with pytest.raises(DataConfigError, match="batch_size=16 is larger"):
        DeviceLoader(x, y, 16, drop_last=True)


def test_channels_last_output():
    x, y = _toy(8)
    xb, _ = next(iter(DeviceLoader(x, y, 4, augment=True, channels_last=True)))
    assert xb.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cpu_and_gpu_give_the_same_stream():
    x, y = _toy(64)
    kw = dict(shuffle=True, augment=True, drop_last=True, seed=11, mean=(0.5,) * 3, std=(0.25,) * 3)
    cpu = _batches(DeviceLoader(x, y, 16, **kw))
    gpu = _batches(DeviceLoader(x, y, 16, device="cuda", **kw))
    for (xc, yc), (xg, yg) in zip(cpu, gpu):
        assert torch.equal(yc, yg.cpu())
        torch.testing.assert_close(xc, xg.cpu())


# ----------------------------------------------------------------------------- data module
def test_datamodule_without_trainer():
    dm = CIFARDataModule(
        {"name": "synthetic", "root": None, "num_train": 300, "num_test": 100, "val_split": 0.2},
        batch_size=32, eval_batch_size=64, seed=0,
    )
    assert dm.num_classes == 10 and dm.eval_names == ["val", "test"]
    with pytest.raises(RuntimeError, match="setup"):
        dm.class_names
    dm.prepare_data()
    dm.setup("fit")
    train = dm.train_dataloader()
    assert isinstance(train, DeviceLoader) and train.shuffle and train.augment and len(train) == 240 // 32
    val, test = dm.val_dataloader()
    assert len(val.y) == 60 and len(test.y) == 100 and not val.augment and val.batch_size == 64
    assert dm.test_dataloader().batch_size == 64
    assert dm.train_class_counts.sum() == 240 and len(dm.class_names) == 10
    x, yb = dm.fisher_batch(torch.tensor([0, 5]), "cpu")
    assert x.shape == (2, 3, 32, 32) and torch.equal(yb, dm.train_y[[0, 5]])
    assert not dm.imbalanced


def test_datamodule_folder_format(tmp_path):
    write_image_folder(tmp_path, CIFAR10_CLASSES, {"train": 4, "test": 2})
    dm = CIFARDataModule(name="cifar10", root=str(tmp_path), format="folder", batch_size=8, decode_workers=1)
    dm.prepare_data()
    assert (tmp_path / ".sharpbench_cache" / "cifar10-folder-train.pt").is_file()
    dm.setup()
    assert dm.mean == data.CIFAR_STATS["cifar10"][0] and dm.eval_names == ["test"]
    assert len(dm.val_dataloader()) == 1 and len(dm.train_dataloader()) == 5


def test_lightning_fit_and_mid_epoch_resume(tmp_path):
    import lightning as L

    seen: list[list[int]] = []

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))

        def training_step(self, batch, batch_idx):
            x, y = batch
            seen.append(y.tolist())
            return F.cross_entropy(self.net(x), y)

        def validation_step(self, batch, batch_idx, dataloader_idx=0):
            x, y = batch
            self.log(f"{self.trainer.datamodule.eval_names[dataloader_idx]}_loss", F.cross_entropy(self.net(x), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    def make_dm():
        return CIFARDataModule(name="synthetic", root=None, num_train=96, num_test=32, val_split=16, batch_size=16)

    def make_trainer(**kw):
        return L.Trainer(
            accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
            num_sanity_val_steps=0, default_root_dir=tmp_path, **kw,
        )

    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=7, save_top_k=-1)
    make_trainer(max_epochs=2, callbacks=[ckpt]).fit(Tiny(), datamodule=make_dm())
    full = list(seen)
    assert len(full) == 10  # 2 epochs of 80 // 16 = 5 batches
    ckpt_file = next(tmp_path.glob("*step=7*.ckpt"))
    state = torch.load(ckpt_file, weights_only=False)["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert state[0]["epoch"] == 1 and state[0]["batches_yielded"] == 2
    seen.clear()
    make_trainer(max_epochs=2).fit(Tiny(), datamodule=make_dm(), ckpt_path=ckpt_file)
    assert seen == full[7:]  # resumed mid-epoch with the identical batches


# ----------------------------------------------------------------------------- real data
def _scratch_dir(tmp_path: Path) -> Path:
    """A folder for 60,000 small files: RAM-backed /dev/shm when it has room (deleting that many
    files on a disk mounted with ``discard`` takes minutes), else pytest's ``tmp_path``."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 2 * 2**30:
        return Path(tempfile.mkdtemp(prefix="sharpbench-cifar10-", dir=shm))
    return tmp_path / "scratch"


@pytest.mark.slow
@pytest.mark.skipif(not JPEG_ARCHIVE.exists(), reason=f"{JPEG_ARCHIVE} not present")
def test_real_cifar10_jpeg_folder(tmp_path):
    root = _scratch_dir(tmp_path)
    root.mkdir(exist_ok=True)
    try:
        if shutil.which("tar"):  # much faster than tarfile for 60,000 small members
            subprocess.run(["tar", "-xJf", str(JPEG_ARCHIVE), "-C", str(root)], check=True)
        else:
            with tarfile.open(JPEG_ARCHIVE) as tar:
                tar.extractall(root, filter="data")
        start = time.perf_counter()
        raw = load_raw("cifar10", root, format="folder")
        decode_s = time.perf_counter() - start
        start = time.perf_counter()
        again = load_raw("cifar10", root, format="folder")
        cached_s = time.perf_counter() - start
        print(f"\ndecoded 60000 JPEGs in {decode_s:.1f} s ({os.cpu_count()} CPUs); cached load {cached_s:.2f} s")
        assert raw.train_x.shape == (50_000, 3, 32, 32) and raw.test_x.shape == (10_000, 3, 32, 32)
        assert raw.class_names == CIFAR10_CLASSES
        assert torch.bincount(raw.train_y).tolist() == [5000] * 10
        assert torch.bincount(raw.test_y).tolist() == [1000] * 10
        assert torch.equal(again.train_x, raw.train_x) and cached_s < decode_s
        mean = raw.train_x[::5].float().mean(dim=(0, 2, 3)) / 255  # every 5th image: all classes
        torch.testing.assert_close(mean, torch.tensor(data.CIFAR_STATS["cifar10"][0]), atol=0.01, rtol=0)
    finally:
        shutil.rmtree(root, ignore_errors=True)

"""Data on disk that is not what it claims to be gets a message that says what to change."""
import pickle
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from sharpbench.data.cache import read_cache, write_cache
from sharpbench.data.cifar_python import ensure_archive, read_batches
from sharpbench.data.errors import DatasetUnavailableError
from sharpbench.data.image_folder import scan_split


def test_a_cache_with_a_matching_fingerprint_but_wrong_images_is_ignored(tmp_path):
    path = tmp_path / "c.pt"
    fingerprint = {"digest": "abc"}
    write_cache(path, fingerprint, {"x": torch.zeros(4, 3, 16, 16, dtype=torch.uint8),
                                    "y": torch.zeros(4, dtype=torch.long), "class_names": ["a"]})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert read_cache(path, fingerprint) is None
    assert any("16, 16" in str(w.message) for w in caught)
    good = {"x": torch.zeros(4, 3, 32, 32, dtype=torch.uint8), "y": torch.zeros(4, dtype=torch.long),
            "class_names": ["a"]}
    write_cache(path, fingerprint, good)
    assert read_cache(path, fingerprint) is not None


def test_a_corrupt_extracted_pickle_names_the_file_and_the_fix(tmp_path):
    (tmp_path / "data_batch_1").write_bytes(b"\x80\x04 truncated")
    with pytest.raises(DatasetUnavailableError, match="data_batch_1 is not a readable CIFAR python file.*extract"):
        read_batches(tmp_path, ("data_batch_1",), "labels")
    (tmp_path / "data_batch_2").write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(DatasetUnavailableError, match="not a dict"):
        read_batches(tmp_path, ("data_batch_2",), "labels")


def test_an_empty_class_folder_is_refused(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / "test" / cls).mkdir(parents=True)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "test" / "cat" / "0.png")
    with pytest.raises(DatasetUnavailableError, match="dog"):
        scan_split(tmp_path, "test")


@pytest.mark.parametrize("download", [False, True])
def test_an_image_folder_tree_read_as_the_python_format_says_add_format_folder(tmp_path, download):
    for split in ("train", "test"):
        (tmp_path / split / "cat").mkdir(parents=True)
    with pytest.raises(DatasetUnavailableError, match="add dataset.format=folder"):
        ensure_archive("cifar10", tmp_path, download=download)

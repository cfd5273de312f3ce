"""Read CIFAR-10 / CIFAR-100 in the "python version" archive layout (the one torchvision downloads).

Layout under ``root``::

    cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
    cifar-100-python/{train, test, meta}

Each batch is a pickle with ``b"data"`` (N x 3072 uint8, channel-major: 1024 red, 1024 green,
1024 blue values, row-major within a channel) and ``b"labels"`` (CIFAR-10) or ``b"fine_labels"``
(CIFAR-100). The pickles are read here directly (no md5 check of the extracted files), so locally
generated files load too. Pickles can run code when loaded: only read archives you trust.
"""

from __future__ import annotations

import pickle
import urllib.error
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision.datasets import utils as tv_utils

from sharpbench.data.cache import Payload, cached, file_stamp
from sharpbench.data.errors import DatasetUnavailableError


@dataclass(frozen=True)
class ArchiveSpec:
    """Where one CIFAR variant lives on disk and online, and which pickle keys it uses."""

    folder: str
    filename: str
    url: str
    md5: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    names_key: str


ARCHIVES = {
    "cifar10": ArchiveSpec(
        folder="cifar-10-batches-py",
        filename="cifar-10-python.tar.gz",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        meta_file="batches.meta",
        label_key="labels",
        names_key="label_names",
    ),
    "cifar100": ArchiveSpec(
        folder="cifar-100-python",
        filename="cifar-100-python.tar.gz",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        train_files=("train",),
        test_files=("test",),
        meta_file="meta",
        label_key="fine_labels",
        names_key="fine_label_names",
    ),
}


def _required_files(spec: ArchiveSpec) -> list[str]:
    return [*spec.train_files, *spec.test_files, spec.meta_file]


def _missing_files(folder: Path, spec: ArchiveSpec) -> list[Path]:
    return [folder / name for name in _required_files(spec) if not (folder / name).is_file()]


def ensure_archive(name: str, root: str | Path, download: bool) -> Path:
    """Make sure the extracted CIFAR folder exists under ``root`` and return its path.

    Extracts ``<root>/<archive>.tar.gz`` when present and its md5 matches; downloads it when
    ``download`` is true; otherwise raises :class:`DatasetUnavailableError` saying what to do.
    """
    spec = ARCHIVES[name]
    root = Path(root).expanduser()
    folder = root / spec.folder
    if not _missing_files(folder, spec):
        return folder
    archive = root / spec.filename
    if not archive.is_file() and (root / "train").is_dir() and (root / "test").is_dir():
        raise DatasetUnavailableError(
            f"{root} holds train/ and test/ folders, an image-folder dataset, not the python "
            f"archive that dataset.format=python reads: add dataset.format=folder.")
    if archive.is_file():
        if not tv_utils.check_md5(str(archive), spec.md5):
            raise DatasetUnavailableError(
                f"Corrupt archive {archive}: its md5 is not {spec.md5}. Delete it and re-download "
                f"(dataset.download=true), or copy an intact {spec.filename} there."
            )
        tv_utils.extract_archive(str(archive), str(root))
    elif download:
        _download(spec, root)
    else:
        missing = ", ".join(str(p) for p in _missing_files(folder, spec)[:3])
        raise DatasetUnavailableError(
            f"{name} not found: looked for the extracted folder {folder} (missing {missing}) and "
            f"for the archive {archive}. Fix: set dataset.root to the folder that contains "
            f"{spec.folder}/, or set dataset.download=true to fetch it from {spec.url}, or use "
            "dataset.format=folder for a train/<class>/*.png image tree."
        )
    still_missing = _missing_files(folder, spec)
    if still_missing:
        raise DatasetUnavailableError(
            f"After extracting {archive} these files are still missing: "
            f"{', '.join(map(str, still_missing))}. Delete {archive} and {folder} and re-download."
        )
    return folder


def _download(spec: ArchiveSpec, root: Path) -> None:
    """Download and extract one archive, turning network and checksum failures into clear errors."""
    try:
        tv_utils.download_and_extract_archive(
            spec.url, download_root=str(root), filename=spec.filename, md5=spec.md5
        )
    except RuntimeError as err:  # torchvision's "File not found or corrupted." after downloading
        raise DatasetUnavailableError(
            f"The download of {spec.url} into {root / spec.filename} failed its md5 check ({err}). "
            "Delete that file and try again, or place the archive there by hand."
        ) from err
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        raise DatasetUnavailableError(
            f"Could not download {spec.url} ({err}); this machine could not reach the URL. "
            f"Download {spec.filename} elsewhere and either put it in {root} or extract it there "
            f"(so that {root / spec.folder}/ exists), then run with dataset.root={root} "
            "dataset.download=false."
        ) from err


def _load_pickle(path: Path) -> dict:
    """Load one CIFAR pickle and return it with ``str`` keys (the files use ``bytes`` keys)."""
    try:
        with open(path, "rb") as handle:
            raw = pickle.load(handle, encoding="bytes")
        if not isinstance(raw, dict):
            raise TypeError(f"a {type(raw).__name__}, not a dict")
    except Exception as err:  # noqa: BLE001 - truncated, overwritten, not a pickle at all
        raise DatasetUnavailableError(
            f"{path} is not a readable CIFAR python file ({type(err).__name__}: {err}). Delete "
            f"the folder {path.parent} and extract the archive again (or set "
            "dataset.download=true).") from err
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}


def read_class_names(folder: Path, spec: ArchiveSpec) -> list[str]:
    """Return the class names stored in the archive's meta pickle, in label order."""
    names = _load_pickle(folder / spec.meta_file)[spec.names_key]
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def read_batches(folder: Path, files: tuple[str, ...], label_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Read and concatenate batch pickles into ``x`` (uint8 [N,3,32,32]) and ``y`` (int64 [N])."""
    xs, ys = [], []
    for name in files:
        batch = _load_pickle(folder / name)
        data = np.asarray(batch["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DatasetUnavailableError(
                f"{folder / name}: expected data of shape (N, 3072), got {data.shape}. The file is "
                "not a CIFAR python batch; delete the folder and re-extract the archive."
            )
        xs.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))
        ys.append(torch.as_tensor(np.asarray(batch[label_key], dtype=np.int64)))
    return torch.cat(xs), torch.cat(ys)


def load_cifar_python(
    name: str, root: str | Path, split: str, *, download: bool = False, cache_dir: Path | None = None
) -> Payload:
    """Return ``{"x", "y", "class_names"}`` for ``split`` ("train" or "test") of CIFAR ``name``.

    With ``cache_dir`` set, the tensors are cached as ``<cache_dir>/<name>-python-<split>.pt``.
    """
    spec = ARCHIVES[name]
    folder = ensure_archive(name, root, download)
    files = spec.train_files if split == "train" else spec.test_files
    fingerprint = {
        "source": "python",
        "name": name,
        "split": split,
        "files": [file_stamp(folder / f) for f in (*files, spec.meta_file)],
    }

    def build() -> Payload:
        x, y = read_batches(folder, files, spec.label_key)
        return {"x": x, "y": y, "class_names": read_class_names(folder, spec)}

    path = None if cache_dir is None else Path(cache_dir) / f"{name}-python-{split}.pt"
    return cached(path, fingerprint, build)

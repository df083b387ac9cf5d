"""MNIST and Fashion-MNIST from their IDX files (found under the data root, or fetched by
torchvision), and the MNIST sample bundled with the package."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from ..config import DataConfig
from ..errors import DataError
from ..splits import holdout_splits
from .base import ArraySource, _sha256_files

ASSETS = Path(__file__).parent.parent / "assets"


def read_idx(path: Path) -> np.ndarray:
    """An IDX array (the MNIST file format): big-endian header, then raw uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read IDX file ({exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not an IDX uint8 file (bad magic number)")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    if len(raw) - offset != int(np.prod(dims)):
        raise DataError(f"{path}: truncated or oversized IDX file (header says {dims})")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find_idx(root: Path, folder: str, stem: str) -> Path | None:
    for base in (root, root / folder / "raw", root / folder):
        for name in (stem + ".gz", stem):
            if (base / name).is_file():
                return base / name
    return None


def idx_source(name: str, folder: str, root: Path, cfg: DataConfig) -> ArraySource:
    """train ids 0..59999, test ids 60000..; files are looked up first, downloaded second."""
    stems = [s for pair in IDX_FILES.values() for s in pair]
    paths = [_find_idx(root, folder, s) for s in stems]
    if any(p is None for p in paths):
        _download_torchvision(name, root)
        paths = [_find_idx(root, folder, s) for s in stems]
    missing = [s for s, p in zip(stems, paths, strict=True) if p is None]
    if missing:
        raise DataError(f"{name}: {missing[0]}(.gz) not found under {root}")
    arrays = [read_idx(p) for p in paths]  # type: ignore[arg-type]
    images = np.concatenate([arrays[0], arrays[2]])[:, None]
    labels = np.concatenate([arrays[1], arrays[3]])
    n_train = len(arrays[0])
    ids = np.arange(len(images), dtype=np.int64)
    splits = {"train": ids[:n_train], "test": ids[n_train:]}
    return ArraySource(
        torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)), splits,
        name, _sha256_files(paths), cfg, split_rule=False,  # type: ignore[arg-type]
    )


def _download_torchvision(name: str, root: Path) -> None:
    """Fetch through torchvision; offline this fails and the caller reports what is missing."""
    import torchvision.datasets as tvd

    cls = {"mnist": tvd.MNIST, "fashion-mnist": tvd.FashionMNIST}[name]
    try:
        for train in (True, False):
            cls(str(root), train=train, download=True)
    except Exception as exc:  # noqa: BLE001 - any network failure means "not available"
        raise DataError(
            f"{name}: files not under {root} and download failed ({type(exc).__name__}); "
            "pass --data-root pointing at a folder holding the IDX .gz files"
        ) from None


def bundled_mnist_sample(cfg: DataConfig) -> ArraySource:
    """The MNIST test split shipped in the package: 9,000 train / 1,000 validation."""
    folder = ASSETS / "mnist"
    img_path = folder / "t10k-images-idx3-ubyte.gz"
    lbl_path = folder / "t10k-labels-idx1-ubyte.gz"
    images, labels = read_idx(img_path), read_idx(lbl_path)
    return ArraySource(
        torch.from_numpy(images[:, None].copy()),
        torch.from_numpy(labels.astype(np.int64)),
        holdout_splits(len(images)),
        "mnist-sample",
        _sha256_files([img_path, lbl_path]),
        cfg,
    )

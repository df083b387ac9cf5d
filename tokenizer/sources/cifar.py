"""CIFAR-10 from its binary version: raw bytes, nothing to unpickle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..config import DataConfig
from ..errors import DataError
from .base import ArraySource, _sha256_files

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"


def cifar10(root: Path, cfg: DataConfig) -> ArraySource:
    folder = root / "cifar-10-batches-bin"
    files = [folder / f"data_batch_{i}.bin" for i in range(1, 6)] + [folder / "test_batch.bin"]
    if not all(f.is_file() for f in files):
        from torchvision.datasets.utils import download_and_extract_archive

        try:
            download_and_extract_archive(CIFAR_URL, str(root), md5=CIFAR_MD5)
        except Exception as exc:  # noqa: BLE001
            raise DataError(
                f"cifar10: {folder} incomplete and download failed ({type(exc).__name__}); "
                "pass --data-root pointing at a folder holding cifar-10-batches-bin/"
            ) from None
    records = []
    for f in files:
        raw = np.fromfile(f, dtype=np.uint8)
        if raw.size % 3073:
            raise DataError(f"{f}: not a CIFAR-10 binary batch (size {raw.size})")
        records.append(raw.reshape(-1, 3073))
    data = np.concatenate(records)
    images = data[:, 1:].reshape(-1, 3, 32, 32)
    labels = data[:, 0].astype(np.int64)
    ids = np.arange(len(data), dtype=np.int64)
    n_train = sum(len(r) for r in records[:5])
    splits = {"train": ids[:n_train], "test": ids[n_train:]}
    return ArraySource(
        torch.from_numpy(images.copy()), torch.from_numpy(labels), splits,
        "cifar10", _sha256_files(files), cfg, split_rule=False,
    )

"""``npz:PATH``: images (NHW, NHWC or NCHW uint8) and optional integer labels in one .npz."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from ..config import DataConfig
from ..errors import DataError
from ..splits import holdout_splits
from .base import ArraySource, _sha256_files
from .labels import class_ids


def npz_source(path: Path, cfg: DataConfig) -> ArraySource:
    if path.is_dir():
        raise DataError(f"npz:{path}: is a folder; use imagefolder:{path} for folders of images")
    if not path.is_file():
        raise DataError(f"npz:{path}: file not found")
    if not zipfile.is_zipfile(path):  # numpy would call it pickled data and suggest unpickling
        raise DataError(f"{path}: not a .npz file (not a zip archive); write it with "
                        "numpy.savez(path, images=..., labels=...)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "images" not in archive:
                raise DataError(f"{path}: no array named 'images' (found {list(archive)})")
            images = np.asarray(archive["images"])
            labels = np.asarray(archive["labels"]) if "labels" in archive else None
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - zip/format errors of all kinds
        raise DataError(f"{path}: cannot read .npz ({exc})") from None
    if images.dtype != np.uint8:
        raise DataError(f"{path}: 'images' must be uint8, got {images.dtype}")
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4 and images.shape[1] not in (1, 3, 4) and images.shape[3] in (1, 3, 4):
        images = images.transpose(0, 3, 1, 2)  # NHWC -> NCHW
    elif images.ndim != 4:
        raise DataError(f"{path}: 'images' must be NHW, NHWC or NCHW, got shape {images.shape}")
    n = len(images)
    if n == 0:
        raise DataError(f"{path}: 'images' holds no images; nothing to train on or encode")
    if labels is None:
        labels = np.full(n, -1, dtype=np.int64)
    elif labels.shape != (n,):
        raise DataError(f"{path}: 'labels' has shape {labels.shape}, expected ({n},)")
    else:
        labels = class_ids(labels, str(path))
    return ArraySource(
        torch.from_numpy(np.ascontiguousarray(images)),
        torch.from_numpy(labels.astype(np.int64)),
        holdout_splits(n),
        f"npz:{path}",
        _sha256_files([path]),
        cfg,
    )

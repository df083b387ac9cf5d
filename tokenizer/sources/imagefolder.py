"""``imagefolder:PATH``: PNG/JPEG files under a folder, read one by one (in DataLoader
workers when asked); class subfolders become labels."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..config import DataConfig
from ..errors import DataError
from ..splits import holdout_splits
from .base import ImageSource
from .decoding import read_array, to_batch
from .identity import positions_array, sha256_hex, stamp
from .shards import files_fingerprint

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


class ImageFolderSource(ImageSource):
    """PNG/JPEG files under a folder, sorted by path; class subfolders become labels."""

    def __init__(self, root: Path, cfg: DataConfig) -> None:
        if root.is_file():
            hint = f"npz:{root}" if root.suffix == ".npz" else "the folder holding the images"
            raise DataError(f"imagefolder:{root}: is a file, not a folder; use {hint}")
        if not root.is_dir():
            raise DataError(f"imagefolder:{root}: folder not found")
        if cfg.channels not in (1, 3):
            raise DataError(
                f"imagefolder:{root}: image files are read as 1 or 3 channels, the config has "
                f"data.channels {cfg.channels}; set 1 or 3"
            )
        files = sorted(
            p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not files:
            raise DataError(f"imagefolder:{root}: no .png/.jpg/.jpeg files found")
        classes = sorted({p.relative_to(root).parts[0] for p in files if p.parent != root})
        self.class_names = classes
        lookup = {c: i for i, c in enumerate(classes)}
        self.files = files
        self.labels = np.array(
            [lookup[p.relative_to(root).parts[0]] if p.parent != root else -1 for p in files],
            dtype=np.int64,
        )
        self.root, self.cfg = root, cfg
        self.name = f"imagefolder:{root}"
        self.channels, self.image_size = cfg.channels, cfg.image_size
        self.splits, self.split_rule = holdout_splits(len(files)), True
        self.fingerprint = files_fingerprint(files, root)

    def load_batch(self, ids: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        ids = np.asarray(ids, dtype=np.int64)
        wheres = [str(self.files[i]) for i in ids]
        arrays = [read_array(self.files[i], self.cfg, where) for i, where in zip(ids, wheres,
                                                                                 strict=True)]
        images = to_batch(arrays, self.cfg, wheres).float().div_(255)
        return images, torch.from_numpy(self.labels[ids])

    def item_keys(self) -> list[str]:
        return [p.relative_to(self.root).as_posix() for p in self.files]

    def item_stamps(self) -> list[str]:
        return [stamp(p) for p in self.files]

    def content_hashes(self, positions: Sequence[int] | np.ndarray) -> list[str]:
        return [sha256_hex(_read_bytes(self.files[i]))
                for i in positions_array(positions, len(self.files))]


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc}); the folder changed "
                        "since it was opened, open it again") from None

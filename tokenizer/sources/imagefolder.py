"""``imagefolder:PATH``: PNG/JPEG files under a folder, read one by one (in DataLoader
workers when asked); class subfolders become labels."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..config import DataConfig
from ..errors import DataError
from ..splits import holdout_splits
from .base import ImageSource, _conform

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
        self.splits = holdout_splits(len(files))
        h = hashlib.sha256()
        for p in files:
            st = p.stat()
            h.update(f"{p.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        self.fingerprint = h.hexdigest()

    def _read(self, path: Path) -> torch.Tensor:
        from PIL import Image, UnidentifiedImageError

        mode = "L" if self.cfg.channels == 1 else "RGB"
        try:
            with Image.open(path) as img:
                img = img.convert(mode)
                array = np.asarray(img, dtype=np.uint8)
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as exc:
            raise DataError(f"{path}: cannot read image ({exc}); fix or remove the file") from None
        tensor = torch.from_numpy(array.copy())
        tensor = tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)
        return _conform(tensor[None], self.cfg, str(path))[0]

    def load_batch(self, ids: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        ids = np.asarray(ids, dtype=np.int64)
        images = torch.stack([self._read(self.files[i]) for i in ids]).float().div_(255)
        return images, torch.from_numpy(self.labels[ids])

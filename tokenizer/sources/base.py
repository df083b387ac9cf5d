"""What every image source is: a map-style dataset of ``(image float (C, H, W) in [0, 1],
label or -1, id)`` where ``id`` is the item's position in the whole source, with named splits;
and the conversions (channels, size) every format applies to its images.

Order is stable, so an id is the row of that image in every token store made from the source.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..config import DataConfig
from ..errors import DataError
from .identity import positions_array, sha256_hex

DEFAULT_DATA_ROOT = Path(os.environ.get("VQTOK_DATA", "~/.cache/vqtok/data")).expanduser()


def _sha256_files(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


class ImageSource(Dataset):
    """Base: subclasses fill ``splits``, ``split_rule``, ``name``, ``fingerprint``,
    ``load_batch`` and the identity of each image (``item_keys``, ``item_stamps``,
    ``content_hashes``; see ``identity``)."""

    name: str
    fingerprint: str
    splits: dict[str, np.ndarray]
    split_rule: bool  # splits are holdout_splits' (every tenth id), not the source's own
    channels: int
    image_size: int

    def __len__(self) -> int:
        return sum(len(v) for v in self.splits.values())

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        images, labels = self.load_batch([index])
        return images[0], int(labels[0]), int(index)

    def load_batch(self, ids: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, C, H, W) float in [0, 1] and labels (B,) int64 for these ids."""
        raise NotImplementedError

    def item_keys(self) -> list[str]:
        """One key per position (the index load_batch takes), stable across runs for the same
        image location."""
        raise NotImplementedError

    def item_stamps(self) -> list[str] | None:
        """Per position, a cheap string that changes whenever the stored bytes may have
        changed (size and mtime_ns of the file holding the image); None without files."""
        raise NotImplementedError

    def content_hashes(self, positions: Sequence[int] | np.ndarray) -> list[str]:
        """sha256 hex digest of each position's stored image bytes (encoded files as stored,
        not decoded pixels)."""
        raise NotImplementedError

    def split_ids(self, split: str) -> np.ndarray:
        if split not in self.splits:
            raise DataError(
                f"dataset {self.name} has no split '{split}'; it has {sorted(self.splits)}"
            )
        return self.splits[split]


class ArraySource(ImageSource):
    """Images held in memory as one uint8 (N, C, H, W) tensor: batches are a single index."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        splits: dict[str, np.ndarray],
        name: str,
        fingerprint: str,
        cfg: DataConfig,
        *,
        split_rule: bool = True,
    ) -> None:
        self.name, self.fingerprint, self.splits = name, fingerprint, splits
        self.split_rule = split_rule  # False where the caller gives the format's own splits
        self.channels, self.image_size = cfg.channels, cfg.image_size
        self.images = _conform(images, cfg, name)
        self.labels = labels.long()

    def load_batch(self, ids: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.from_numpy(np.array(ids, dtype=np.int64))
        return self.images[idx].float().div_(255), self.labels[idx]

    def item_keys(self) -> list[str]:
        return [str(i) for i in range(len(self.images))]

    def item_stamps(self) -> None:
        return None  # no file per image; hashing the array is as cheap as a stat

    def content_hashes(self, positions: Sequence[int] | np.ndarray) -> list[str]:
        """sha256 of the conformed uint8 image served (channels and size as configured)."""
        array = self.images.numpy()  # contiguous (_conform), so each row is one buffer
        ids = positions_array(positions, len(array))
        return [sha256_hex(np.ascontiguousarray(array[i]).data) for i in ids]


def _conform(images: torch.Tensor, cfg: DataConfig, where: str) -> torch.Tensor:
    """Convert uint8 (N, C, H, W) to the configured channels and size (resize + centre crop)."""
    images = _match_channels(images, cfg.channels, where)
    h, w = images.shape[-2:]
    if (h, w) == (cfg.image_size, cfg.image_size):
        return images.contiguous()
    if cfg.resize == "error":
        raise DataError(
            f"{where}: images are {h}x{w} but the config wants {cfg.image_size}x{cfg.image_size}"
            " and data.resize is 'error'; set data.resize: resize or data.image_size"
        )
    from torchvision.transforms.v2 import functional as TF  # slow to import; rarely needed

    out = []
    for start in range(0, images.shape[0], 4096):
        part = TF.resize(images[start : start + 4096], cfg.image_size, antialias=True)
        out.append(TF.center_crop(part, cfg.image_size))
    return torch.cat(out).contiguous()


def _match_channels(images: torch.Tensor, channels: int, where: str) -> torch.Tensor:
    have = images.shape[1]
    if have == channels:
        return images
    if have == 4:  # drop alpha, then convert as RGB
        images, have = images[:, :3], 3
        if channels == 3:
            return images
    if have == 1 and channels == 3:
        return images.expand(-1, 3, -1, -1)
    if have == 3 and channels == 1:
        from torchvision.transforms.v2 import functional as TF

        return TF.rgb_to_grayscale(images)
    raise DataError(f"{where}: images have {have} channels and the config wants {channels}")

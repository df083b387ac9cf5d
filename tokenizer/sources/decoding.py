"""Encoded image files (PNG, JPEG, WebP) to uint8 tensors, for every source that keeps
images as files or bytes: one decoder, so a folder, a tar shard and a Parquet column give the
same pixels for the same file.

Decoding is the hot loop of those sources (DataLoader workers spend their time here), so an
image already in the wanted mode is not converted, and a batch whose images already have the
configured size is stacked once instead of being conformed image by image.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..config import DataConfig
from ..errors import DataError
from .base import _conform


def decode_errors() -> tuple[type[BaseException], ...]:
    """What PIL raises for bytes that are no (whole) image; PIL is imported on first use."""
    from PIL import Image, UnidentifiedImageError

    # SyntaxError: PIL's PNG reader reports broken chunks that way.
    return (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError,
            SyntaxError)


def pil_array(data: bytes | Path, channels: int) -> np.ndarray:
    """uint8 (H, W) for ``channels`` 1 ("L"), else (H, W, 3) ("RGB"), as stored (no
    resizing); raises one of ``decode_errors()`` for a file that is not an image."""
    from PIL import Image, UnidentifiedImageError

    mode = "L" if channels == 1 else "RGB"
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
            if img.mode in WIDE_GRAY_MODES:
                return _wide_gray(np.asarray(img), channels)
            return np.asarray(img if img.mode == mode else img.convert(mode), dtype=np.uint8)
    except UnidentifiedImageError:
        if isinstance(data, bytes):  # PIL would name the buffer: <_io.BytesIO at 0x7f...>
            raise UnidentifiedImageError("cannot identify image file") from None
        raise


#: 16-bit grayscale as PIL opens it (PNG, TIFF): convert("L") would clip it to 0 and 255.
WIDE_GRAY_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


def _wide_gray(values: np.ndarray, channels: int) -> np.ndarray:
    """0..65535 to 0..255, rounded (the inverse of the usual x * 257 widening)."""
    gray = ((np.clip(values.astype(np.int64), 0, 65535) + 128) // 257).astype(np.uint8)
    return gray if channels == 1 else np.repeat(gray[..., None], 3, axis=2)


def read_array(data: bytes | Path, cfg: DataConfig, where: str,
               remedy: str = "fix or remove the file") -> np.ndarray:
    """``pil_array``, or one DataError line: ``WHERE: cannot read image (why); REMEDY``."""
    try:
        return pil_array(data, cfg.channels)
    except decode_errors() as exc:
        raise DataError(f"{where}: cannot read image ({exc}); {remedy}") from None


def to_batch(arrays: Sequence[np.ndarray], cfg: DataConfig,
             wheres: Sequence[str]) -> torch.Tensor:
    """Decoded images as one uint8 (B, C, H, W) tensor at the configured size (``wheres``
    name them in resize errors)."""
    size = (cfg.image_size, cfg.image_size)
    if arrays and all(a.shape[:2] == size for a in arrays):
        batch = torch.from_numpy(np.stack(arrays))
        return batch[:, None] if batch.ndim == 3 else batch.permute(0, 3, 1, 2).contiguous()
    out = []
    for array, where in zip(arrays, wheres, strict=True):
        tensor = torch.from_numpy(np.array(array))
        tensor = tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)
        out.append(_conform(tensor[None], cfg, where)[0])
    return torch.stack(out)

"""Encoded image files (PNG, JPEG, WebP) to uint8 tensors, for every source that keeps
images as files or bytes: one decoder, so a folder, a tar shard and a Parquet column give the
same pixels for the same file."""

from __future__ import annotations

import io
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


def pil_decode(data: bytes | Path, channels: int) -> torch.Tensor:
    """uint8 (C, H, W) with C = ``channels`` (1: "L", else "RGB"), as stored (no resizing);
    raises one of ``decode_errors()`` for a file that is not an image."""
    from PIL import Image, UnidentifiedImageError

    mode = "L" if channels == 1 else "RGB"
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
            array = np.asarray(img.convert(mode), dtype=np.uint8)
    except UnidentifiedImageError:
        if isinstance(data, bytes):  # PIL would name the buffer: <_io.BytesIO at 0x7f...>
            raise UnidentifiedImageError("cannot identify image file") from None
        raise
    tensor = torch.from_numpy(array.copy())
    return tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)


def read_image(data: bytes | Path, cfg: DataConfig, where: str,
               remedy: str = "fix or remove the file") -> torch.Tensor:
    """uint8 (C, H, W) at the configured channels and size, or one DataError line:
    ``WHERE: cannot read image (why); REMEDY``."""
    try:
        tensor = pil_decode(data, cfg.channels)
    except decode_errors() as exc:
        raise DataError(f"{where}: cannot read image ({exc}); {remedy}") from None
    return _conform(tensor[None], cfg, where)[0]

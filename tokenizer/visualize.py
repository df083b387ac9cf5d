"""Pictures for people: originals above their reconstructions, or a plain grid of images.

Drawn here with PIL rather than torchvision.utils, whose import pulls in all of torchvision
(about a second, most of what a one-shot ``decode`` would otherwise spend starting up).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from vqtok.files.atomic import atomic_path


def image_grid(images: torch.Tensor, per_row: int, padding: int = 2,
               pad_value: float = 0.5) -> torch.Tensor:
    """(N, C, H, W) images in [0, 1] -> one (3, H', W') picture, ``per_row`` to a row."""
    images = images.detach().float().cpu().clamp(0, 1)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    count, _, height, width = images.shape
    cols = max(1, min(per_row, count))
    rows = math.ceil(count / cols)
    grid = torch.full((3, rows * (height + padding) + padding,
                       cols * (width + padding) + padding), pad_value)
    for i, image in enumerate(images):
        y = (i // cols) * (height + padding) + padding
        x = (i % cols) * (width + padding) + padding
        grid[:, y : y + height, x : x + width] = image
    return grid


def save_png(picture: torch.Tensor, path: str | Path) -> Path:
    """A (3, H, W) picture in [0, 1] as an 8-bit PNG, published atomically."""
    path = Path(path)
    pixels = (picture.mul(255).add(0.5).clamp(0, 255).to(torch.uint8)
              .permute(1, 2, 0).numpy())
    with atomic_path(path) as temp:
        Image.fromarray(np.ascontiguousarray(pixels)).save(temp, format="PNG")
    return path


def save_image_grid(images: torch.Tensor, path: str | Path, per_row: int = 16) -> Path:
    return save_png(image_grid(images, per_row), path)


def save_reconstruction_grid(
    originals: torch.Tensor, reconstructions: torch.Tensor, path: str | Path, per_row: int = 16
) -> Path:
    """Rows alternate: ``per_row`` originals, then the same images reconstructed."""
    per_row = max(1, min(per_row, originals.shape[0]))
    count = originals.shape[0] - originals.shape[0] % per_row  # whole rows keep pairs aligned
    rows = []
    for start in range(0, count, per_row):
        rows += [originals[start : start + per_row], reconstructions[start : start + per_row]]
    return save_png(image_grid(torch.cat(rows), per_row), path)

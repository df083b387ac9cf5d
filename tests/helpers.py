"""Test data makers shared by several test modules."""

from __future__ import annotations

import numpy as np


def write_npz(path, n: int = 40, size: int = 8, seed: int = 0, nhwc: bool = False):
    """Blobby images (smooth, so a tiny model can learn them) with labels 0..3."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    images = np.zeros((n, size, size), dtype=np.uint8)
    for i in range(n):
        cy, cx = rng.uniform(1, size - 2, 2)
        images[i] = (255 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 4)).astype(np.uint8)
    labels = np.arange(n) % 4
    array = images[..., None] if nhwc else images[:, None]
    np.savez(path, images=array, labels=labels)
    return path

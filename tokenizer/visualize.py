"""Pictures for people: originals above their reconstructions."""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image


def save_reconstruction_grid(
    originals: torch.Tensor, reconstructions: torch.Tensor, path: str | Path, per_row: int = 16
) -> Path:
    """Rows alternate: ``per_row`` originals, then the same images reconstructed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    per_row = max(1, min(per_row, originals.shape[0]))
    count = originals.shape[0] - originals.shape[0] % per_row  # whole rows keep pairs aligned
    rows = []
    for start in range(0, count, per_row):
        rows += [originals[start : start + per_row], reconstructions[start : start + per_row]]
    pairs = torch.cat([r.float().cpu().clamp(0, 1) for r in rows])
    grid = make_grid(pairs, nrow=per_row, padding=2, pad_value=0.5)
    tmp = path.with_name(path.name + ".tmp.png")
    save_image(grid, tmp)
    tmp.replace(path)
    return path

"""What every quantizer's forward returns, so the model treats all kinds alike."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class QuantizerOutput:
    quantized: torch.Tensor  # (B, D, H, W); its gradient reaches the input (straight-through)
    indices: torch.Tensor  # (B, H, W) int64; (B, H, W, depth) for a residual quantizer
    loss: torch.Tensor  # codebook_loss (0 with EMA) + beta * commitment_loss
    codebook_loss: torch.Tensor
    commitment_loss: torch.Tensor

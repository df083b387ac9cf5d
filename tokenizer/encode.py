"""Batched encoding of a dataset's images into code grids (tensors out; storing is elsewhere)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from .accel import Accel
from .model import VQVAE
from .sources import ImageSource, iterate_batches


def encode_ids(
    model: VQVAE,
    source: ImageSource,
    ids: np.ndarray,
    batch_size: int,
    device: torch.device | str = "cpu",
    amp: bool = True,
    num_workers: int = 0,
    accel: Accel | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yield ``(codes (B, h, w) int64, ids (B,), labels (B,))`` in the order of ``ids``.

    ``accel`` defaults to ``Accel.for_device(device, amp)``: on CUDA, channels_last, bf16
    autocast for the convolutions (nearest-code distances stay fp32), pinned batches loaded
    ahead in a background thread and copied without blocking. On CPU everything is fp32.

    A batch of one image is encoded as two copies of it: PyTorch's CPU convolutions take
    another kernel for a single image, whose rounding flipped 20 of 490,000 codes (near ties)
    against batch 256 on the MNIST sample, while batches of 2 to 1000 agreed exactly
    (benchmarks/determinism.py). So codes do not depend on the batch size, nor on where a
    shard's last, possibly single-image, batch falls.
    """
    accel = accel or Accel.for_device(device, amp)
    model = accel.prepare(model).eval()
    start = 0
    with torch.inference_mode():
        for images, labels in iterate_batches(source, ids, batch_size, num_workers,
                                              pin=accel.pin_memory, prefetch=accel.prefetch,
                                              worker_nice=accel.worker_nice):
            images = accel.to_device(images)
            single = len(images) == 1
            if single:
                images = torch.cat([images, images])
            with accel.autocast():
                codes = model.encode(images)
            if single:
                codes, images = codes[:1], images[:1]
            batch_ids = ids[start : start + len(images)]
            start += len(images)
            yield codes.cpu().numpy(), batch_ids, labels.numpy()

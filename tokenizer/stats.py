"""Codebook-usage and reconstruction statistics shared by validation, benchmarks and flows."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # imported by read-only commands that never need torch
    import torch


def code_histogram(indices: torch.Tensor | np.ndarray, num_embeddings: int) -> np.ndarray:
    """Count of each code (int64, length K) over any array of indices."""
    if hasattr(indices, "detach"):  # a torch tensor (told apart without importing torch)
        indices = indices.detach().cpu().numpy()
    flat = np.asarray(indices).reshape(-1).astype(np.int64, copy=False)
    return np.bincount(flat, minlength=num_embeddings)


def entropy_bits(counts: np.ndarray) -> float:
    """Order-0 entropy (bits per token) of a histogram: the unigram code length."""
    total = counts.sum()
    if total == 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * np.log2(p)).sum())


def usage_summary(counts: np.ndarray) -> dict[str, float | int]:
    """Usage = codes used at least once / K; perplexity = exp(entropy in nats)."""
    counts = np.asarray(counts, dtype=np.int64)
    k = len(counts)
    used = int((counts > 0).sum())
    bits = entropy_bits(counts)
    return {
        "codebook_size": k,
        "codes_used": used,
        "dead_codes": k - used,
        "usage": used / k if k else 0.0,
        "perplexity": 2.0**bits,
        "entropy_bits": bits,
        "tokens": int(counts.sum()),
    }


def position_stats(codes: np.ndarray, num_embeddings: int) -> tuple[np.ndarray, np.ndarray]:
    """Per grid position: entropy in bits and number of distinct codes, each (h, w).

    Low entropy marks positions the tokenizer spends few codes on (e.g. MNIST's empty border).
    One histogram at a time keeps memory at K counts whatever the grid size.
    """
    n, h, w = codes.shape
    flat = codes.reshape(n, h * w)
    entropy = np.zeros(h * w)
    distinct = np.zeros(h * w, dtype=np.int64)
    for p in range(h * w):
        counts = np.bincount(flat[:, p].astype(np.int64), minlength=num_embeddings)
        entropy[p] = entropy_bits(counts)
        distinct[p] = int((counts > 0).sum())
    return entropy.reshape(h, w), distinct.reshape(h, w)


def ranked_codes(counts: np.ndarray, top: int = 10) -> dict[str, list[dict[str, int]]]:
    """The most and least used codes (ties broken by code index, so results are stable)."""
    order = np.lexsort((np.arange(len(counts)), -counts))
    least = np.lexsort((np.arange(len(counts)), counts))
    pick = lambda idx: [{"code": int(i), "count": int(counts[i])} for i in idx[:top]]  # noqa: E731
    return {"most_used": pick(order), "least_used": pick(least)}


def psnr(mse: float, peak: float = 1.0) -> float:
    """PSNR in dB for images in [0, peak]; infinite for a perfect reconstruction."""
    if math.isnan(mse):
        return math.nan
    return math.inf if mse <= 0 else 10.0 * math.log10(peak * peak / mse)

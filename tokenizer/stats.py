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


def level_histograms(indices: torch.Tensor | np.ndarray, num_embeddings: int,
                     depth: int = 1) -> np.ndarray:
    """Counts (depth, K) int64: each level's codes counted apart. At depth 1 ``indices`` is
    any array of codes; above, its last axis is the level (a residual quantizer's codes)."""
    if depth == 1:
        return code_histogram(indices, num_embeddings)[None]
    if hasattr(indices, "detach"):
        indices = indices.detach().cpu().numpy()
    indices = np.asarray(indices)
    if indices.ndim < 1 or indices.shape[-1] != depth:
        raise ValueError(f"codes of depth {depth} need a last axis of {depth}; got shape "
                         f"{indices.shape}")
    return np.stack([code_histogram(indices[..., i], num_embeddings) for i in range(depth)])


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
    """Per grid position: entropy in bits and number of distinct codes, each (h, w) (or
    (h, w, depth) for codes with depth: every level of a position is a position of its own).

    Low entropy marks positions the tokenizer spends few codes on (e.g. MNIST's empty border).
    One histogram at a time keeps memory at K counts whatever the grid size.
    """
    n, grid = codes.shape[0], codes.shape[1:]
    flat = codes.reshape(n, -1)
    entropy = np.zeros(flat.shape[1])
    distinct = np.zeros(flat.shape[1], dtype=np.int64)
    for p in range(flat.shape[1]):
        counts = np.bincount(flat[:, p].astype(np.int64), minlength=num_embeddings)
        entropy[p] = entropy_bits(counts)
        distinct[p] = int((counts > 0).sum())
    return entropy.reshape(grid), distinct.reshape(grid)


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

"""Codebook-usage and reconstruction statistics shared by validation, benchmarks and flows."""

from __future__ import annotations

import math

import numpy as np
import torch


def code_histogram(indices: torch.Tensor | np.ndarray, num_embeddings: int) -> np.ndarray:
    """Count of each code (int64, length K) over any array of indices."""
    flat = torch.as_tensor(indices).reshape(-1).long().cpu()
    return torch.bincount(flat, minlength=num_embeddings).numpy()


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


def psnr(mse: float, peak: float = 1.0) -> float:
    """PSNR in dB for images in [0, peak]; infinite for a perfect reconstruction."""
    return math.inf if mse <= 0 else 10.0 * math.log10(peak * peak / mse)

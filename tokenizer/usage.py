"""Codebook usage report for a whole token grid: the numbers behind stats.json."""

from __future__ import annotations

from typing import Any

import numpy as np

from .stats import code_histogram, position_stats, ranked_codes, usage_summary


def usage_report(
    codes: np.ndarray, num_embeddings: int, split_index: np.ndarray | None = None,
    split_names: tuple[str, ...] = (), top: int = 10,
) -> dict[str, Any]:
    """Counts, usage, dead codes, perplexity, entropy, per-position figures, ranked codes.

    ``codes`` is (N, h, w); per-split summaries are added when split indices are given.
    """
    codes = np.asarray(codes)
    counts = code_histogram(codes, num_embeddings)
    n, h, w = codes.shape
    entropy, distinct = position_stats(codes, num_embeddings)
    report: dict[str, Any] = {
        "images": int(n),
        "grid": [int(h), int(w)],
        **usage_summary(counts),
        "dead_code_ids": np.flatnonzero(counts == 0).tolist(),
        **ranked_codes(counts, top),
        "position_entropy_bits": entropy.round(4).tolist(),
        "position_distinct_codes": distinct.tolist(),
        "counts": counts.tolist(),
    }
    if split_index is not None and split_names:
        report["splits"] = {
            name: usage_summary(code_histogram(codes[split_index == i], num_embeddings))
            for i, name in enumerate(split_names)
        }
    return report

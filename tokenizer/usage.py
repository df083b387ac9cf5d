"""Codebook usage report for a whole token grid: the numbers behind stats.json."""

from __future__ import annotations

from typing import Any

import numpy as np

from .stats import code_histogram, position_stats, ranked_codes, usage_summary


def usage_report(
    codes: np.ndarray, num_embeddings: int, split_index: np.ndarray | None = None,
    split_names: tuple[str, ...] = (), top: int = 10, fsq_levels: list[int] | None = None,
) -> dict[str, Any]:
    """Counts, usage, dead codes, perplexity, entropy, per-position figures, ranked codes.

    ``codes`` is (N, h, w); per-split summaries are added when split indices are given.
    Codes (N, h, w, depth) of a residual quantizer are counted level by level: the report
    then holds ``depth`` and ``levels`` (one report per level, without images and grid), and
    its top-level figures are level 0's, so readers of a depth-1 report read those.
    With ``fsq_levels`` (codes of a finite scalar quantizer) the report adds ``dimensions``:
    usage and perplexity of each dimension's values.
    """
    codes = np.asarray(codes)
    if codes.ndim == 4:
        levels = [usage_report(codes[..., i], num_embeddings, split_index, split_names, top)
                  for i in range(codes.shape[-1])]
        per_level = [{k: v for k, v in level.items() if k not in ("images", "grid")}
                     for level in levels]
        return {**levels[0], "depth": int(codes.shape[-1]), "levels": per_level}
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
    if fsq_levels:
        report["dimensions"] = fsq_dimensions(codes, fsq_levels)
    return report


def fsq_dimensions(codes: np.ndarray, levels: list[int]) -> list[dict[str, Any]]:
    """Usage of each FSQ dimension's values: an index is the mixed-radix number of its
    per-dimension values, dimension 0 least significant (``quantizers.fsq``)."""
    rest = np.asarray(codes, dtype=np.int64).reshape(-1)
    out = []
    for dim, size in enumerate(levels):
        values = rest % size
        rest = rest // size
        summary = usage_summary(np.bincount(values, minlength=size))
        out.append({"dimension": dim, "levels": int(size),
                    **{k: summary[k] for k in ("usage", "codes_used", "perplexity")}})
    return out

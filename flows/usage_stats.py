"""Codebook usage of a token store -> stats.json and two plots: the work behind ``stats``.

Plain functions, no Prefect: ``stats_flow`` runs them as tasks (recorded), and the CLI calls
``usage_stats`` directly when no Prefect server is configured (``flows.recording``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vqtok.files.atomic import write_bytes_atomic
from vqtok.flows.plots import plot_position_entropy, plot_sorted_usage
from vqtok.storage import load_grid
from vqtok.tokenizer.usage import usage_report

SUMMARY_KEYS = ("images", "codebook_size", "codes_used", "dead_codes", "usage", "perplexity",
                "entropy_bits", "tokenizer_quality", "dataset", "most_used")


def write_stats(tokens: str, out: str) -> dict[str, Any]:
    """Read every code once and write OUT/stats.json (atomically); returns its path
    (``stats``) and the headline figures (a small dict: tasks pass paths, not arrays)."""
    grid = load_grid(tokens)
    report = usage_report(grid.codes, grid.meta.codebook_size, grid.split_index,
                          tuple(grid.split_names),
                          fsq_levels=grid.meta.extra.get("quantizer", {}).get("levels"))
    report["dataset"] = grid.meta.dataset
    report["checkpoint_hash"] = grid.meta.checkpoint_hash
    # Usage alone cannot tell a working tokenizer from a dead decoder: carry its quality.
    report["tokenizer_quality"] = grid.meta.extra.get("tokenizer_quality", {})
    report["tokens"] = str(tokens)
    path = Path(out) / "stats.json"
    write_bytes_atomic(path, json.dumps(report, indent=2).encode())
    return {**{k: report[k] for k in SUMMARY_KEYS}, "stats": str(path)}


def write_plots(stats_path: str) -> list[str]:
    """The two plots beside stats.json, drawn from it (read once, here)."""
    stats = json.loads(Path(stats_path).read_text())
    folder = Path(stats_path).parent
    return [str(plot_sorted_usage(stats, folder / "usage.png")),
            str(plot_position_entropy(stats, folder / "position_entropy.png"))]


def usage_stats(tokens: str, out: str) -> dict[str, Any]:
    """stats.json and the plots, without Prefect; the same result as ``stats_flow``."""
    summary = write_stats(tokens, out)
    return {**summary, "plots": write_plots(summary["stats"])}
